"""Per-node counters in shared memory, for `rate-limiting` policy `local` (DECISIONS.md "One node,
several worker processes": `local` counts exactly per node, not per worker).

The table is one anonymous shared mapping (`mmap(-1, ...)`, MAP_SHARED) plus a
`multiprocessing.Lock` (a POSIX semaphore), both created in the master by a before-fork hook, so
every worker inherits the same memory and the same lock; a worker restarted later is forked from
the same master and sees the same counters.

Layout: an open-addressing hash table (linear probing) of fixed 32-byte slots, four int64 each:

    key       64-bit digest of the counter's name (0 means: never used)
    window    start of the counter's fixed window (epoch seconds)
    expires   end of the window (epoch seconds); past it the slot is free to reclaim
    count     hits in the window

A key has one live window at a time: when its stored window is older than the one asked for, the
count starts again from 0 in the same slot. Slots of keys that are not seen again are reclaimed
when a probe passes them after they expired (insertion reuses the first expired slot of the
chain, which keeps chains intact), and by a compaction that rebuilds the table when occupied
slots pass three quarters of it.

`hit()` checks every window of a request against its limit and increments all of them only when
none is exhausted, under one lock acquisition, so N workers never admit more than the limit.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import multiprocessing
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fhirgate.gateway import hooks

if TYPE_CHECKING:
    from multiprocessing.synchronize import Lock

    from fhirgate.settings import Settings

log = logging.getLogger("fhirgate.shm")

__all__ = ["DEFAULT_SLOTS", "CounterTable", "SharedMemoryError", "counter_key", "node_counters"]

#: Default capacity: 131072 slots (4 MiB), i.e. that many live (key, period) counters per node.
DEFAULT_SLOTS = 1 << 17
_SLOT = 4  # int64 fields per slot
_HEADER = 4  # int64 fields of header: [used slots, capacity, reserved, reserved]
_LOCK_TIMEOUT = 1.0  # seconds; a worker killed inside the critical section must not hang the node
_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
_U64 = (1 << 64) - 1


class SharedMemoryError(RuntimeError):
    """The counter table cannot answer (full, or its lock could not be taken in time)."""


def counter_key(*parts: str) -> int:
    """A stable, process-independent 64-bit key (never 0) for a counter named by `parts`."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    key = int.from_bytes(digest, "little", signed=True)
    return key or 1


def derive_key(base: int, index: int) -> int:
    """Key `index` of a family that shares `base` (e.g. one per period), as a signed int64 != 0."""
    mixed = ((base & _U64) ^ ((index + 1) * _MIX)) & _U64
    mixed = mixed - (1 << 64) if mixed >= 1 << 63 else mixed
    return mixed or 1


