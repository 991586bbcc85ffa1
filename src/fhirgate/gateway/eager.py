"""Run a coroutine eagerly: synchronously until it really has to wait.

An `async def` plugin hook often does not wait at all on its common path (an openid-connect key
already cached, a body already read). Run that way, it costs no task and no event-loop round trip;
only when it suspends does the rest of it continue in a task. This is what Python 3.12's
`asyncio.eager_task_factory` does for tasks, applied to one hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_eagerly(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any] | None:
    """Drive `coro` until it finishes (return None; its exceptions propagate now) or suspends
    (return an awaitable that finishes it)."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return _finish(coro, yielded)


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)  # a bare yield: give the loop one turn
            else:
                # The future the coroutine is waiting on. Its own `await` marked it blocking, as a
                # task would see it; a task clears the mark before waiting on it, so do we.
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:  # deliver the failure (or cancellation) into the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
