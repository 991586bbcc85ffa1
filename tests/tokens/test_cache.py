"""`fhirgate.tokens.cache`: the verified-token cache and the revocation set, with an injected clock
(no sleeps)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fhirgate import clock
from fhirgate.tokens.cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TTL,
    REVOKED,
    RevocationSet,
    VerifiedTokenCache,
)

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tick() -> Clock:
    return Clock()


def make(
    tick: Clock, size: int = 100, *, max_ttl: float = DEFAULT_MAX_TTL, max_token_length: int = 4096
) -> VerifiedTokenCache[str]:
    return VerifiedTokenCache(
        size, max_ttl=max_ttl, max_token_length=max_token_length, revoked=RevocationSet(), now=tick
    )


def test_defaults() -> None:
    cache: VerifiedTokenCache[str] = VerifiedTokenCache()
    assert cache.max_entries == DEFAULT_MAX_ENTRIES == 10_000
    assert cache.max_ttl == DEFAULT_MAX_TTL
    assert cache.revoked is REVOKED


def test_hit_returns_the_stored_value(tick: Clock) -> None:
    cache = make(tick)
    assert cache.get("t1") is None
    assert cache.put("t1", "v1", {"exp": T0 + 60})
    assert cache.get("t1") == "v1"
    assert cache.stats() == {"entries": 1, "hits": 1, "misses": 1, "evictions": 0}


def test_the_key_is_the_exact_token_string(tick: Clock) -> None:
    cache = make(tick)
    token = "aaa.bbb.ccc"
    cache.put(token, "v", {"exp": T0 + 60})
    for other in ("aaa.bbb.ccd", "aaa.bbb.cc", " aaa.bbb.ccc", "AAA.bbb.ccc", "aaa.bbb.ccc."):
        assert cache.get(other) is None
    assert cache.get(token) == "v"


def test_entry_never_outlives_exp(tick: Clock) -> None:
    cache = make(tick)
    cache.put("t", "v", {"exp": T0 + 10})
    tick.now = T0 + 9.999
    assert cache.get("t") == "v"
    tick.now = T0 + 10  # RFC 7519 §4.1.4: expired at exp
    assert cache.get("t") is None
    assert "t" not in cache  # dropped, not kept
    tick.now = T0  # even if the clock goes back, the entry is gone
    assert cache.get("t") is None


def test_entry_never_outlives_max_ttl(tick: Clock) -> None:
    cache = make(tick, max_ttl=30)
    cache.put("far", "v", {"exp": T0 + 86400})
    cache.put("none", "v", {})  # no exp at all: max_ttl bounds it
    tick.now = T0 + 29.9
    assert cache.get("far") == "v"
    assert cache.get("none") == "v"
    tick.now = T0 + 30
    assert cache.get("far") is None
    assert cache.get("none") is None


def test_nbf_is_rechecked_on_every_hit(tick: Clock) -> None:
    cache = make(tick)
    cache.put("t", "v", {"nbf": T0, "exp": T0 + 60})
    assert cache.get("t") == "v"
    tick.now = T0 - 1  # the clock stepped back: not valid yet
    assert cache.get("t") is None


def test_not_stored_when_outside_its_window(tick: Clock) -> None:
    cache = make(tick)
    assert not cache.put("expired", "v", {"exp": T0})
    assert not cache.put("early", "v", {"nbf": T0 + 1, "exp": T0 + 60})
    assert len(cache) == 0


@pytest.mark.parametrize("value", ["123", True, None, float("nan"), [1]])
def test_non_numeric_exp_falls_back_to_max_ttl(tick: Clock, value: object) -> None:
    cache = make(tick, max_ttl=5)
    assert cache.put("t", "v", {"exp": value, "nbf": value})
    tick.now = T0 + 5
    assert cache.get("t") is None


def test_uses_fhirgate_clock_by_default() -> None:
    now = [T0]
    clock.set_clock(lambda: now[0])
    try:
        cache: VerifiedTokenCache[str] = VerifiedTokenCache(revoked=RevocationSet())
        cache.put("t", "v", {"exp": T0 + 1})
        assert cache.get("t") == "v"
        now[0] = T0 + 1
        assert cache.get("t") is None
    finally:
        clock.set_clock(None)


def test_bounded_least_recently_used_goes_first(tick: Clock) -> None:
    cache = make(tick, size=3)
    claims = {"exp": T0 + 60}
    for t in ("a", "b", "c"):
        cache.put(t, t, claims)
    assert cache.get("a") == "a"  # a is now the most recent
    cache.put("d", "d", claims)  # evicts b
    assert len(cache) == 3
    assert "b" not in cache
    assert [cache.get(t) for t in ("a", "c", "d")] == ["a", "c", "d"]
    assert cache.evictions == 1
    cache.put("c", "c2", claims)  # replacing does not evict
    assert cache.evictions == 1
    assert cache.get("c") == "c2"


def test_size_zero_disables_and_long_tokens_are_not_cached(tick: Clock) -> None:
    off = make(tick, size=0)
    assert not off.put("t", "v", {"exp": T0 + 60})
    assert off.get("t") is None
    small = make(tick, max_token_length=10)
    assert not small.put("x" * 11, "v", {"exp": T0 + 60})
    assert small.put("x" * 10, "v", {"exp": T0 + 60})


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        VerifiedTokenCache(-1)
    with pytest.raises(ValueError):
        VerifiedTokenCache(max_ttl=-1)


def test_revoked_jti_is_never_a_hit(tick: Clock) -> None:
    cache = make(tick)
    cache.put("t1", "v1", {"exp": T0 + 60, "jti": "id-1"})
    cache.put("t2", "v2", {"exp": T0 + 60, "jti": "id-2"})
    cache.put("t3", "v3", {"exp": T0 + 60})  # no jti: cannot be revoked
    cache.revoke("id-1")
    assert cache.get("t1") is None
    assert "t1" not in cache
    assert cache.get("t2") == "v2"
    assert cache.get("t3") == "v3"
    assert cache.is_revoked({"jti": "id-1"})
    assert not cache.is_revoked({"jti": "id-2"})
    assert not cache.is_revoked({})
    assert not cache.put("t1", "v1", {"exp": T0 + 60, "jti": "id-1"})  # not stored again


def test_non_string_jti_is_ignored(tick: Clock) -> None:
    cache = make(tick)
    cache.revoked.revoke("1")
    assert cache.put("t", "v", {"exp": T0 + 60, "jti": 1})
    assert cache.get("t") == "v"
    assert not cache.is_revoked({"jti": 1})


def test_revocation_set_is_shared_by_caches_and_pruned_after_exp(tick: Clock) -> None:
    revoked = RevocationSet()
    old: VerifiedTokenCache[str] = VerifiedTokenCache(revoked=revoked, now=tick)
    new: VerifiedTokenCache[str] = VerifiedTokenCache(revoked=revoked, now=tick)  # after a reload
    old.revoke("id-1", until=T0 + 60)
    revoked.revoke("id-2")
    assert new.is_revoked({"jti": "id-1"})
    assert len(revoked) == 2
    assert revoked.prune(T0 + 59) == 0
    assert revoked.prune(T0 + 60) == 1  # the token is expired anyway: forget the id
    assert "id-1" not in revoked
    assert "id-2" in revoked  # revoked without an end
    revoked.unrevoke("id-2")
    assert len(revoked) == 0
    revoked.revoke("id-3", until=T0 + 10)
    revoked.revoke("id-3", until=T0 + 5)  # a second revocation never shortens the first
    assert revoked.prune(T0 + 6) == 0


def test_clear_and_discard(tick: Clock) -> None:
    cache = make(tick)
    for t in ("a", "b", "c"):
        cache.put(t, t, {"exp": T0 + 60})
    cache.discard("a")
    cache.discard("zzz")
    assert cache.get("a") is None
    cache.clear()
    assert len(cache) == 0
    assert cache.get("b") is None


@pytest.fixture
def _no_global_revocations() -> Iterator[None]:
    yield
    REVOKED.clear()


@pytest.mark.usefixtures("_no_global_revocations")
def test_default_revocation_set_is_the_process_wide_one() -> None:
    a: VerifiedTokenCache[str] = VerifiedTokenCache()
    b: VerifiedTokenCache[str] = VerifiedTokenCache()
    a.revoke("shared")
    assert b.is_revoked({"jti": "shared"})
