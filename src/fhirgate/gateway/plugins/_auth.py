"""What Kong's authentication plugins share (`jwt`, `key-auth`, later `openid-connect`):
setting the authenticated consumer with its upstream headers, and the anonymous fallback that makes
several auth plugins a logical OR.

Kong's `set_consumer` (kong/plugins/jwt/handler.lua and siblings): the `X-Consumer-*` and
`X-Credential-Identifier` headers are set from the consumer and credential, or cleared, so a client
can never send its own copy upstream; `X-Anonymous-Consumer: true` only for the anonymous consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

CONSUMER_ID = "X-Consumer-ID"
CONSUMER_CUSTOM_ID = "X-Consumer-Custom-ID"
CONSUMER_USERNAME = "X-Consumer-Username"
CREDENTIAL_IDENTIFIER = "X-Credential-Identifier"
ANONYMOUS = "X-Anonymous-Consumer"


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def set_consumer(kong: PDK, consumer: Any, credential: Any = None, identifier: str | None = None) -> None:
    """Authenticate the request as `consumer` (with `credential`, or anonymously when None) and
    set or clear the upstream consumer headers as Kong does. `identifier` is the credential's
    public identifier (Kong: its `key`)."""
    kong.client.authenticate(consumer, credential)
    request = kong.service.request
    for header, value in (
        (CONSUMER_ID, _field(consumer, "id")),
        (CONSUMER_CUSTOM_ID, _field(consumer, "custom_id")),
        (CONSUMER_USERNAME, _field(consumer, "username")),
        (CREDENTIAL_IDENTIFIER, identifier if credential is not None else None),
    ):
        if value:
            request.set_header(header, str(value))
        else:
            request.clear_header(header)
    if credential is not None:
        request.clear_header(ANONYMOUS)
    else:
        request.set_header(ANONYMOUS, "true")


def authenticate_or_anonymous(
    kong: PDK,
    anonymous: str | None,
    attempt: Callable[[], None],
) -> None:
    """Kong's access flow for an auth plugin. With `anonymous` set (logical OR): skip if another
    plugin already authenticated a credential; otherwise run `attempt` and, if it refuses (raises
    `GatewayExit`), continue as the anonymous consumer. Without it (logical AND): `attempt`'s
    refusal stands."""
    from fhirgate.errors import GatewayExit

    if anonymous and kong.client.get_credential() is not None:
        return
    try:
        attempt()
    except GatewayExit:
        if not anonymous:
            raise
        consumer = kong.client.load_consumer(anonymous, True)
        if consumer is None:
            kong.response.error(500, f"anonymous consumer {anonymous} is configured but doesn't exist")
        set_consumer(kong, consumer, None)
