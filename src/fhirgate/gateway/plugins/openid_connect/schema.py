"""Config of the `openid-connect` plugin: the bearer-JWT part of Kong's plugin of that name, with
Kong's field names (`kong/plugins/openid-connect/schema.lua`, Konnect `GatewayPluginOpenidConnect`)
and fhirgate's own `typ` and JWKS cache settings.

Defaults that differ from Kong's (DECISIONS.md; Kong's plugin is Enterprise-only, so no free Kong
file depends on them): `bearer_token_param_type` is `["header"]` (Kong: header, query and body);
`exp` is required in every token.
"""

from __future__ import annotations

import re
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from fhirgate.gateway.plugins.base import PluginConfig
from fhirgate.tokens.jwks_cache import MAX_BYTES

__all__ = ["OpenIdConnectConfig"]

ConsumerField = Literal["id", "username", "custom_id"]
ParamType = Literal["header", "query", "body"]

# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 6750 §3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _consumer_by() -> list[ConsumerField]:
    return ["username", "custom_id"]


def _param_types() -> list[ParamType]:
    return ["header"]


def _url(value: str, field: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field} must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{field} cannot carry credentials")
    if parts.query or parts.fragment:
        raise ValueError(f"{field} cannot have a query or a fragment")
    return value


def _quotable(value: str) -> str:
    # Written inside a quoted-string of WWW-Authenticate (RFC 9110 §11.6.1, §5.6.4).
    if any(c in value for c in '"\\') or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("cannot contain quotes, backslashes or control characters")
    return value


