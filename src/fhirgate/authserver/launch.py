"""EHR launch contexts (SMART App Launch 2.2 "EHR launch"): `fhirgate launch` mints a `launch`
value for one client; the app passes it to `/authorize` with the `launch` scope and receives the
patient (and encounter, fhirContext) without a picker.

The value is 256 random bits, stored only as its SHA-256 in `auth_launch`, bound to one client,
single-use (consumed when the authorization code is issued) and short-lived.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Sequence

from fhirgate import clock
from fhirgate.authserver.clients import ClientError, UnknownClientError
from fhirgate.authserver.store import AuthStore
from fhirgate.tokens.jwk import quote_value

__all__ = ["LAUNCH_LIFETIME", "LaunchError", "digest", "mint_launch"]

#: How long a minted launch value may wait for its `/authorize` (seconds).
LAUNCH_LIFETIME = 300

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_REFERENCE = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}")


class LaunchError(ClientError):
    """A launch that cannot be minted; the message says why."""


def digest(secret: str) -> str:
    """The SHA-256 (hex) a random secret is stored as (codes, refresh tokens, launches, sessions)."""
    return hashlib.sha256(secret.encode()).hexdigest()


async def mint_launch(
    store: AuthStore,
    client_id: str,
    patient: str,
    encounter: str | None = None,
    fhir_context: Sequence[str] = (),
    lifetime: int = LAUNCH_LIFETIME,
) -> str:
    """A new launch value for `client_id` with this context."""
    if not _ID.fullmatch(patient):
        raise LaunchError(f"invalid patient id {quote_value(patient)}: 1 to 64 of A-Z a-z 0-9 - .")
    if encounter is not None and not _ID.fullmatch(encounter):
        raise LaunchError(f"invalid encounter id {quote_value(encounter)}: 1 to 64 of A-Z a-z 0-9 - .")
    for ref in fhir_context:
        if not _REFERENCE.fullmatch(ref):
            raise LaunchError(f"invalid fhirContext reference {quote_value(ref)}: expected Type/id")
    context: dict[str, object] = {"patient": patient}
    if encounter is not None:
        context["encounter"] = encounter
    if fhir_context:
        context["fhirContext"] = [{"reference": ref} for ref in fhir_context]
    value = secrets.token_urlsafe(32)
    now_ms = int(clock.now() * 1000)
    async with store.write() as s:
        stored = await s.client(client_id)
        if stored is None:
            raise UnknownClientError(f"no client {quote_value(client_id)}")
        if "authorization_code" not in json.loads(stored.metadata).get("grant_types", []):
            raise LaunchError(
                f"client {quote_value(client_id)} is not registered for authorization_code: "
                "it cannot be launched"
            )
        await s.insert_launch(
            digest(value), client_id, json.dumps(context, separators=(",", ":")), now_ms + lifetime * 1000
        )
    return value
