"""The `openid-connect` plugin's verified-token cache, through a running gateway in front of the
local identity provider of `test_openid_connect` (`FakeIdP`): a hit gives what a verification
gives, an expired, revoked or key-less token is refused even when cached, and what was refused
(scopes, consumer) is never cached. The wall clock (`fhirgate.clock`) and the JWKS cache's
monotonic clock are injected."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fhirgate import clock
from fhirgate.tokens.cache import REVOKED
from tests.plugins.test_openid_connect import (  # noqa: F401 - fixtures used by name
    Env,
    assert_refusal,
    idp,
    invalid_token,
    make_env,
    stack,
)
from tests.tokens.test_jwks_cache import public_jwk, token

UNKNOWN_KID = "no key of the issuer matches the token's kid"
EXPIRED = "the token has expired"
REVOKED_MSG = "the token has been revoked"


class WallClock:
    def __init__(self) -> None:
        self.value = float(int(time.time()))

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def now() -> Iterator[WallClock]:
    fake = WallClock()
    clock.set_clock(fake)
    try:
        yield fake
    finally:
        clock.set_clock(None)


@pytest.fixture
def build(request: pytest.FixtureRequest) -> Any:
    """`test_openid_connect`'s `make_env` (imported above, so requested by name here)."""
    return request.getfixturevalue("make_env")


@pytest.fixture
def env(build: Any) -> Env:
    result: Env = build(
        consumer_claim=["preferred_username"],
        upstream_headers_claims=["sub", "scope", "groups"],
        upstream_headers_names=["X-User", "X-Scopes", "X-Groups"],
    )
    return result


def claims(env: Env, now: WallClock, **extra: Any) -> dict[str, Any]:
    t = int(now.value)
    base: dict[str, Any] = {"iat": t, "exp": t + 60, "preferred_username": "alice", "groups": ["a", "b"]}
    return env.claims(**{**base, **extra})


def test_a_hit_gives_the_same_upstream_headers_as_a_miss(env: Env, now: WallClock) -> None:
    cache = env.handler().token_cache
    tok = token("rsa", "k1", claims(env, now))
    miss = env.ok(tok)
    assert tok in cache
    assert (cache.hits, cache.misses) == (0, 1)
    hit = env.ok(tok)
    assert cache.hits == 1
    assert hit == miss
    assert miss["x-consumer-username"] == "alice"
    assert miss["x-consumer-custom-id"] == "c-alice"
    assert miss["x-credential-identifier"] == "alice"
    assert (miss["x-user"], miss["x-scopes"], miss["x-groups"]) == ("alice", "openid patient/*.read", "a,b")
    # a client's own copies are removed or replaced on a hit as on a miss
    forged = env.ok(tok, headers=[("X-Consumer-Username", "mallory"), ("X-Anonymous-Consumer", "true")])
    assert forged == miss
    assert cache.hits == 2
    assert env.idp.jwks_fetches == 1


def test_a_claim_header_cleared_on_a_miss_is_cleared_on_a_hit(env: Env, now: WallClock) -> None:
    tok = token("rsa", "k1", claims(env, now, groups=None))
    for _ in range(2):
        assert "x-groups" not in env.ok(tok, headers=[("X-Groups", "admins")])
    assert env.handler().token_cache.hits == 1


def test_a_cached_token_that_expires_is_refused(env: Env, now: WallClock) -> None:
    cache = env.handler().token_cache
    tok = token("rsa", "k1", claims(env, now))
    env.ok(tok)
    env.ok(tok)
    assert cache.hits == 1
    now.value += 60
    assert_refusal(env.refused(tok), 401, invalid_token(EXPIRED), EXPIRED)
    assert tok not in cache


def test_leeway_applies_to_a_cached_token(build: Any, now: WallClock) -> None:
    env: Env = build(leeway=10)
    cache = env.handler().token_cache
    tok = token("rsa", "k1", claims(env, now))
    env.ok(tok)
    now.value += 65  # past exp, inside the leeway: accepted (verified again, not cached again)
    env.ok(tok)
    assert tok not in cache
    now.value += 5
    assert_refusal(env.refused(tok), 401, invalid_token(EXPIRED), EXPIRED)


