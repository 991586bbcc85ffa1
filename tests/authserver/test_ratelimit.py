"""The failure limiter: only failures count, a key is refused after `limit` of them in the window,
and caller-chosen keys cost a fixed size (a 60 KB client_id cannot grow the server's memory)."""

from __future__ import annotations

from fhirgate.authserver.ratelimit import FailureLimiter


def test_limit_window_and_retry_after() -> None:
    now = [1000.0]
    limiter = FailureLimiter(3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("c\x00addr") == 0
        limiter.failed("c\x00addr")
    assert limiter.retry_after("c\x00addr") == 60
    assert limiter.retry_after("other\x00addr") == 0
    now[0] += 59.5
    assert limiter.retry_after("c\x00addr") == 1
    now[0] += 1
    assert limiter.retry_after("c\x00addr") == 0


def test_keys_cost_a_fixed_size_and_are_bounded() -> None:
    limiter = FailureLimiter(10, max_keys=100)
    for i in range(300):
        limiter.failed(f"{i}-" + "x" * 60_000)
    assert len(limiter._failures) == 100
    assert all(len(key) == 32 for key in limiter._failures)