class CounterTable:
    """Fixed-window hit counters shared by every process forked after its creation."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots < 8 or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= 8")
        self.slots = slots
        self._mask = slots - 1
        self._map = mmap.mmap(-1, (_HEADER + slots * _SLOT) * 8, flags=mmap.MAP_SHARED)
        self._cells = memoryview(self._map).cast("q")
        self._cells[1] = slots
        self._lock: Lock = multiprocessing.Lock()
        self.pid = os.getpid()

    # --- public API ----------------------------------------------------------------------------
    def hit(
        self, counters: Sequence[tuple[int, int, int, float]], now: int, amount: int = 1
    ) -> tuple[list[int], bool]:
        """Check and count one request against several windows, atomically for the whole node.

        `counters` holds ``(key, window_start, window_end, limit)`` per window and `now` is the
        current time (epoch seconds; slots that expired by then may be reclaimed). Returns the usage of
        each window before this request and whether the request was admitted; when any window's
        usage has reached its limit nothing is incremented (a refused request does not count)."""
        lock = self._lock
        # Uncontended (the usual case): no deadline to compute.
        if not lock.acquire(False) and not lock.acquire(timeout=_LOCK_TIMEOUT):
            raise SharedMemoryError("the shared counter table is locked (a worker died holding it?)")
        try:
            cells = self._cells
            if (cells[0] + len(counters)) * 4 > self.slots * 3:
                self._compact(now)
            found: list[int] = []
            usage: list[int] = []
            admitted = True
            for key, window, expires, limit in counters:
                i = self._slot(key, window, expires, now)
                base = _HEADER + i * _SLOT
                used = cells[base + 3] if cells[base + 1] == window else 0
                found.append(base)
                usage.append(used)
                if used >= limit:
                    admitted = False
            if admitted:
                for base, (_key, window, expires, _limit) in zip(found, counters, strict=True):
                    if cells[base + 1] != window:  # a new window for this key: start again
                        cells[base + 1] = window
                        cells[base + 2] = expires
                        cells[base + 3] = 0
                    cells[base + 3] += amount
            return usage, admitted
        finally:
            self._lock.release()

    def incr(self, key: int, window: int, expires: int, now: int, amount: int = 1) -> int:
        """Add `amount` to a counter and return its new value."""
        with self._locked():
            cells = self._cells
            if (cells[0] + 1) * 4 > self.slots * 3:
                self._compact(now)
            base = _HEADER + self._slot(key, window, expires, now) * _SLOT
            if cells[base + 1] != window:
                cells[base + 1] = window
                cells[base + 2] = expires
                cells[base + 3] = 0
            cells[base + 3] += amount
            return int(cells[base + 3])

    def get(self, key: int, window: int) -> int:
        """The count of `key` in `window` (0 if unknown)."""
        with self._locked():
            i = self._find(key)
            if i is None:
                return 0
            base = _HEADER + i * _SLOT
            return int(self._cells[base + 3]) if self._cells[base + 1] == window else 0

    @property
    def used(self) -> int:
        """Occupied slots (live or expired but not yet reclaimed)."""
        return int(self._cells[0])

    def close(self) -> None:
        self._cells.release()
        self._map.close()

    # --- internals (call with the lock held) ---------------------------------------------------
    def _locked(self) -> _Held:
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT):
            raise SharedMemoryError("the shared counter table is locked (a worker died holding it?)")
        return _Held(self._lock)

    def _find(self, key: int) -> int | None:
        cells, mask = self._cells, self._mask
        i = key & mask
        for _ in range(self.slots):
            stored = cells[_HEADER + i * _SLOT]
            if stored == key:
                return i
            if stored == 0:
                return None
            i = (i + 1) & mask
        return None

    def _slot(self, key: int, window: int, expires: int, now: int) -> int:
        """The slot of `key`, claiming one (reusing the first expired slot of the chain) if new."""
        cells, mask = self._cells, self._mask
        i = key & mask
        reuse = -1
        for _ in range(self.slots):
            base = _HEADER + i * _SLOT
            stored = cells[base]
            if stored == key:
                return i
            if stored == 0:
                break
            if reuse < 0 and cells[base + 2] <= now:  # its window is over
                reuse = i
            i = (i + 1) & mask
        else:
            if reuse < 0:
                raise SharedMemoryError(f"the shared counter table is full ({self.slots} live counters)")
        if reuse >= 0:
            i = reuse
        else:
            cells[0] += 1
        base = _HEADER + i * _SLOT
        cells[base] = key
        cells[base + 1] = window
        cells[base + 2] = expires
        cells[base + 3] = 0
        return i

    def _compact(self, now: int) -> None:
        """Drop every expired slot and rebuild the chains."""
        cells, mask = self._cells, self._mask
        live: list[tuple[int, int, int, int]] = []
        for i in range(self.slots):
            base = _HEADER + i * _SLOT
            if cells[base] != 0 and cells[base + 2] > now:
                live.append((cells[base], cells[base + 1], cells[base + 2], cells[base + 3]))
        end = _HEADER + self.slots * _SLOT
        cells[_HEADER:end] = memoryview(bytes((end - _HEADER) * 8)).cast("q")
        for key, window, expires, count in live:
            i = key & mask
            while cells[_HEADER + i * _SLOT] != 0:
                i = (i + 1) & mask
            base = _HEADER + i * _SLOT
            cells[base], cells[base + 1], cells[base + 2], cells[base + 3] = key, window, expires, count
        cells[0] = len(live)
        log.info("shared counter table compacted: %d live counters of %d slots", len(live), self.slots)


class _Held:
    __slots__ = ("_lock",)

    def __init__(self, lock: Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


# --- the node's table ---------------------------------------------------------------------------

_node_table: CounterTable | None = None


def node_counters() -> CounterTable:
    """The node's shared counter table (created before the workers fork; created here, process
    local, when no node set one up, e.g. a gateway built directly in a test)."""
    global _node_table
    table = _node_table
    if table is None:
        log.debug("no node-wide counter table: creating one for this process only")
        table = _node_table = CounterTable()
    return table


def _create_before_fork(_settings: Settings) -> None:
    """Master, before forking: a fresh table for this node (a new node starts from zero)."""
    global _node_table
    _node_table = CounterTable()  # a previous table is freed once nothing refers to it


hooks.on_before_fork("shm.counters", _create_before_fork)
