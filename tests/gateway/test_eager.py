"""`run_eagerly`: an async hook that does not wait finishes synchronously; one that waits is
finished by the awaitable returned, with results, exceptions and cancellation intact."""

from __future__ import annotations

import asyncio

import pytest

from fhirgate.errors import GatewayExit
from fhirgate.gateway.eager import run_eagerly

TRACE: list[str] = []


async def no_wait() -> int:
    TRACE.append("ran")
    return 1


async def refuse_at_once() -> None:
    raise GatewayExit(401, {"message": "Unauthorized"})


async def waits(times: int) -> int:
    for _ in range(times):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0)
    return times


async def waits_then_fails() -> None:
    await asyncio.sleep(0.001)
    raise ValueError("after waiting")


def test_a_hook_that_does_not_wait_runs_now_without_a_loop() -> None:
    TRACE.clear()
    assert run_eagerly(no_wait()) is None
    assert TRACE == ["ran"]


def test_an_immediate_refusal_propagates_synchronously() -> None:
    with pytest.raises(GatewayExit) as exc:
        run_eagerly(refuse_at_once())
    assert exc.value.status == 401


def test_a_hook_that_waits_is_finished_by_the_returned_awaitable() -> None:
    async def main() -> int:
        pending = run_eagerly(waits(3))
        assert pending is not None
        result: int = await pending
        return result

    assert asyncio.run(main()) == 3


def test_an_exception_after_waiting_reaches_the_awaiter() -> None:
    async def main() -> None:
        pending = run_eagerly(waits_then_fails())
        assert pending is not None
        await pending

    with pytest.raises(ValueError, match="after waiting"):
        asyncio.run(main())


def test_cancelling_the_continuation_cancels_the_hook() -> None:
    cleaned: list[bool] = []

    async def hook() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)

    async def main() -> None:
        pending = run_eagerly(hook())
        assert pending is not None
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cleaned == [True]
