"""Config of the `cors` plugin (Kong's `kong/plugins/cors/schema.lua`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from fhirgate.gateway.plugins.base import PluginConfig

Method = Literal["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"]

METHODS: tuple[Method, ...] = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT")

# Kong's origins are PCRE; Python's `re` spells named groups `(?P<name>...)`.
_PCRE_NAMED_GROUP = re.compile(r"\(\?<(?![=!])")


def compile_origin_regex(entry: str) -> re.Pattern[str]:
    """Compile an origin entry as a regex (raises `re.error`)."""
    return re.compile(_PCRE_NAMED_GROUP.sub("(?P<", entry))


def _asterisk_or_regex(value: str) -> str:
    # Kong: `validate_asterisk_or_regex`.
    if value == "*":
        return value
    try:
        compile_origin_regex(value)
    except re.error:
        raise ValueError(f"'{value}' is not a valid regex") from None
    return value


def _one_of_methods(value: object) -> object:
    if isinstance(value, str) and value not in METHODS:
        raise ValueError(f"expected one of: {', '.join(METHODS)}")
    return value


Origin = Annotated[str, AfterValidator(_asterisk_or_regex)]
AllowedMethod = Annotated[Method, BeforeValidator(_one_of_methods)]


class CorsConfig(PluginConfig):
    origins: list[Origin] | None = Field(
        default=None,
        description=(
            "Allowed origins for `Access-Control-Allow-Origin`: exact origins (`https://app.example`) "
            "or regexes (matched against the whole origin, or only its host when the entry has no "
            "`:`). `*` (or no value) allows every origin."
        ),
    )
    headers: list[str] | None = Field(
        default=None,
        description=(
            "Value of `Access-Control-Allow-Headers` on preflights; when unset, the request's "
            "`Access-Control-Request-Headers` is echoed."
        ),
    )
    exposed_headers: list[str] | None = Field(
        default=None,
        description="Value of `Access-Control-Expose-Headers`; when unset, no custom headers are exposed.",
    )
    methods: list[AllowedMethod] = Field(
        default_factory=lambda: list(METHODS),
        description="Value of `Access-Control-Allow-Methods` on preflights. By default all methods.",
    )
    max_age: float | None = Field(
        default=None,
        description="How long a preflight answer may be cached, in seconds (`Access-Control-Max-Age`).",
    )
    credentials: bool = Field(
        default=False,
        description="Send `Access-Control-Allow-Credentials: true`.",
    )
    private_network: bool = Field(
        default=False,
        description=(
            "Answer `Access-Control-Allow-Private-Network: true` to preflights that carry "
            "`Access-Control-Request-Private-Network: true`."
        ),
    )
    preflight_continue: bool = Field(
        default=False,
        description="Proxy `OPTIONS` preflight requests to the upstream service instead of answering them.",
    )
    allow_origin_absent: bool = Field(
        default=True,
        description=(
            "Add CORS response headers to requests without an `Origin` header. When false, such "
            "responses get no CORS headers."
        ),
    )


__all__ = ["METHODS", "CorsConfig", "compile_origin_regex"]
