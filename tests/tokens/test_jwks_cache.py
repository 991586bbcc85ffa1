"""`fhirgate.tokens.jwks_cache`: discovery, key selection, lifetimes, rotation, cool-down,
single flight, stale-if-error, cold-start outage, issuer binding (with an injected fetch function
and clock), and the HTTP fetcher's limits against a real local server (redirects, size caps).

`FakeIdP` (a real HTTP server on 127.0.0.1 serving discovery and a JWKS, whose keys can be
rotated and which counts requests) is shared with the `openid-connect` plugin tests."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fhirgate.tokens.errors import AlgorithmNotAllowedError
from fhirgate.tokens.jwks_cache import (
    CacheSettings,
    Fetched,
    FetchError,
    HttpFetcher,
    JwksCache,
    JwksUnavailableError,
    KeySelectionError,
    discovery_urls,
    parse_max_age,
)
from fhirgate.tokens.jws import parse_jwt
from fhirgate.tokens.verify import verify_signature
from tests.tokens.jwtkit import b64, keypair, sign

ISSUER = "https://idp.test/realms/r"
JWKS_URI = "https://idp.test/realms/r/jwks"
DISCOVERY = ISSUER + "/.well-known/openid-configuration"


# -- helpers shared with tests/plugins/test_openid_connect.py ------------------------------------


def public_jwk(key_name: str, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of one of jwtkit's keys (RSA or EC P-256/384/521)."""
    public = keypair(key_name).public
    numbers = public.public_numbers()
    jwk: dict[str, Any]
    if key_name.startswith("rsa"):
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        jwk = {"kty": "RSA", "n": b64(n), "e": b64(e)}
    else:
        size = {"p256": 32, "p384": 48, "p521": 66}[key_name.split("#")[0]]
        crv = {"p256": "P-256", "p384": "P-384", "p521": "P-521"}[key_name.split("#")[0]]
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": b64(numbers.x.to_bytes(size, "big")),
            "y": b64(numbers.y.to_bytes(size, "big")),
        }
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def token(key_name: str, kid: str | None, claims: dict[str, Any], alg: str = "RS256", **header: Any) -> str:
    h: dict[str, Any] = {"alg": alg, "typ": "at+jwt", **header}
    if kid is not None:
        h["kid"] = kid
    return sign(claims, alg, keypair(key_name).private, h)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stops reading (size caps, time limits) is expected here


class FakeIdP:
    """A real HTTP server on 127.0.0.1: `/.well-known/openid-configuration` (or RFC 8414's
    `/.well-known/oauth-authorization-server`) and `/jwks`. Set `keys` to rotate, `down` to answer
    503, `overrides[path]` to answer a path by hand; `paths` lists every request received."""

    def __init__(self, *, rfc8414: bool = False) -> None:
        self.keys: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.down = False
        self.cache_control: str | None = "max-age=300"
        self.rfc8414 = rfc8414
        self.issuer_override: str | None = None
        self.overrides: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.gate: threading.Event | None = None  # when set, /jwks waits for it
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.url

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for p in self.paths if p == path)

    @property
    def jwks_fetches(self) -> int:
        return self.count("/jwks")

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, cache: str | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        if cache:
            h.send_header("Cache-Control", cache)
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        with self._lock:
            self.paths.append(path)
        if self.down:
            self._send(h, 503, b'{"error":"down"}')
            return
        override = self.overrides.get(path)
        if override is not None:
            override(h)
            return
        well_known = (
            "/.well-known/oauth-authorization-server" if self.rfc8414 else "/.well-known/openid-configuration"
        )
        if path == well_known:
            doc = {"issuer": self.issuer_override or self.issuer, "jwks_uri": self.url + "/jwks"}
            self._send(h, 200, json.dumps(doc).encode(), "max-age=300")
        elif path == "/jwks":
            if self.gate is not None:
                self.gate.wait(5)
            self._send(h, 200, json.dumps({"keys": self.keys}).encode(), self.cache_control)
        else:
            self._send(h, 404, b'{"error":"not found"}')

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    server = FakeIdP()
    try:
        yield server
    finally:
        server.close()