class OpenIdConnectConfig(PluginConfig):
    issuer: str = Field(
        description=(
            "The issuer identifier (`https://idp.example/realms/x`) or the URL of its metadata: "
            "`.../.well-known/openid-configuration` (OpenID Connect Discovery) or "
            "`.../.well-known/oauth-authorization-server` (RFC 8414). The document's `issuer` must "
            "match it (a trailing slash aside) and its `jwks_uri` gives the signing keys."
        ),
    )
    issuers_allowed: list[str] = Field(
        default_factory=list,
        description=(
            "The `iss` values accepted in tokens, compared exactly. Empty: only the discovered "
            "issuer. The issuer's keys verify tokens of these issuers too."
        ),
    )
    extra_jwks_uris: list[str] = Field(
        default_factory=list,
        description="More JWKS URLs whose keys are trusted for the same issuer (fetched with its JWKS).",
    )
    audience_required: list[str] = Field(
        default_factory=list,
        description=(
            "Audiences a token must carry in `aud` (at least one of them). Empty: `aud` is not "
            "checked (`fhirgate config check` warns)."
        ),
    )
    scopes_required: list[str] = Field(
        default_factory=list,
        description=(
            "Scopes required, as alternatives: each entry is a space-separated set that must all be "
            "granted; one entry satisfied is enough (`['a b', 'c']` = (a AND b) OR c). Missing "
            "scopes are a 403 `insufficient_scope`."
        ),
    )
    scopes_claim: list[str] = Field(
        default_factory=lambda: ["scope"],
        min_length=1,
        description=(
            "Path to the claim holding the granted scopes (`['scp']` for Okta or Entra, "
            "`['realm_access', 'roles']` for a nested claim): a space-separated string or an array."
        ),
    )
    leeway: float = Field(
        0, ge=0, description="Seconds of clock skew allowed when checking `exp`, `nbf` and `iat`."
    )
    consumer_claim: list[str] | None = Field(
        None,
        description=(
            "Path to the claim whose value names the Kong consumer (e.g. `['sub']` or "
            "`['preferred_username']`). Unset: no consumer mapping."
        ),
    )
    consumer_by: list[ConsumerField] = Field(
        default_factory=_consumer_by,
        min_length=1,
        description="Which consumer fields `consumer_claim`'s value is matched against, in order.",
    )
    consumer_optional: bool = Field(
        False,
        description=(
            "Accept a valid token whose `consumer_claim` matches no consumer (no consumer is set). "
            "When false such a token is refused (401 `invalid_token`)."
        ),
    )
    upstream_headers_claims: list[str] = Field(
        default_factory=list,
        description=(
            "Top-level claims whose values are sent upstream, in the headers named by "
            "`upstream_headers_names`."
        ),
    )
    upstream_headers_names: list[str] = Field(
        default_factory=list,
        description=(
            "Upstream header names, one per entry of `upstream_headers_claims`. A client's own copy of "
            "each header is always removed."
        ),
    )
    rediscovery_lifetime: float = Field(
        30,
        ge=0,
        description=(
            "Seconds between fetches of the metadata document: a JWKS refresh re-reads it when it is "
            "older (the previous one stays in use if that fails)."
        ),
    )
    bearer_token_param_type: list[ParamType] = Field(
        default_factory=_param_types,
        min_length=1,
        description=(
            "Where the bearer token may be (RFC 6750 §2): `header` (`Authorization: Bearer`), `query` "
            "(`access_token` parameter; `config check` warns), `body` (`access_token` in a form-encoded "
            "body). An `access_token` query parameter when `query` is not listed is a 400."
        ),
    )
    anonymous: str | None = Field(
        None,
        description=(
            "An optional consumer id or username to use when authentication fails (logical OR with "
            "other auth plugins). An unreachable issuer (503) is not an authentication failure."
        ),
    )
    run_on_preflight: bool = Field(
        True, description="Whether `OPTIONS` preflight requests are authenticated."
    )
    realm: str | None = Field(
        None,
        description="The `realm` of `WWW-Authenticate: Bearer` challenges. Unset: the request's host name.",
    )
    typ: list[str] = Field(
        default_factory=lambda: ["at+jwt", "JWT"],
        min_length=1,
        description=(
            "Accepted JOSE `typ` values (compared case-insensitively, `application/` optional; RFC 9068 "
            "§4). ID tokens are refused by audience, and by `typ` where the issuer sets one."
        ),
    )
    typ_required: bool = Field(False, description="Refuse tokens without a `typ` header.")
    jwks_cache_min_ttl: float = Field(
        60, ge=0, description="Shortest time keys are cached, whatever `Cache-Control` says (seconds)."
    )
    jwks_cache_max_ttl: float = Field(
        86400, ge=0, description="Longest time keys are cached before a refresh (seconds)."
    )
    jwks_cache_default_ttl: float = Field(
        300, ge=0, description="How long keys are cached when the response has no `Cache-Control: max-age`."
    )
    jwks_refetch_cooldown: float = Field(
        30,
        ge=0,
        description=(
            "Seconds between refetches caused by unknown `kid`s or failed refreshes (per worker); also "
            "the `Retry-After` of a 503 when the issuer is unreachable with no keys cached."
        ),
    )
    jwks_fetch_timeout: float = Field(
        5, gt=0, description="Time limit for fetching one metadata document or JWKS (seconds, in all)."
    )
    jwks_max_bytes: int = Field(
        MAX_BYTES, gt=0, description="Largest metadata document or JWKS accepted (bytes)."
    )
    revocation_feed_url: str | None = Field(
        None,
        description=(
            "fhirgate extension: a revocation feed to poll (fhirgate's authorization server: "
            "`{issuer}/revocations`). Tokens it lists (by `jti`) are refused with 401 "
            "`invalid_token`, cached or not, from the next poll on. One poller per worker and URL, "
            "shared by every instance; a failed poll keeps what was learned. Unset: no polling."
        ),
    )
    revocation_poll_interval: float = Field(
        2,
        ge=0.1,
        le=3600,
        description=(
            "fhirgate extension: seconds between polls of `revocation_feed_url` (each poll reads "
            "the feed to its end, at most 20 pages)."
        ),
    )

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        return _url(v, "issuer")

    @field_validator("revocation_feed_url")
    @classmethod
    def _feed(cls, v: str | None) -> str | None:
        return _url(v, "revocation_feed_url") if v is not None else None

    @field_validator("extra_jwks_uris")
    @classmethod
    def _uris(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(_url(u, "a JWKS URI") for u in v))

    @field_validator("issuers_allowed", "audience_required")
    @classmethod
    def _set(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("scopes_required")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for entry in v:
            tokens = entry.split()
            if not tokens or not all(_SCOPE.fullmatch(t) for t in tokens):
                raise ValueError("each entry is one or more space-separated scope tokens (RFC 6749 §3.3)")
        return v

    @field_validator("upstream_headers_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return v

    @field_validator("realm")
    @classmethod
    def _realm(cls, v: str | None) -> str | None:
        return _quotable(v) if v is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.upstream_headers_claims) != len(self.upstream_headers_names):
            raise ValueError("upstream_headers_claims and upstream_headers_names must have the same length")
        if self.jwks_cache_min_ttl > self.jwks_cache_max_ttl:
            raise ValueError("jwks_cache_min_ttl cannot exceed jwks_cache_max_ttl")
        return self
