"""Failed-attempt limiting for the login form and the token endpoint (issue 5 §5, §6).

Only failures count (a wrong password, a failed client authentication); successes never do, so a
busy, well-behaved client is never slowed. A key (username, client_id, or either with the caller's
address) with `limit` failures inside `window` seconds is refused until the oldest of them leaves
the window; the refusal says when (Retry-After).

Per worker process and in memory: with N workers an attacker gets at most N x `limit` guesses per
window and node (documented; a shared Redis counter can replace this behind the same methods).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["FailureLimiter"]


class FailureLimiter:
    """`retry_after(key)` before the attempt (seconds to wait, or 0), `failed(key)` after a failure."""

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_keys = max_keys
        self._failures: dict[bytes, deque[float]] = {}

    @staticmethod
    def _digest(key: str) -> bytes:
        """Keys are kept as SHA-256 digests: a caller-chosen client_id or username of any length
        costs 32 bytes here, however many failures are counted."""
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    def _recent(self, key: bytes, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str) -> int:
        """0 when an attempt may go ahead, else whole seconds until it may."""
        now = self._clock()
        times = self._recent(self._digest(key), now)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, key: str) -> None:
        now = self._clock()
        digest = self._digest(key)
        times = self._recent(digest, now)
        if times is None:
            if len(self._failures) >= self._max_keys:  # bounded: forget the oldest key
                self._failures.pop(next(iter(self._failures)))
            times = self._failures[digest] = deque()
        times.append(now)
        if len(times) > self.limit:
            times.popleft()