# -- an injected fetch function and clock --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeFetch:
    """url -> document; `fail` makes every fetch raise; `calls` lists the URLs fetched."""

    def __init__(self, issuer: str = ISSUER, jwks_uri: str = JWKS_URI) -> None:
        self.calls: list[str] = []
        self.fail = False
        self.max_age: float | None = 300
        self.keys: list[dict[str, Any]] = []
        self.issuer = issuer
        self.jwks_uri = jwks_uri
        self.gate: asyncio.Event | None = None

    async def __call__(self, url: str) -> Fetched:
        self.calls.append(url)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise FetchError(f"{url}: down")
        if url.endswith("/.well-known/openid-configuration"):
            return Fetched(json.dumps({"issuer": self.issuer, "jwks_uri": self.jwks_uri}).encode(), 300)
        if url == self.jwks_uri:
            return Fetched(json.dumps({"keys": self.keys}).encode(), self.max_age)
        raise FetchError(f"{url}: 404")

    @property
    def jwks_calls(self) -> int:
        return self.calls.count(self.jwks_uri)


def make_cache(fetch: FakeFetch, clock: Clock, **settings: float) -> JwksCache:
    return JwksCache(ISSUER, settings=CacheSettings(**settings), fetch=fetch, monotonic=clock)


CLAIMS = {"iss": ISSUER, "sub": "alice"}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def verifies(cache: JwksCache, tok: str) -> bool:
    """Whether `tok` verifies with the key the cache selects (fetching as needed)."""
    jwt = parse_jwt(tok)

    async def go() -> bool:
        key = await cache.get(jwt.claims["iss"], jwt.kid, jwt.alg)
        verify_signature(jwt, key)
        return True

    return bool(run(go()))


# -- pure helpers ------------------------------------------------------------------------------


def test_max_age_from_cache_control() -> None:
    assert parse_max_age("public, max-age=3600") == 3600
    assert parse_max_age('max-age="60", must-revalidate') == 60
    assert parse_max_age("no-store") == 0
    assert parse_max_age("no-cache, max-age=600") == 0
    assert parse_max_age("s-maxage=50") is None
    assert parse_max_age(None) is None
    assert parse_max_age("max-age=abc") is None


def test_discovery_urls_for_an_issuer_and_for_metadata_urls() -> None:
    urls, issuers = discovery_urls("https://idp.test/realms/r")
    assert urls == (
        "https://idp.test/realms/r/.well-known/openid-configuration",
        "https://idp.test/.well-known/oauth-authorization-server/realms/r",
    )
    assert issuers == {"https://idp.test/realms/r", "https://idp.test/realms/r/"}
    urls, issuers = discovery_urls("https://t.auth0.test/.well-known/openid-configuration")
    assert urls == ("https://t.auth0.test/.well-known/openid-configuration",)
    assert issuers == {"https://t.auth0.test", "https://t.auth0.test/"}
    urls, issuers = discovery_urls("https://as.test/.well-known/oauth-authorization-server/tenant")
    assert issuers == {"https://as.test/tenant", "https://as.test/tenant/"}


# -- selection -----------------------------------------------------------------------------------


def test_discovers_then_verifies_with_the_key_of_the_kid() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1", alg="RS256", use="sig"), public_jwk("p256", "k2")]
    cache = make_cache(fetch, clock)
    assert verifies(cache, token("rsa", "k1", CLAIMS))
    assert verifies(cache, token("p256", "k2", CLAIMS, alg="ES256"))
    assert fetch.calls == [DISCOVERY, JWKS_URI]  # one discovery, one JWKS, then from memory
    assert cache.issuer == ISSUER
    assert cache.peek(ISSUER, "k1", "RS256") is not None


def test_keys_for_encryption_are_never_used() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "enc", use="enc"), public_jwk("p256", "sig")]
    cache = make_cache(fetch, clock)
    with pytest.raises(KeySelectionError) as info:
        verifies(cache, token("rsa", "enc", CLAIMS))
    assert info.value.code == "unknown_kid"
    assert [k.kid for k in cache.keys] == ["sig"]


