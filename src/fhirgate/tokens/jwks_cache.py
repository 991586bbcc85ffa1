"""Per-issuer discovery and JWKS cache (OpenID Connect Discovery 1.0 §4, RFC 8414 §3, RFC 7517).

One `JwksCache` holds the signing keys of one issuer: it finds the issuer's `jwks_uri` through its
metadata document, fetches the JWK Set (and any extra JWKS URIs), and answers "which key verifies
a token with this `kid` and `alg`" without I/O while the keys are fresh. It knows nothing about
HTTP requests to the gateway; fetching goes through an injectable function (default:
`HttpFetcher`, httpx) and time through an injectable monotonic clock, so every rule below is
testable without sleeping.

Rules (issue 3, RFC 8725 §3.1/§3.10):

- lifetime from the response's `Cache-Control: max-age`, clamped to [`min_ttl`, `max_ttl`]
  (`default_ttl` without one); when it has passed, the next lookup refreshes first;
- a `kid` the cache does not know triggers at most one refetch per `refetch_cooldown` (per cache,
  so per worker), however many such tokens arrive; concurrent lookups share one fetch (single
  flight);
- a failed refresh keeps the keys already cached (stale-if-error) and is not retried before the
  cool-down; with no keys at all (cold start) lookups raise `JwksUnavailableError`, which says when
  to retry: the token is not proven bad, the issuer is unreachable;
- keys with `use` other than `sig`, or `key_ops` without `verify`, are dropped; a key with an `alg`
  verifies only that `alg`; symmetric (`oct`) keys are never read from a JWKS;
- keys are bound to their issuer: a cache answers only for its issuer's `iss`;
- a token without `kid` is verified only when the set holds exactly one signing key: with several,
  it is refused rather than tried against each key;
- a key removed from the JWKS stops verifying after the next successful refresh;
- fetching (`HttpFetcher`): TLS verified, redirects only to the same scheme, host and port (at most
  three), a size cap enforced while streaming, no compressed bodies, a total time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import orjson

from fhirgate import __version__, clock
from fhirgate.errors import FhirgateError
from fhirgate.tokens.errors import AlgorithmNotAllowedError, TokenError
from fhirgate.tokens.jwk import Jwk, JwkError, parse_jwks
from fhirgate.tokens.keys import VerificationKey, public_key

__all__ = [
    "MAX_BYTES",
    "OAUTH_WELL_KNOWN",
    "OIDC_WELL_KNOWN",
    "CacheSettings",
    "CachedKey",
    "FetchError",
    "Fetched",
    "HttpFetcher",
    "JwksCache",
    "JwksUnavailableError",
    "KeySelectionError",
    "discovery_urls",
    "parse_max_age",
]

log = logging.getLogger("fhirgate.tokens.jwks")

OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"
#: Largest discovery document or JWKS accepted (real ones are a few KiB).
MAX_BYTES = 512 * 1024
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# -- errors -------------------------------------------------------------------------------------


class FetchError(FhirgateError):
    """A document could not be fetched or is not what it should be. One-line `message`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JwksUnavailableError(FhirgateError):
    """No key of the issuer is known and the issuer cannot be reached (cold start): the token
    cannot be checked now. `retry_after` is in whole seconds (at least 1)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class KeySelectionError(TokenError):
    """No cached key may verify the token. Codes: ``unknown_kid``, ``kid_required``,
    ``alg_not_allowed``, ``issuer_mismatch``."""


# -- fetching -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetched document and how long it may be cached (seconds from `Cache-Control`, or None)."""

    body: bytes
    max_age: float | None = None


Fetch = Callable[[str], Awaitable[Fetched]]

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:[=,]|$)", re.IGNORECASE)


