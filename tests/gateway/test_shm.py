"""The node's shared-memory counter table (`fhirgate.gateway.shm`)."""

from __future__ import annotations

import os

import pytest

from fhirgate.gateway import hooks, shm
from fhirgate.gateway.shm import CounterTable, SharedMemoryError, counter_key, derive_key
from fhirgate.settings import Settings

NOW = 1_700_000_000


def _forked(n_children: int, work: object) -> list[int]:
    """Run `work()` (returning an int) in `n_children` forked processes; their results."""
    assert callable(work)
    children: list[tuple[int, int]] = []
    for _ in range(n_children):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                os.write(w, str(work()).encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))
    results = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        results.append(int(data))
    return results


def test_incr_counts_and_get_reads() -> None:
    table = CounterTable(64)
    key = counter_key("plugin", "10.0.0.1")
    assert table.get(key, NOW) == 0
    assert table.incr(key, NOW, NOW + 60, NOW) == 1
    assert table.incr(key, NOW, NOW + 60, NOW, amount=4) == 5
    assert table.get(key, NOW) == 5


def test_a_new_window_starts_from_zero_in_the_same_slot() -> None:
    table = CounterTable(64)
    key = counter_key("plugin", "a")
    table.incr(key, NOW, NOW + 1, NOW, amount=3)
    assert table.incr(key, NOW + 1, NOW + 2, NOW + 1) == 1
    assert table.get(key, NOW) == 0
    assert table.used == 1


def test_hit_refuses_at_the_limit_without_counting_the_refused_request() -> None:
    table = CounterTable(64)
    sec, minute = derive_key(1, 0), derive_key(1, 1)
    windows = [(sec, NOW, NOW + 1, 2.0), (minute, NOW - 20, NOW + 40, 3.0)]
    assert table.hit(windows, NOW) == ([0, 0], True)
    assert table.hit(windows, NOW) == ([1, 1], True)
    assert table.hit(windows, NOW) == ([2, 2], False)  # second window exhausted
    assert table.get(minute, NOW - 20) == 2  # refused request not counted
    later = [(sec, NOW + 1, NOW + 2, 2.0), (minute, NOW - 20, NOW + 40, 3.0)]
    assert table.hit(later, NOW + 1) == ([0, 2], True)
    assert table.hit(later, NOW + 1) == ([1, 3], False)  # minute window exhausted


def test_keys_are_stable_and_distinct() -> None:
    assert counter_key("p", "a") == counter_key("p", "a")
    assert counter_key("p", "a") != counter_key("p", "b")
    assert counter_key("pa", "") != counter_key("p", "a")
    assert len({derive_key(counter_key("p", "a"), i) for i in range(6)}) == 6
    assert all(derive_key(k, 0) != 0 for k in range(-5, 5))


def test_expired_slots_are_reclaimed_so_a_small_table_keeps_working() -> None:
    table = CounterTable(16)
    for t in range(200):  # 1000 distinct keys over 200 seconds, 5 live at a time
        for i in range(5):
            key = counter_key("p", f"{t}-{i}")
            assert table.incr(key, NOW + t, NOW + t + 1, NOW + t) == 1
        assert table.used <= 12
    # live counters survive reclamation and compaction
    for i in range(5):
        assert table.get(counter_key("p", f"199-{i}"), NOW + 199) == 1


def test_a_table_full_of_live_counters_refuses_with_an_error() -> None:
    table = CounterTable(8)
    for i in range(8):
        table.incr(counter_key("p", str(i)), NOW, NOW + 60, NOW)
    with pytest.raises(SharedMemoryError, match="full"):
        table.incr(counter_key("p", "one more"), NOW, NOW + 60, NOW)


def test_slot_count_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        CounterTable(100)


def test_forked_processes_share_counters_exactly() -> None:
    table = CounterTable(1024)
    key = counter_key("plugin", "shared")
    n = 5000

    def work() -> int:
        for _ in range(n):
            table.incr(key, NOW, NOW + 60, NOW)
        return 0

    _forked(2, work)
    assert table.get(key, NOW) == 2 * n


def test_forked_processes_never_admit_more_than_the_limit_together() -> None:
    table = CounterTable(1024)
    windows = [(counter_key("plugin", "limited"), NOW, NOW + 60, 1500.0)]

    def work() -> int:
        return sum(1 for _ in range(1000) if table.hit(windows, NOW)[1])

    admitted = _forked(2, work)
    assert sum(admitted) == 1500
    assert table.get(windows[0][0], NOW) == 1500


def test_the_node_table_is_created_before_fork_and_replaced_per_node() -> None:
    hooks.run_before_fork(Settings(workers=1))
    first = shm.node_counters()
    first.incr(counter_key("x"), NOW, NOW + 1, NOW)
    hooks.run_before_fork(Settings(workers=1))
    second = shm.node_counters()
    assert second is not first
    assert second.get(counter_key("x"), NOW) == 0