def test_a_key_with_an_alg_verifies_only_that_alg() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1", alg="PS256")]
    cache = make_cache(fetch, clock)
    with pytest.raises(AlgorithmNotAllowedError):
        verifies(cache, token("rsa", "k1", CLAIMS, alg="RS256"))
    assert verifies(cache, token("rsa", "k1", CLAIMS, alg="PS256"))


def test_no_kid_is_refused_when_the_issuer_has_several_keys() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1"), public_jwk("rsa#2", "k2")]
    cache = make_cache(fetch, clock)
    with pytest.raises(KeySelectionError) as info:
        verifies(cache, token("rsa", None, CLAIMS))
    assert info.value.code == "kid_required"
    fetch.keys = [public_jwk("rsa", None)]
    single = make_cache(fetch, clock)
    assert verifies(single, token("rsa", None, CLAIMS))


def test_keys_are_bound_to_their_issuer() -> None:
    clock = Clock()
    fetch_a = FakeFetch()
    fetch_a.keys = [public_jwk("rsa", "a1")]
    fetch_b = FakeFetch("https://other.test", "https://other.test/jwks")
    fetch_b.keys = [public_jwk("rsa#2", "b1")]
    cache_a = make_cache(fetch_a, clock)
    cache_b = JwksCache("https://other.test", fetch=fetch_b, monotonic=clock)
    assert verifies(cache_b, token("rsa#2", "b1", {"iss": "https://other.test"}))
    # iss=A, signed with B's key (B's kid): A's cache does not know it, B's refuses A's iss
    forged = token("rsa#2", "b1", CLAIMS)
    with pytest.raises(KeySelectionError) as info:
        verifies(cache_a, forged)
    assert info.value.code == "unknown_kid"
    with pytest.raises(KeySelectionError) as info:
        run(cache_b.get(ISSUER, "b1", "RS256"))
    assert info.value.code == "issuer_mismatch"


def test_a_metadata_document_naming_another_issuer_is_refused() -> None:
    fetch, clock = FakeFetch(issuer="https://evil.test"), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    cache = make_cache(fetch, clock)
    with pytest.raises(JwksUnavailableError):
        run(cache.get(ISSUER, "k1", "RS256"))
    assert fetch.jwks_calls == 0


# -- lifetimes, rotation, cool-down ---------------------------------------------------------------


def test_lifetime_is_max_age_clamped_to_floor_and_ceiling() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    fetch.max_age = 5  # below the floor of 60 s
    cache = make_cache(fetch, clock, min_ttl=60, max_ttl=3600)
    run(cache.get(ISSUER, "k1", "RS256"))
    clock.advance(59)
    assert cache.peek(ISSUER, "k1", "RS256") is not None
    clock.advance(1)
    assert cache.peek(ISSUER, "k1", "RS256") is None  # due: the next lookup fetches
    fetch.max_age = 10**9  # above the ceiling
    run(cache.get(ISSUER, "k1", "RS256"))
    clock.advance(3599)
    assert cache.peek(ISSUER, "k1", "RS256") is not None
    clock.advance(1)
    assert cache.peek(ISSUER, "k1", "RS256") is None


def test_rotation_new_key_after_refetch_removed_key_after_refresh() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "old")]
    cache = make_cache(fetch, clock, refetch_cooldown=30, min_ttl=60, default_ttl=300)
    assert verifies(cache, token("rsa", "old", CLAIMS))
    fetch.keys = [public_jwk("rsa", "old"), public_jwk("rsa#2", "new")]
    clock.advance(31)
    assert verifies(cache, token("rsa#2", "new", CLAIMS))  # unknown kid -> one refetch
    assert fetch.jwks_calls == 2
    fetch.keys = [public_jwk("rsa#2", "new")]
    assert verifies(cache, token("rsa", "old", CLAIMS))  # still cached until the refresh
    clock.advance(300)
    with pytest.raises(KeySelectionError):
        verifies(cache, token("rsa", "old", CLAIMS))
    assert fetch.jwks_calls == 3


