"""The `jwt` plugin's verified-token cache, through a running gateway with an injected clock: a hit
gives what a verification gives, an expired or revoked token is refused even when cached, a
different string is never a hit, and a reload starts from an empty cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhirgate import clock
from fhirgate.gateway.plugins.jwt.handler import Handler
from fhirgate.tokens.cache import REVOKED
from tests.harness import GatewayHandle, Reply, Upstream, running_gateway
from tests.tokens.jwtkit import keypair, sign

T0 = 1_700_000_000.0
KEY = "rs256-issuer"
INVALID = 'Bearer error="invalid_token"'
CONSUMER_HEADERS = ("x-consumer-id", "x-consumer-custom-id", "x-consumer-username", "x-credential-identifier")


def config(upstream_url: str, pem: str | None = None, **plugin: Any) -> dict[str, Any]:
    plugin.setdefault("claims_to_verify", ["exp"])
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": "s1",
                "url": upstream_url,
                "routes": [{"name": "r1", "paths": ["/"], "plugins": [{"name": "jwt", "config": plugin}]}],
            }
        ],
        "consumers": [
            {
                "username": "alice",
                "custom_id": "a-1",
                "jwt_secrets": [
                    {
                        "key": KEY,
                        "algorithm": "RS256",
                        "rsa_public_key": pem or keypair("rsa").public_pem,
                    }
                ],
            }
        ],
    }


def token(**claims: Any) -> str:
    body = {"iss": KEY, "iat": int(T0), "exp": int(T0) + 3600, **claims}
    return sign(body, "RS256", keypair("rsa").private)


class Now:
    def __init__(self) -> None:
        self.value = T0

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def now() -> Iterator[Now]:
    fake = Now()
    clock.set_clock(fake)
    try:
        yield fake
    finally:
        clock.set_clock(None)


@pytest.fixture
def echo(upstream: Upstream) -> Upstream:
    upstream.handler = lambda req: Reply(body=json.dumps({"headers": dict(req.headers)}).encode())
    return upstream


def handler(gw: GatewayHandle) -> Handler:
    found = [s.handler for s in gw.gateway.state.pipeline.specs if isinstance(s.handler, Handler)]
    assert len(found) == 1
    return found[0]


def call(gw: GatewayHandle, tok: str, **headers: str) -> httpx.Response:
    return httpx.get(gw.url + "/fhir/Patient/1", headers={"Authorization": f"Bearer {tok}", **headers})


def upstream_consumer_headers(res: httpx.Response) -> dict[str, str | None]:
    assert res.status_code == 200, res.text
    seen: dict[str, str] = res.json()["headers"]
    return {h: seen.get(h) for h in (*CONSUMER_HEADERS, "x-anonymous-consumer")}


@pytest.mark.usefixtures("now")
def test_a_hit_gives_the_same_upstream_headers(echo: Upstream) -> None:
    tok = token()
    with running_gateway(config(echo.url)) as gw:
        cache = handler(gw).token_cache
        first = upstream_consumer_headers(call(gw, tok))
        assert tok in cache
        second = upstream_consumer_headers(call(gw, tok))
        # a client's own copies are removed on a hit as on a miss
        forged = upstream_consumer_headers(
            call(gw, tok, **{"X-Consumer-ID": "forged", "X-Anonymous-Consumer": "true"})
        )
        assert cache.hits == 2
    assert first == second == forged
    assert first["x-consumer-username"] == "alice"
    assert first["x-consumer-custom-id"] == "a-1"
    assert first["x-credential-identifier"] == KEY
    assert first["x-anonymous-consumer"] is None


def test_a_cached_token_that_expires_is_refused(echo: Upstream, now: Now) -> None:
    tok = token(exp=int(T0) + 60)
    with running_gateway(config(echo.url)) as gw:
        cache = handler(gw).token_cache
        assert call(gw, tok).status_code == 200
        now.value = T0 + 59
        assert call(gw, tok).status_code == 200
        assert cache.hits == 1
        now.value = T0 + 60
        seen = len(echo.requests)
        res = call(gw, tok)
        assert len(echo.requests) == seen, "the upstream must see nothing"
        assert tok not in cache
    assert res.status_code == 401
    assert res.json() == {"exp": "token expired"}
    assert res.headers["www-authenticate"] == INVALID


def test_nbf_and_maximum_expiration_still_apply_on_a_hit(echo: Upstream, now: Now) -> None:
    tok = token(nbf=int(T0), exp=int(T0) + 120)
    cfg = config(echo.url, claims_to_verify=["exp", "nbf"], maximum_expiration=300)
    with running_gateway(cfg) as gw:
        cache = handler(gw).token_cache
        assert call(gw, tok).status_code == 200
        assert call(gw, tok).status_code == 200
        assert cache.hits == 1
        now.value = T0 - 1  # the clock stepped back before nbf
        early = call(gw, tok)
        now.value = T0 - 400  # ... and so far back that exp is beyond maximum_expiration
        far = call(gw, tok)
    assert (early.status_code, early.json()) == (401, {"nbf": "token not valid yet"})
    assert (far.status_code, far.json()) == (401, {"nbf": "token not valid yet"})
    assert cache.hits == 1


def test_maximum_expiration_is_checked_on_the_hit_path(echo: Upstream, now: Now) -> None:
    """A hit re-runs the configured claim checks on the cached claims (here, maximum_expiration
    after the clock stepped back, which the cache window alone does not catch)."""
    tok = token(exp=int(T0) + 200)
    with running_gateway(config(echo.url, maximum_expiration=300)) as gw:
        cache = handler(gw).token_cache
        assert call(gw, tok).status_code == 200
        now.value = T0 - 150  # exp is now 350 s ahead; the cache window (exp, max_ttl) still holds
        res = call(gw, tok)
        assert cache.hits == 1
    assert (res.status_code, res.json()) == (401, {"exp": "exceeds maximum allowed expiration"})


@pytest.mark.usefixtures("now")
def test_a_different_string_is_never_a_hit(echo: Upstream) -> None:
    tok = token(sub="patient-1")
    head, payload, sig = tok.split(".")
    tampered_payload = token(sub="patient-2").split(".")[1]
    with running_gateway(config(echo.url)) as gw:
        cache = handler(gw).token_cache
        assert call(gw, tok).status_code == 200
        seen = len(echo.requests)
        bad = call(gw, f"{head}.{tampered_payload}.{sig}")
        # the same token with the signature's last character changed
        flipped = call(gw, f"{head}.{payload}.{sig[:-1]}{'A' if sig[-1] != 'A' else 'Q'}")
        assert len(echo.requests) == seen
        assert cache.hits == 0
        assert len(cache) == 1
    assert (bad.status_code, bad.json()) == (401, {"message": "Invalid signature"})
    assert flipped.status_code == 401
    assert flipped.json()["message"] in ("Invalid signature", "Bad token; invalid signature")


@pytest.mark.usefixtures("now")
def test_a_reload_with_a_changed_credential_drops_old_entries(echo: Upstream) -> None:
    tok = token()
    with running_gateway(config(echo.url)) as gw:
        old = handler(gw)
        assert call(gw, tok).status_code == 200
        assert call(gw, tok).status_code == 200
        assert old.token_cache.hits == 1
        gw.reload(config(echo.url, pem=keypair("rsa#2").public_pem))  # the issuer rotated its key
        new = handler(gw)
        assert new is not old
        assert len(new.token_cache) == 0
        seen = len(echo.requests)
        res = call(gw, tok)
        assert len(echo.requests) == seen
    assert (res.status_code, res.json()) == (401, {"message": "Invalid signature"})


@pytest.fixture
def _clean_revocations() -> Iterator[None]:
    REVOKED.clear()
    yield
    REVOKED.clear()


@pytest.mark.usefixtures("now", "_clean_revocations")
def test_a_revoked_jti_is_refused_cached_or_not(echo: Upstream) -> None:
    cached = token(jti="jti-cached")
    fresh = token(jti="jti-fresh")
    with running_gateway(config(echo.url)) as gw:
        cache = handler(gw).token_cache
        assert call(gw, cached).status_code == 200
        cache.revoke("jti-cached")
        REVOKED.revoke("jti-fresh", until=T0 + 3600)
        seen = len(echo.requests)
        res_cached = call(gw, cached)
        res_fresh = call(gw, fresh)
        assert len(echo.requests) == seen
        assert fresh not in cache
        survivor = call(gw, token(jti="jti-other"))
    for res in (res_cached, res_fresh):
        assert (res.status_code, res.json()) == (401, {"message": "Token revoked"})
        assert res.headers["www-authenticate"] == INVALID
    assert survivor.status_code == 200


@pytest.mark.usefixtures("now")
def test_without_exp_in_claims_to_verify_an_expired_token_is_still_accepted_as_in_kong(
    echo: Upstream, now: Now
) -> None:
    """Kong's default (`claims_to_verify` empty) accepts an expired token; the cache keeps that
    behaviour (it just never serves the expired entry: the token is verified again)."""
    tok = token(exp=int(T0) + 10)
    with running_gateway(config(echo.url, claims_to_verify=[])) as gw:
        cache = handler(gw).token_cache
        assert call(gw, tok).status_code == 200
        now.value = T0 + 20
        assert call(gw, tok).status_code == 200
        assert cache.hits == 0
        assert tok not in cache
