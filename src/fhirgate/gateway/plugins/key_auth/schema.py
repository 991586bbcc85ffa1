"""Config of the `key-auth` plugin (Kong 3.x `kong/plugins/key-auth/schema.lua`, as of Kong 3.7+
where `realm` arrived; followed up to Kong 3.10).

Every field, default and description is Kong's. `identity_realms` (Konnect only) is accepted so an
exported Konnect file loads, and ignored: fhirgate finds consumers in its own configuration.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field, JsonValue, field_validator

from fhirgate.gateway.plugins.base import PluginConfig

_HEADER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _header_name(value: str) -> str:
    # Kong: `typedefs.header_name` (`validate_header_name`).
    if not _HEADER_NAME.match(value):
        raise ValueError(f"bad header name '{value}', allowed characters are A-Z, a-z, 0-9, '_', and '-'")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]


class KeyAuthConfig(PluginConfig):
    key_names: list[HeaderName] = Field(
        default_factory=lambda: ["apikey"],
        description=(
            "Describes an array of parameter names where the plugin will look for a key. The client "
            "must send the authentication key in one of those key names, and the plugin will try to "
            "read the credential from a header, request body, or query string parameter with the same "
            "name. Key names may only contain [a-z], [A-Z], [0-9], [_] underscore, and [-] hyphen."
        ),
    )
    hide_credentials: bool = Field(
        False,
        description=(
            "An optional boolean value telling the plugin to show or hide the credential from the "
            "upstream service. If `true`, the plugin strips the credential from the request (i.e., the "
            "header, query string, or request body containing the key) before proxying it."
        ),
    )
    anonymous: str | None = Field(
        None,
        description=(
            "An optional string (consumer UUID or username) value to use as an “anonymous” consumer if "
            "authentication fails. If empty (default null), the request will fail with an "
            "authentication failure `4xx`. Note that this value must refer to the consumer `id` or "
            "`username` attribute, and **not** its `custom_id`."
        ),
    )
    key_in_header: bool = Field(
        True,
        description=(
            "If enabled (default), the plugin reads the request header and tries to find the key in it."
        ),
    )
    key_in_query: bool = Field(
        True,
        description=(
            "If enabled (default), the plugin reads the query parameter in the request and tries to "
            "find the key in it."
        ),
    )
    key_in_body: bool = Field(
        False,
        description=(
            "If enabled, the plugin reads the request body (if said request has one and its MIME type "
            "is supported) and tries to find the key in it. Supported MIME types: "
            "`application/x-www-form-urlencoded`, `application/json`, and `multipart/form-data`."
        ),
    )
    run_on_preflight: bool = Field(
        True,
        description=(
            "A boolean value that indicates whether the plugin should run (and try to authenticate) on "
            "`OPTIONS` preflight requests. If set to `false`, then `OPTIONS` requests are always allowed."
        ),
    )
    realm: str | None = Field(
        None,
        description=(
            "When authentication fails the plugin sends `WWW-Authenticate` header with `realm` "
            "attribute value."
        ),
    )
    identity_realms: list[dict[str, JsonValue]] | None = Field(
        None,
        description="Konnect Identity Realms (Konnect only): accepted and ignored by fhirgate.",
    )

    @field_validator("key_names", mode="before")
    @classmethod
    def _key_names_required(cls, value: Any) -> Any:
        # Kong: `required = true` (null is refused; the default applies only when absent).
        if value is None:
            raise ValueError("required field missing")
        return value

    @field_validator("realm")
    @classmethod
    def _realm(cls, value: str | None) -> str | None:
        # The realm is written inside a quoted-string (RFC 9110 11.6.1, 5.6.4): no `"`, `\` or
        # control characters, so the header cannot be broken or injected into.
        if value is not None and any(c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("realm may not contain '\"', '\\' or control characters")
        return value


__all__ = ["KeyAuthConfig"]