def test_unknown_kids_refetch_at_most_once_per_cooldown() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    cache = make_cache(fetch, clock, refetch_cooldown=30)
    run(cache.get(ISSUER, "k1", "RS256"))
    clock.advance(30)
    for i in range(20):
        with pytest.raises(KeySelectionError):
            run(cache.get(ISSUER, f"unknown-{i}", "RS256"))
        clock.advance(1)  # 20 s in all: still inside the cool-down of the first refetch
    assert fetch.jwks_calls == 2
    clock.advance(10)
    with pytest.raises(KeySelectionError):
        run(cache.get(ISSUER, "unknown-again", "RS256"))
    assert fetch.jwks_calls == 3


def test_concurrent_misses_share_one_fetch() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    cache = make_cache(fetch, clock)

    async def go() -> list[Any]:
        fetch.gate = asyncio.Event()
        lookups = [asyncio.ensure_future(cache.get(ISSUER, "k1", "RS256")) for _ in range(50)]
        await asyncio.sleep(0)
        fetch.gate.set()
        return await asyncio.gather(*lookups, return_exceptions=True)

    results = run(go())
    assert all(r is results[0] for r in results)
    assert fetch.calls == [DISCOVERY, JWKS_URI]
    # and concurrent unknown kids: one refetch for all of them
    clock.advance(30)

    async def misses() -> list[Any]:
        fetch.gate = asyncio.Event()
        lookups = [asyncio.ensure_future(cache.get(ISSUER, f"x{i}", "RS256")) for i in range(50)]
        await asyncio.sleep(0)
        fetch.gate.set()
        return await asyncio.gather(*lookups, return_exceptions=True)

    errors = run(misses())
    assert all(isinstance(e, KeySelectionError) and e.code == "unknown_kid" for e in errors)
    assert fetch.jwks_calls == 2


def test_stale_keys_are_served_when_the_endpoint_is_down() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    cache = make_cache(fetch, clock, refetch_cooldown=30, default_ttl=300)
    assert verifies(cache, token("rsa", "k1", CLAIMS))
    fetch.fail = True
    clock.advance(301)
    assert verifies(cache, token("rsa", "k1", CLAIMS))  # refresh failed: the cached key stays
    calls = len(fetch.calls)
    clock.advance(10)
    assert verifies(cache, token("rsa", "k1", CLAIMS))  # no new attempt inside the cool-down
    assert len(fetch.calls) == calls
    fetch.fail = False
    clock.advance(20)
    assert verifies(cache, token("rsa", "k1", CLAIMS))
    assert len(fetch.calls) > calls


def test_cold_start_outage_is_a_distinct_error_with_retry_after() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    fetch.fail = True
    cache = make_cache(fetch, clock, refetch_cooldown=30)
    with pytest.raises(JwksUnavailableError) as info:
        run(cache.get(ISSUER, "k1", "RS256"))
    assert info.value.retry_after == 30
    calls = len(fetch.calls)
    clock.advance(12)
    with pytest.raises(JwksUnavailableError) as info:
        cache.peek(ISSUER, "k1", "RS256")
    assert info.value.retry_after == 18
    assert len(fetch.calls) == calls  # no fetch storm during the back-off
    fetch.fail = False
    clock.advance(18)
    assert verifies(cache, token("rsa", "k1", CLAIMS))


def test_extra_jwks_uris_add_keys_for_the_same_issuer() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.keys = [public_jwk("rsa", "k1")]
    extra_keys = [public_jwk("p256", "e1")]
    base = fetch.__call__

    async def fetch_with_extra(url: str) -> Fetched:
        if url == "https://keys.test/extra":
            return Fetched(json.dumps({"keys": extra_keys}).encode(), 300)
        return await base(url)

    cache = JwksCache(
        ISSUER, extra_jwks_uris=["https://keys.test/extra"], fetch=fetch_with_extra, monotonic=clock
    )
    assert verifies(cache, token("p256", "e1", CLAIMS, alg="ES256"))
    assert verifies(cache, token("rsa", "k1", CLAIMS))