def test_a_cached_token_whose_key_was_removed_by_a_refetch_is_refused(env: Env, now: WallClock) -> None:
    jwks_clock = env.clock()
    cache = env.handler().token_cache
    old = token("rsa", "k1", claims(env, now))
    env.ok(old)
    env.ok(old)
    assert cache.hits == 1
    # the IdP rotates: k1 gone. Another token's unknown kid (after the cool-down) refetches the
    # JWKS before the cache period of the old key set ends.
    env.idp.keys = [public_jwk("rsa#2", "k2")]
    jwks_clock.advance(31)
    env.ok(token("rsa#2", "k2", claims(env, now)))
    assert env.idp.jwks_fetches == 2
    assert_refusal(env.refused(old), 401, invalid_token(UNKNOWN_KID), UNKNOWN_KID)
    assert old not in cache


def test_a_cached_token_whose_key_was_removed_at_the_end_of_the_cache_period_is_refused(
    env: Env, now: WallClock
) -> None:
    jwks_clock = env.clock()
    old = token("rsa", "k1", claims(env, now, exp=int(now.value) + 3600))
    env.ok(old)
    env.idp.keys = [public_jwk("rsa#2", "k2")]
    env.ok(old)  # the key set is still fresh: a hit
    assert env.handler().token_cache.hits == 1
    jwks_clock.advance(300)  # max-age=300: the next request refreshes the key set
    assert_refusal(env.refused(old), 401, invalid_token(UNKNOWN_KID), UNKNOWN_KID)
    assert env.idp.jwks_fetches == 2


def test_a_refresh_that_keeps_the_key_verifies_once_more_then_hits(env: Env, now: WallClock) -> None:
    jwks_clock = env.clock()
    cache = env.handler().token_cache
    tok = token("rsa", "k1", claims(env, now, exp=int(now.value) + 3600))
    env.ok(tok)
    first = cache.get(tok)
    jwks_clock.advance(300)
    env.ok(tok)  # new key objects after the refresh: verified again, a new entry
    assert env.idp.jwks_fetches == 2
    second = cache.get(tok)
    assert first is not None
    assert second is not None
    assert second is not first
    assert second.key is not first.key
    hits = cache.hits
    env.ok(tok)
    assert cache.hits == hits + 1
    assert cache.get(tok) is second


def test_a_revoked_token_is_refused_cached_or_not(env: Env, now: WallClock) -> None:
    cached = token("rsa", "k1", claims(env, now, jti="oidc-cache-1"))
    fresh = token("rsa", "k1", claims(env, now, jti="oidc-cache-2"))
    env.ok(cached)
    REVOKED.revoke("oidc-cache-1")
    REVOKED.revoke("oidc-cache-2")
    try:
        assert_refusal(env.refused(cached), 401, invalid_token(REVOKED_MSG), REVOKED_MSG)
        assert_refusal(env.refused(fresh), 401, invalid_token(REVOKED_MSG), REVOKED_MSG)
    finally:
        REVOKED.unrevoke("oidc-cache-1")
        REVOKED.unrevoke("oidc-cache-2")
    env.ok(cached)


def test_refused_tokens_are_not_cached(build: Any, now: WallClock) -> None:
    env: Env = build(scopes_required=["fhir.write"], consumer_claim=["preferred_username"])
    cache = env.handler().token_cache
    no_scope = token("rsa", "k1", claims(env, now))
    stranger = token("rsa", "k1", claims(env, now, scope="fhir.write", preferred_username="bob"))
    for _ in range(2):
        assert env.refused(no_scope).status_code == 403
        assert env.refused(stranger).status_code == 401
    assert len(cache) == 0
    assert cache.hits == 0


def test_a_different_string_is_never_a_hit(env: Env, now: WallClock) -> None:
    cache = env.handler().token_cache
    tok = token("rsa", "k1", claims(env, now))
    env.ok(tok)
    head, payload, signature = tok.split(".")
    tampered = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    res = env.refused(tampered)
    assert res.status_code == 401
    assert cache.hits == 0
