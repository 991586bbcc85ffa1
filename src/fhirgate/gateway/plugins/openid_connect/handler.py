"""The `openid-connect` plugin, bearer-JWT part (Kong Enterprise's plugin of that name with
`auth_methods: [bearer]`), on the shared verification core `fhirgate.tokens`.

Flow: find the one bearer token (RFC 6750 §2), parse it, check `typ` and `iss`, take the issuer's
key for its `kid` and `alg` from the JWKS cache (`fhirgate.tokens.jwks_cache`), verify the
signature, then `exp` (required), `nbf`, `iat` with `leeway`, `aud` and the scopes; map a consumer
and set the upstream headers.

The access hook is `async` because a cold cache, an expired one or an unknown `kid` needs a fetch;
with the keys cached it completes without suspending.

Verified tokens are cached (`fhirgate.tokens.cache.VerifiedTokenCache`, keyed by the exact token
string, one cache per plugin instance, cleared when the consumers are bound): a hit skips parsing
and signature verification and reuses what the verification produced (claims, consumer,
credential, upstream header values, all checks that depend only on the token and the
configuration: `typ`, `iss`, `aud`, scopes, consumer). On every hit, `exp` and `nbf` are checked
again with `leeway`, the `jti` against the revocation set (by the cache), and the key: the entry
remembers the key object that verified it and is served only while the JWKS cache would still
hand out that very object for the token's (`iss`, `kid`, `alg`) without a fetch (`peek`). A JWKS
refresh builds new key objects, so it invalidates every entry (each token is verified once more);
a key removed from the JWKS, or a key set past its cache period, is never trusted from the token
cache. With `revocation_feed_url` (a fhirgate extension), the worker's shared poller
(`fhirgate.tokens.revocation_feed`, started by `init_worker` or the first request, released by
`close`) fills the revocation set that the cache and the plugin consult.

Refusals (RFC 6750 §3, DECISIONS.md): the status, a `WWW-Authenticate: Bearer` challenge with
`realm` (and `error`, `error_description`, `scope` where RFC 6750 says so), and a
`{"message": ...}` body rendered in the route's dialect (Kong JSON or OperationOutcome):

- no token: 401, challenge without an error code, `Unauthorized`;
- a token that is not good (malformed, expired, wrong issuer or audience, unknown key, bad
  signature, ...): 401 `invalid_token`, the description says what is wrong;
- scopes missing: 403 `insufficient_scope` with the `scope` needed (the first alternative);
- a malformed request (two `Authorization` headers, a token in two places, an `access_token`
  query parameter where the query is not accepted, a `Bearer` credential that is not a b64token):
  400 `invalid_request`;
- the issuer's keys unreachable with none cached: 503 with `Retry-After` (the token is not proven
  bad), no challenge.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn
from urllib.parse import parse_qs

import orjson

from fhirgate.errors import GatewayExit
from fhirgate.gateway.context import BodyTooLarge
from fhirgate.gateway.plugins._auth import set_consumer
from fhirgate.gateway.plugins.base import Plugin
from fhirgate.gateway.plugins.openid_connect.schema import OpenIdConnectConfig
from fhirgate.tokens import revocation_feed
from fhirgate.tokens.cache import VerifiedTokenCache
from fhirgate.tokens.claims import check_aud, check_exp, check_iat, check_nbf, check_typ
from fhirgate.tokens.errors import (
    AlgorithmNotAllowedError,
    ClaimError,
    MalformedTokenError,
    SignatureError,
    TokenError,
)
from fhirgate.tokens.jwks_cache import (
    CacheSettings,
    HttpFetcher,
    JwksCache,
    JwksUnavailableError,
    KeySelectionError,
)
from fhirgate.tokens.jws import parse_jwt
from fhirgate.tokens.keys import VerificationKey
from fhirgate.tokens.verify import verify_signature

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.gateway.pdk import PDK

__all__ = ["Handler", "OidcCredential"]

# RFC 6750 §3.1 error codes.
INVALID_REQUEST = "invalid_request"
INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code, not a secret
INSUFFICIENT_SCOPE = "insufficient_scope"

MSG_UNAUTHORIZED = "Unauthorized"
MSG_MULTIPLE_HEADERS = "more than one Authorization header"
MSG_MULTIPLE_TOKENS = "more than one access token in the request"
MSG_BAD_HEADER = "the Authorization header is not a Bearer b64token (RFC 6750 section 2.1)"
MSG_FORM_TOO_LARGE = "the form body is too large to carry an access token"
MSG_QUERY_REFUSED = "access_token in the query string is not accepted; send it in the Authorization header"
MSG_MALFORMED = "the token is malformed"
MSG_TOO_LARGE = "the token is too large"
MSG_BAD_ALG = "the token's alg is missing, unknown or none"
MSG_CRIT = "the token has an unsupported critical header"
MSG_TYP = "the token's type is not accepted"
MSG_ISSUER = "the token's issuer is not accepted"
MSG_AUDIENCE = "the token's audience is not accepted"
MSG_EXPIRED = "the token has expired"
MSG_NOT_YET_VALID = "the token is not valid yet"
MSG_FUTURE = "the token was issued in the future"
MSG_CLAIM = "the token's {claim} claim is missing or invalid"
MSG_UNKNOWN_KID = "no key of the issuer matches the token's kid"
MSG_KID_REQUIRED = "the token has no kid and the issuer has several keys"
MSG_ALG_NOT_ALLOWED = "the token's alg is not allowed for the issuer's key"
MSG_SIGNATURE = "the token's signature is invalid"
MSG_NO_CONSUMER = "the token matches no consumer"
MSG_SCOPE = "the token lacks the scope this resource requires"
MSG_UNAVAILABLE = "the issuer's signing keys cannot be fetched now; try again later"
MSG_REVOKED = "the token has been revoked"

ACCESS_TOKEN = "access_token"  # noqa: S105 - RFC 6750 §2.2/§2.3 parameter name
MAX_FORM_BODY = 64 * 1024
SHARED_TOKEN = "authenticated_jwt_token"  # noqa: S105 - a kong.ctx.shared key, as Kong's plugins
SHARED_CLAIMS = "authenticated_jwt_claims"

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110 §11.1).
# The token group ends on a non-space, so no lazy backtracking over the whole token (19 us -> 0.3 us).
_BEARER = re.compile(r"\s*bearer(?:\s+(\S(?:.*\S)?))?\s*", re.IGNORECASE | re.DOTALL)
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# What a realm taken from the Host header may contain (it is written in a quoted-string).
_SAFE_REALM = re.compile(r"[A-Za-z0-9.\-:\[\]_]{1,253}")

_MALFORMED_MESSAGES: Mapping[str, str] = {
    "token_too_large": MSG_TOO_LARGE,
    "header_too_large": MSG_TOO_LARGE,
    "alg_invalid": MSG_BAD_ALG,
    "crit_unsupported": MSG_CRIT,
}
_CLAIM_MESSAGES: Mapping[tuple[str, str], str] = {
    ("exp", "expired"): MSG_EXPIRED,
    ("nbf", "not_yet_valid"): MSG_NOT_YET_VALID,
    ("iat", "issued_in_future"): MSG_FUTURE,
}
_KEY_MESSAGES: Mapping[str, str] = {
    "unknown_kid": MSG_UNKNOWN_KID,
    "kid_required": MSG_KID_REQUIRED,
    "issuer_mismatch": MSG_ISSUER,
    "alg_not_allowed": MSG_ALG_NOT_ALLOWED,
}


@dataclass(frozen=True, slots=True)
class OidcCredential:
    """What `kong.client.get_credential()` returns after this plugin authenticated a token."""

    id: str | None
    issuer: str
    consumer_id: str | None


@dataclass(frozen=True, slots=True, eq=False)
class _Verified:
    """What a successful verification produced: a token cache entry."""

    iss: str
    kid: str | None
    alg: str
    #: The very key object that verified the signature (identity is checked on every hit).
    key: VerificationKey
    claims: dict[str, Any]
    consumer: Any
    credential: OidcCredential
    #: (header name, value or None to remove it), from `upstream_headers_claims`.
    headers: tuple[tuple[str, str | None], ...]


def describe(exc: TokenError) -> str:
    """The RFC 6750 `error_description` for a token problem (fixed texts: nothing from the token
    is echoed)."""
    if isinstance(exc, MalformedTokenError):
        return _MALFORMED_MESSAGES.get(exc.code, MSG_MALFORMED)
    if isinstance(exc, ClaimError):
        if exc.claim == "typ":
            return MSG_TYP
        if exc.claim == "iss":
            return MSG_ISSUER
        if exc.claim == "aud":
            return MSG_AUDIENCE
        return _CLAIM_MESSAGES.get((exc.claim, exc.code), MSG_CLAIM.format(claim=exc.claim))
    if isinstance(exc, KeySelectionError | AlgorithmNotAllowedError):
        return _KEY_MESSAGES.get(exc.code, MSG_UNKNOWN_KID)
    if isinstance(exc, SignatureError):
        return MSG_SIGNATURE
    return MSG_MALFORMED


def _claim_at(claims: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = claims
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _granted_scopes(value: Any) -> frozenset[str]:
    """RFC 8693 §4.2 / RFC 9068 §2.2.3: a space-separated string; Okta and Entra send an array."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def _header_value(value: Any) -> str | None:
    """A claim as an upstream header value, or None when it cannot be one safely."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = orjson.dumps(value).decode()
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        return None  # RFC 9110 §5.5: no control characters in a field value
    return text


# One JWKS cache per event loop (per worker) and per issuer and cache settings: plugin instances
# on several routes share it, and a configuration reload keeps it warm, so an IdP outage during a
# reload does not turn into 503s. Keyed by the loop object (weakly), so a cache never outlives the
# loop its fetches ran on.
_SHARED_JWKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], JwksCache]] = (
    weakref.WeakKeyDictionary()
)


def _jwks_cache_for(c: OpenIdConnectConfig) -> JwksCache:
    key = (
        c.issuer,
        tuple(c.extra_jwks_uris),
        tuple(c.issuers_allowed),
        c.jwks_cache_min_ttl,
        c.jwks_cache_max_ttl,
        c.jwks_cache_default_ttl,
        c.jwks_refetch_cooldown,
        c.rediscovery_lifetime,
        c.jwks_fetch_timeout,
        c.jwks_max_bytes,
    )
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None  # a file checked or loaded outside a worker: a private cache
    shared = _SHARED_JWKS.setdefault(loop, {}) if loop is not None else None
    if shared is not None and key in shared:
        return shared[key]
    cache = JwksCache(
        c.issuer,
        extra_jwks_uris=c.extra_jwks_uris,
        aliases=c.issuers_allowed,
        settings=CacheSettings(
            min_ttl=c.jwks_cache_min_ttl,
            max_ttl=c.jwks_cache_max_ttl,
            default_ttl=c.jwks_cache_default_ttl,
            refetch_cooldown=c.jwks_refetch_cooldown,
            rediscovery_lifetime=c.rediscovery_lifetime,
        ),
        fetch=HttpFetcher(timeout=c.jwks_fetch_timeout, max_bytes=c.jwks_max_bytes),
    )
    if shared is not None:
        shared[key] = cache
    return cache


class Handler(Plugin):
    name: ClassVar[str] = "openid-connect"
    priority: ClassVar[int] = 1050
    version: ClassVar[str] = "3.10.0"
    Config: ClassVar[type[OpenIdConnectConfig]] = OpenIdConnectConfig
    no_consumer: ClassVar[bool] = True
    description: ClassVar[str] = (
        "Verify bearer JWT access tokens against an OpenID Connect / OAuth issuer's JWKS "
        "(Kong's openid-connect, bearer part)."
    )

    config: OpenIdConnectConfig

    #: Entries of the verified-token cache of each instance (0 disables it).
    token_cache_size: ClassVar[int] = 10_000

    def __init__(self, config: OpenIdConnectConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)
        c = config
        self.cache = _jwks_cache_for(c)
        # Before any fetch, the `iss` values that can possibly be accepted (cheap refusal of
        # foreign tokens without touching the cache); the cache then compares exactly.
        self._issuers = frozenset(c.issuers_allowed) or self.cache.possible_issuers
        self._typ: frozenset[str | None] = frozenset([*c.typ, *(() if c.typ_required else (None,))])
        self._audiences = frozenset(c.audience_required)
        self._scope_sets = tuple(frozenset(entry.split()) for entry in c.scopes_required)
        self._scope_hint = " ".join(c.scopes_required[0].split()) if c.scopes_required else ""
        self._headers = tuple(zip(c.upstream_headers_claims, c.upstream_headers_names, strict=True))
        self._in_header = "header" in c.bearer_token_param_type
        self._in_query = "query" in c.bearer_token_param_type
        self._in_body = "body" in c.bearer_token_param_type
        self._consumers: dict[str, dict[str, Any]] = {}
        #: Verified tokens; new with every instance, so with every configuration.
        self.token_cache: VerifiedTokenCache[_Verified] = VerifiedTokenCache(self.token_cache_size)
        #: The worker's poller of `revocation_feed_url` (shared), once this instance has started.
        self.feed: revocation_feed.RevocationFeed | None = None
        self._wants_feed = c.revocation_feed_url is not None

    def init_worker(self) -> None:
        self._start_feed()

    def close(self) -> None:
        feed, self.feed = self.feed, None
        self._wants_feed = False
        if feed is not None:
            revocation_feed.release(feed)

    def _start_feed(self) -> None:
        c = self.config
        if c.revocation_feed_url is not None and self.feed is None:
            self.feed = revocation_feed.acquire(
                c.revocation_feed_url,
                c.revocation_poll_interval,
                timeout=c.jwks_fetch_timeout,
                max_bytes=c.jwks_max_bytes,
            )
            self._wants_feed = self.feed is None  # outside a loop: try again on the first request

    def bind_config(self, config: GatewayConfig) -> None:
        indexes: dict[str, dict[str, Any]] = {"id": {}, "username": {}, "custom_id": {}}
        for consumer in config.consumers:
            for field, index in indexes.items():
                value = getattr(consumer, field, None)
                if value:
                    index.setdefault(str(value), consumer)
        self._consumers = indexes
        self.token_cache.clear()

    # -- refusals ------------------------------------------------------------------------------

    def _challenge(self, kong: PDK, *params: tuple[str, str]) -> dict[str, str]:
        realm = self.config.realm
        if realm is None:
            host = kong.request.get_host()
            realm = host if _SAFE_REALM.fullmatch(host) else "fhirgate"
        parts = [f'realm="{realm}"', *(f'{k}="{v}"' for k, v in params)]
        return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}

    def _unauthorized(self, kong: PDK) -> NoReturn:
        kong.response.exit(401, {"message": MSG_UNAUTHORIZED}, self._challenge(kong), fhir_code="login")

    def _invalid_request(self, kong: PDK, description: str) -> NoReturn:
        headers = self._challenge(kong, ("error", INVALID_REQUEST), ("error_description", description))
        kong.response.exit(400, {"message": description}, headers, fhir_code="invalid")

    def _invalid_token(self, kong: PDK, description: str) -> NoReturn:
        headers = self._challenge(kong, ("error", INVALID_TOKEN), ("error_description", description))
        kong.response.exit(401, {"message": description}, headers, fhir_code="login")

    def _insufficient_scope(self, kong: PDK) -> NoReturn:
        headers = self._challenge(
            kong,
            ("error", INSUFFICIENT_SCOPE),
            ("error_description", MSG_SCOPE),
            ("scope", self._scope_hint),
        )
        kong.response.exit(403, {"message": MSG_SCOPE}, headers, fhir_code="forbidden")

    # -- access --------------------------------------------------------------------------------

    async def access(self, kong: PDK) -> None:
        if self._wants_feed:
            self._start_feed()
        if not self.config.run_on_preflight and kong.request.get_method() == "OPTIONS":
            return
        anonymous = self.config.anonymous
        if not anonymous:
            await self._authenticate(kong)
            return
        # Kong's logical OR: another plugin already authenticated a credential.
        if kong.client.get_credential() is not None:
            return
        try:
            await self._authenticate(kong)
        except GatewayExit as exc:
            if exc.status >= 500:
                raise  # the issuer is unreachable: not an authentication failure
            consumer = kong.client.load_consumer(anonymous, True)
            if consumer is None:
                kong.response.error(500, f"anonymous consumer {anonymous} is configured but doesn't exist")
            set_consumer(kong, consumer, None)

    async def _token(self, kong: PDK) -> str | None:
        """The one bearer token of the request (RFC 6750 §2: one method only), or None."""
        request = kong.request
        found: list[str] = []
        values = request.get_headers().get("authorization") if self._in_header else None
        if values:
            if len(values) > 1:
                self._invalid_request(kong, MSG_MULTIPLE_HEADERS)
            match = _BEARER.fullmatch(values[0])
            if match is not None:  # another scheme (Basic, ...) carries no bearer token
                credentials = match.group(1)
                if not credentials or _B64TOKEN.fullmatch(credentials) is None:
                    self._invalid_request(kong, MSG_BAD_HEADER)
                found.append(credentials)
        raw_query = request.get_raw_query()
        if raw_query and ACCESS_TOKEN in raw_query:
            in_query = request.get_query().get(ACCESS_TOKEN)
            if in_query:
                if not self._in_query:
                    self._invalid_request(kong, MSG_QUERY_REFUSED)
                found.extend(in_query)
        if self._in_body and request.get_method() not in ("GET", "HEAD"):
            content_type = (request.get_header("content-type") or "").split(";")[0].strip().lower()
            if content_type == "application/x-www-form-urlencoded":
                try:
                    body = await request.get_raw_body(MAX_FORM_BODY)
                except BodyTooLarge:
                    self._invalid_request(kong, MSG_FORM_TOO_LARGE)
                form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
                found.extend(form.get(ACCESS_TOKEN, ()))
        if len(found) > 1:
            self._invalid_request(kong, MSG_MULTIPLE_TOKENS)
        return found[0] if found else None

    async def _authenticate(self, kong: PDK) -> None:
        token = await self._token(kong)
        if token is None:
            self._unauthorized(kong)
        token_cache = self.token_cache
        cached = token_cache.get(token)  # None when expired, not yet valid or revoked
        if cached is not None:
            if self._key_still_valid(cached):
                leeway = self.config.leeway
                try:
                    check_exp(cached.claims, leeway=leeway)
                    check_nbf(cached.claims, leeway=leeway)
                except ClaimError as exc:
                    self._invalid_token(kong, describe(exc))
                self._admit(kong, token, cached)
                return
            token_cache.discard(token)  # the key changed or must be fetched: verify again
        try:
            jwt = parse_jwt(token)
            check_typ(jwt.header, self._typ)
            claims = jwt.claims
            iss = claims.get("iss")
            if type(iss) is not str or iss not in self._issuers:
                raise ClaimError("iss", "issuer_mismatch", MSG_ISSUER)
            cache = self.cache
            alg = jwt.alg
            kid = jwt.kid
            if "kid" in jwt.header and kid is None:
                raise MalformedTokenError("kid_invalid", "'kid' is not a string")
            key = cache.peek(iss, kid, alg)
            if key is None:
                key = await cache.get(iss, kid, alg)
            verify_signature(jwt, key)
            leeway = self.config.leeway
            check_exp(claims, leeway=leeway)
            check_nbf(claims, leeway=leeway)
            check_iat(claims, leeway=leeway)
            if self._audiences:
                check_aud(claims, self._audiences)
        except TokenError as exc:
            self._invalid_token(kong, describe(exc))
        except JwksUnavailableError as exc:
            kong.response.exit(
                503,
                {"message": MSG_UNAVAILABLE},
                {"Retry-After": str(exc.retry_after)},
                fhir_code="transient",
            )
        if token_cache.is_revoked(claims):
            self._invalid_token(kong, MSG_REVOKED)
        if self._scope_sets:
            granted = _granted_scopes(_claim_at(claims, self.config.scopes_claim))
            if not any(required <= granted for required in self._scope_sets):
                self._insufficient_scope(kong)
        consumer = self._consumer(kong, claims)
        sub = claims.get("sub")
        subject = sub if isinstance(sub, str) and sub else None
        verified = _Verified(
            iss,
            kid,
            alg,
            key,
            claims,
            consumer,
            OidcCredential(subject, iss, getattr(consumer, "id", None)),
            tuple((header, _header_value(claims.get(claim))) for claim, header in self._headers),
        )
        token_cache.put(token, verified, claims)
        self._admit(kong, token, verified)

    def _key_still_valid(self, cached: _Verified) -> bool:
        """Whether the JWKS cache, without a fetch, would still verify the token with the key
        that verified it (not after a refresh, a key removal or the end of the cache period)."""
        try:
            key = self.cache.peek(cached.iss, cached.kid, cached.alg)
        except (TokenError, JwksUnavailableError):
            return False
        return key is cached.key

    def _admit(self, kong: PDK, token: str, verified: _Verified) -> None:
        set_consumer(kong, verified.consumer, verified.credential, identifier=verified.credential.id)
        request = kong.service.request
        for header, value in verified.headers:
            if value is None:
                request.clear_header(header)
            else:
                request.set_header(header, value)
        kong.ctx.shared[SHARED_TOKEN] = token
        kong.ctx.shared[SHARED_CLAIMS] = verified.claims

    def _consumer(self, kong: PDK, claims: Mapping[str, Any]) -> Any:
        path = self.config.consumer_claim
        if not path:
            return None
        value = _claim_at(claims, path)
        if isinstance(value, str | int) and not isinstance(value, bool):
            for field in self.config.consumer_by:
                consumer = self._consumers.get(field, {}).get(str(value))
                if consumer is not None:
                    return consumer
        if self.config.consumer_optional:
            return None
        self._invalid_token(kong, MSG_NO_CONSUMER)