# -- the HTTP fetcher against a real server -----------------------------------------------------


def test_http_discovery_and_rfc8414_metadata() -> None:
    idp = FakeIdP(rfc8414=True)
    try:
        idp.keys = [public_jwk("rsa", "k1")]
        cache = JwksCache(idp.issuer, fetch=HttpFetcher(timeout=2))
        assert verifies(cache, token("rsa", "k1", {"iss": idp.issuer}))
        # openid-configuration first (404 here), then RFC 8414's well-known URL
        assert idp.paths == [
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
            "/jwks",
        ]
    finally:
        idp.close()


def redirect(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return answer


def test_redirect_to_another_host_is_refused(idp: FakeIdP) -> None:
    other = FakeIdP()
    try:
        other.keys = [public_jwk("rsa", "k1")]
        idp.overrides["/moved"] = redirect(f"http://localhost:{other.port}/jwks")
        with pytest.raises(FetchError, match="another host"):
            run(HttpFetcher(timeout=2)(idp.url + "/moved"))
        assert other.paths == []
    finally:
        other.close()


def test_same_host_redirects_are_followed_up_to_three(idp: FakeIdP) -> None:
    idp.keys = [public_jwk("rsa", "k1")]
    idp.overrides["/a"] = redirect("/b")
    idp.overrides["/b"] = redirect(idp.url + "/c")
    idp.overrides["/c"] = redirect("/jwks")
    fetched = run(HttpFetcher(timeout=2)(idp.url + "/a"))
    assert json.loads(fetched.body)["keys"][0]["kid"] == "k1"
    assert fetched.max_age == 300
    idp.overrides["/z"] = redirect("/a")
    with pytest.raises(FetchError, match="more than 3 redirects"):
        run(HttpFetcher(timeout=2)(idp.url + "/z"))


def test_oversized_bodies_are_refused(idp: FakeIdP) -> None:
    big = b'{"keys":[' + b" " * (600 * 1024) + b"]}"

    def declared(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(big)))
        h.end_headers()
        h.wfile.write(big)

    def undeclared(h: BaseHTTPRequestHandler) -> None:
        h.protocol_version = "HTTP/1.0"  # no length: the body ends when the connection closes
        h.send_response(200)
        h.end_headers()
        h.wfile.write(big)
        h.close_connection = True

    idp.overrides["/declared"] = declared
    idp.overrides["/streamed"] = undeclared
    with pytest.raises(FetchError, match="524288"):
        run(HttpFetcher(timeout=2)(idp.url + "/declared"))
    with pytest.raises(FetchError, match="more than the 524288 bytes"):
        run(HttpFetcher(timeout=2)(idp.url + "/streamed"))


def test_error_status_and_timeout_are_fetch_errors(idp: FakeIdP) -> None:
    idp.down = True
    with pytest.raises(FetchError, match="HTTP status 503"):
        run(HttpFetcher(timeout=2)(idp.url + "/jwks"))
    idp.down = False
    idp.gate = threading.Event()
    try:
        with pytest.raises(FetchError, match=r"within 0\.2 s"):
            run(HttpFetcher(timeout=0.2)(idp.url + "/jwks"))
    finally:
        idp.gate.set()


def test_an_unexpected_fetch_failure_backs_off_like_an_outage() -> None:
    clock = Clock()
    calls: list[str] = []

    async def broken(url: str) -> Fetched:
        calls.append(url)
        raise RuntimeError("bug in a fetch function")

    cache = JwksCache(ISSUER, fetch=broken, monotonic=clock, settings=CacheSettings(refetch_cooldown=30))
    with pytest.raises(JwksUnavailableError):
        run(cache.get(ISSUER, "k1", "RS256"))
    with pytest.raises(JwksUnavailableError):
        run(cache.get(ISSUER, "k1", "RS256"))
    assert calls == [DISCOVERY]
