"""The one module that reads the clock, so tests can inject time."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Wall-clock seconds since the epoch (float). Replace in tests with `set_clock`.
_now: Callable[[], float] = time.time


def now() -> float:
    return _now()


def monotonic() -> float:
    return time.monotonic()


def set_clock(fn: Callable[[], float] | None) -> None:
    """Inject a clock (tests only); `None` restores the real one."""
    global _now
    _now = fn if fn is not None else time.time