def parse_max_age(cache_control: str | None) -> float | None:
    """The freshness lifetime a `Cache-Control` header gives (RFC 9111 §5.2.2.1): `max-age`, 0 for
    `no-store`/`no-cache`, None when it says nothing (the caller's default then applies)."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


class HttpFetcher:
    """GET a JSON document with httpx: TLS verified, at most `max_bytes` (counted while reading),
    `timeout` seconds in all, redirects only to the same scheme, host and port (at most
    `max_redirects`), identity encoding only (no decompression bombs). A new client per fetch:
    fetches are rare and off the request path's fast lane, and a client is bound to its loop."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_bytes: int = MAX_BYTES,
        max_redirects: int = MAX_REDIRECTS,
        transport: Any = None,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._transport = transport

    async def __call__(self, url: str) -> Fetched:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise FetchError(f"{url}: no complete answer within {self.timeout:g} s") from None

    async def _fetch(self, url: str) -> Fetched:
        import httpx

        origin = _origin(url)
        headers = {
            "Accept": "application/json, application/jwk-set+json",
            "Accept-Encoding": "identity",
            "User-Agent": f"fhirgate/{__version__}",
        }
        async with httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, verify=True, transport=self._transport
        ) as client:
            current = url
            for _ in range(self.max_redirects + 1):
                try:
                    async with client.stream("GET", current, headers=headers) as response:
                        if response.status_code in _REDIRECTS:
                            location = response.headers.get("location")
                            if not location:
                                raise FetchError(f"{url}: redirect without Location")
                            target = urljoin(current, location)
                            if _origin(target) != origin:
                                raise FetchError(
                                    f"{url}: redirected to another host or scheme ({_origin(target)[1]}), "
                                    "which is refused"
                                )
                            current = target
                            continue
                        if response.status_code != 200:
                            raise FetchError(f"{url}: HTTP status {response.status_code}")
                        body = await self._read(url, response)
                        return Fetched(body, parse_max_age(response.headers.get("cache-control")))
                except httpx.HTTPError as exc:
                    raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
            raise FetchError(f"{url}: more than {self.max_redirects} redirects")

    async def _read(self, url: str, response: Any) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"{url}: Content-Encoding {encoding} refused (identity was asked)")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError(f"{url}: {declared} bytes, more than the {self.max_bytes} allowed")
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_raw():
            total += len(chunk)
            if total > self.max_bytes:
                raise FetchError(f"{url}: more than the {self.max_bytes} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)


# -- discovery ----------------------------------------------------------------------------------


def discovery_urls(issuer: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """For a configured `issuer` (an issuer identifier, or the URL of its metadata document):
    the metadata URLs to try in order, and the issuer identifiers the document may name.

    OpenID Connect Discovery §4: ``<issuer>/.well-known/openid-configuration``; RFC 8414 §3:
    ``https://host/.well-known/oauth-authorization-server<path>`` (and the appended form some
    servers use). A trailing slash is part of an issuer identifier (Auth0's has one) but cannot be
    seen in a metadata URL, so both forms are accepted; the document's `issuer` then decides.
    """
    parts = urlsplit(issuer)
    path = parts.path
    if path.endswith(OIDC_WELL_KNOWN):
        base = urlunsplit((parts.scheme, parts.netloc, path[: -len(OIDC_WELL_KNOWN)], "", ""))
        return (issuer,), frozenset({base, base + "/"})
    if path.startswith(OAUTH_WELL_KNOWN):
        rest = path[len(OAUTH_WELL_KNOWN) :]
        base = urlunsplit((parts.scheme, parts.netloc, rest, "", ""))
        return (issuer,), frozenset({base.rstrip("/"), base.rstrip("/") + "/"})
    if path.endswith(OAUTH_WELL_KNOWN):
        base = urlunsplit((parts.scheme, parts.netloc, path[: -len(OAUTH_WELL_KNOWN)], "", ""))
        return (issuer,), frozenset({base, base + "/"})
    trimmed = path.rstrip("/")
    oidc = urlunsplit((parts.scheme, parts.netloc, trimmed + OIDC_WELL_KNOWN, "", ""))
    oauth = urlunsplit((parts.scheme, parts.netloc, OAUTH_WELL_KNOWN + trimmed, "", ""))
    base = urlunsplit((parts.scheme, parts.netloc, trimmed, "", ""))
    return (oidc, oauth), frozenset({base, base + "/"})


# -- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Lifetimes in seconds. `rediscovery_lifetime`: the metadata document is fetched again on a
    refresh when it is older than this (Kong's `rediscovery_lifetime`)."""

    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    default_ttl: float = 300.0
    refetch_cooldown: float = 30.0
    rediscovery_lifetime: float = 30.0


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A JWK usable for signatures, parsed once, with where it came from."""

    jwk: Jwk
    key: VerificationKey
    source: str

    @property
    def kid(self) -> str | None:
        return self.jwk.kid


@dataclass(frozen=True, slots=True)
class _Snapshot:
    issuer: str
    keys: tuple[CachedKey, ...]
    by_kid: dict[str, tuple[CachedKey, ...]]
    expires_at: float


@dataclass(slots=True)
class _Discovery:
    issuer: str
    jwks_uri: str
    fetched_at: float


def _usable_keys(body: bytes, source: str) -> list[CachedKey]:
    keyset = parse_jwks(body)
    out: list[CachedKey] = []
    for jwk in keyset.keys:
        algorithms = jwk.algorithms  # empty for `use: enc`, key_ops without verify, foreign alg
        if not algorithms:
            continue
        try:
            out.append(CachedKey(jwk, public_key(jwk.key, algorithms), source))
        except TokenError:  # e.g. an alg the verification core does not implement (ES256K)
            continue
    return out


@dataclass(slots=True)
class _State:
    snapshot: _Snapshot | None = None
    discovery: _Discovery | None = None
    last_attempt: float = -math.inf
    retry_at: float = -math.inf
    inflight: asyncio.Task[None] | None = None
    fetches: int = 0
    last_error: str | None = field(default=None)


class JwksCache:
    """The signing keys of one issuer. `issuer` is the issuer identifier or its metadata URL;
    `jwks_uri` skips discovery (the issuer identifier must then be given); `extra_jwks_uris` are
    more key sources trusted for the same issuer; `aliases` are other `iss` values these keys may
    verify (Kong's `issuers_allowed`, e.g. Entra's v1 and v2 issuers share keys). Not thread-safe:
    one per event loop (worker)."""

    def __init__(
        self,
        issuer: str,
        *,
        jwks_uri: str | None = None,
        extra_jwks_uris: Collection[str] = (),
        aliases: Collection[str] = (),
        settings: CacheSettings | None = None,
        fetch: Fetch | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.configured_issuer = issuer
        self._discovery_urls, self.possible_issuers = discovery_urls(issuer)
        self._jwks_uri = jwks_uri
        self._extra = tuple(dict.fromkeys(extra_jwks_uris))
        self._aliases = frozenset(aliases)
        self.settings = settings or CacheSettings()
        self._fetch: Fetch = fetch or HttpFetcher()
        #: The monotonic clock lifetimes are measured with (replaceable, e.g. by tests).
        self.monotonic: Callable[[], float] = monotonic or clock.monotonic
        self._state = _State()
        if jwks_uri is not None:
            self.possible_issuers = frozenset({issuer})

    # -- introspection (tests, status) --------------------------------------------------------

    @property
    def issuer(self) -> str | None:
        """The issuer identifier, once its metadata has been read (or given with `jwks_uri`)."""
        if self._jwks_uri is not None:
            return self.configured_issuer
        discovery = self._state.discovery
        return discovery.issuer if discovery is not None else None

    @property
    def keys(self) -> tuple[CachedKey, ...]:
        snapshot = self._state.snapshot
        return snapshot.keys if snapshot is not None else ()

    @property
    def fetches(self) -> int:
        """How many refreshes have been started (for tests and metrics)."""
        return self._state.fetches

    # -- lookups ------------------------------------------------------------------------------

    def peek(self, iss: str, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for a token of issuer `iss` with this `kid` and `alg`, answered without I/O;
        None when a fetch must come first (then `await get(...)`). Raises `KeySelectionError`
        (no usable key, and no refetch allowed now) or `JwksUnavailableError`."""
        state = self._state
        now = self.monotonic()
        snapshot = state.snapshot
        if snapshot is None:
            if state.inflight is not None or now >= state.retry_at:
                return None
            raise self._unavailable(now)
        if iss != snapshot.issuer and iss not in self._aliases:
            raise KeySelectionError("issuer_mismatch", "the token's issuer does not own these keys")
        if now >= snapshot.expires_at and now >= state.retry_at:
            return None
        key = self._select(snapshot, kid, alg)
        if key is not None:
            return key
        if state.inflight is not None or now >= state.last_attempt + self.settings.refetch_cooldown:
            return None  # an unknown kid: one refetch per cool-down, shared by concurrent lookups
        raise KeySelectionError("unknown_kid", "no key of the issuer has the token's kid")

    async def get(self, iss: str, kid: str | None, alg: str) -> VerificationKey:
        """`peek`, fetching first when needed (single flight). Raises as `peek`."""
        key = self.peek(iss, kid, alg)
        if key is not None:
            return key
        await self.refresh()
        snapshot = self._state.snapshot
        if snapshot is None:
            raise self._unavailable(self.monotonic())
        if iss != snapshot.issuer and iss not in self._aliases:
            raise KeySelectionError("issuer_mismatch", "the token's issuer does not own these keys")
        key = self._select(snapshot, kid, alg)
        if key is None:
            raise KeySelectionError("unknown_kid", "no key of the issuer has the token's kid")
        return key

    def _unavailable(self, now: float) -> JwksUnavailableError:
        wait = max(1, math.ceil(self._state.retry_at - now))
        return JwksUnavailableError("the issuer's signing keys could not be fetched", wait)

    @staticmethod
    def _select(snapshot: _Snapshot, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for (`kid`, `alg`), None if `kid` is unknown; raises when the key exists but
        may not be used (RFC 8725 §3.1: the key decides the algorithm)."""
        if kid is None:
            if len(snapshot.keys) != 1:
                raise KeySelectionError(
                    "kid_required", "the token has no kid and the issuer has several keys"
                )
            candidates: tuple[CachedKey, ...] = snapshot.keys
        else:
            found = snapshot.by_kid.get(kid)
            if found is None:
                return None
            candidates = found
        for candidate in candidates:
            if alg in candidate.key.algorithms:
                return candidate.key
        raise AlgorithmNotAllowedError("alg_not_allowed", f"the issuer's key does not allow '{alg}'")

    # -- refreshing ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch the keys now, or join the fetch in flight. Never raises for fetch problems: they
        are logged, the previous keys stay (stale-if-error) and the next attempt waits for the
        cool-down."""
        state = self._state
        task = state.inflight
        if task is None:
            state.last_attempt = self.monotonic()
            state.fetches += 1
            task = state.inflight = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(self._done)
        # shield: a request that goes away does not cancel the fetch others are waiting for
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._state.inflight is task:
            self._state.inflight = None
        if not task.cancelled():
            task.exception()  # _refresh catches everything; this only marks the result as seen

    async def _refresh(self) -> None:
        state = self._state
        try:
            issuer, uris = await self._discover()
            keys: list[CachedKey] = []
            ttl = self.settings.max_ttl
            for uri in uris:
                fetched = await self._fetch(uri)
                try:
                    keys.extend(_usable_keys(fetched.body, uri))
                except JwkError as exc:
                    raise FetchError(f"{uri}: {exc.message}") from None
                ttl = min(ttl, self._ttl(fetched.max_age))
            if not keys:
                raise FetchError(f"{uris[0]}: no key usable for verifying signatures")
        except Exception as exc:  # any failure: back off, keep what is cached
            state.retry_at = self.monotonic() + self.settings.refetch_cooldown
            state.last_error = exc.message if isinstance(exc, FetchError) else repr(exc)
            kept = "keeping the cached keys" if state.snapshot is not None else "no keys cached"
            log.warning(
                "JWKS refresh for %s failed (%s): %s",
                self.configured_issuer,
                kept,
                state.last_error,
                exc_info=not isinstance(exc, FetchError),
            )
            return
        by_kid: dict[str, list[CachedKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        now = self.monotonic()
        state.snapshot = _Snapshot(
            issuer=issuer,
            keys=tuple(keys),
            by_kid={kid: tuple(group) for kid, group in by_kid.items()},
            expires_at=now + ttl,
        )
        state.retry_at = -math.inf
        state.last_error = None

    def _ttl(self, max_age: float | None) -> float:
        s = self.settings
        value = s.default_ttl if max_age is None else max_age
        return min(max(value, s.min_ttl), s.max_ttl)

    async def _discover(self) -> tuple[str, list[str]]:
        """The issuer identifier and the JWKS URIs to read, from the metadata document when it is
        due (or the previous one if fetching it fails, as Kong falls back)."""
        if self._jwks_uri is not None:
            return self.configured_issuer, [self._jwks_uri, *self._extra]
        state = self._state
        current = state.discovery
        now = self.monotonic()
        if current is None or now - current.fetched_at >= self.settings.rediscovery_lifetime:
            try:
                state.discovery = current = await self._read_metadata()
            except FetchError as exc:
                if current is None:
                    raise
                log.warning("rediscovery for %s failed, using the previous metadata: %s", current.issuer, exc)
        return current.issuer, [current.jwks_uri, *self._extra]

    async def _read_metadata(self) -> _Discovery:
        errors: list[str] = []
        for url in self._discovery_urls:
            try:
                fetched = await self._fetch(url)
            except FetchError as exc:
                errors.append(exc.message)
                continue
            return self._parse_metadata(url, fetched.body)
        raise FetchError("; ".join(errors) or "no metadata URL")

    def _parse_metadata(self, url: str, body: bytes) -> _Discovery:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FetchError(f"{url}: not JSON") from None
        if not isinstance(doc, dict):
            raise FetchError(f"{url}: not a JSON object")
        issuer = doc.get("issuer")
        # OpenID Connect Discovery §4.3, RFC 8414 §3.3: the document's issuer MUST be the one
        # the metadata URL was built from, or the document may be an impostor's.
        if not isinstance(issuer, str) or issuer not in self.possible_issuers:
            raise FetchError(f"{url}: its issuer does not match the configured issuer")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise FetchError(f"{url}: no http(s) jwks_uri")
        if urlsplit(url).scheme == "https" and urlsplit(jwks_uri).scheme != "https":
            raise FetchError(f"{url}: jwks_uri is not https")
        return _Discovery(issuer, jwks_uri, self.monotonic())
