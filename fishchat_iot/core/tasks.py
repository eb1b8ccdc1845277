"""Background tasks owned by the object that started them: kept in its set until they
end, failures logged (never lost in a task nobody awaits), so its ``stop`` can wait for
or cancel every one of them (``cancel_and_wait``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine, Iterable
from typing import Any


def spawn_owned(
    owner: set[asyncio.Task[Any]],
    coro: Coroutine[Any, Any, Any],
    name: str,
    log: logging.Logger,
) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    owner.add(task)
    task.add_done_callback(functools.partial(_ended, owner, log))
    return task


def _ended(owner: set[asyncio.Task[Any]], log: logging.Logger, task: asyncio.Task[Any]) -> None:
    owner.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], log: logging.Logger, owner: str, rounds: int = 50
) -> None:
    """Cancel ``tasks`` and wait until they end. A task still running 0.2 s after a
    cancel is cancelled again (up to ``rounds`` times, then logged): on Python 3.11 a
    cancel that lands as a driver's own timeout expires (redis-py, pymongo) can be
    swallowed, the call returning or raising its timeout instead, and a retry loop then
    runs on; a single cancel and an ``await`` hung a role's stop until it was killed."""
    tasks = list(tasks)
    pending = [t for t in tasks if not t.done()]
    for _ in range(rounds):
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.2)
        pending = [t for t in pending if not t.done()]
    if pending:
        log.error("%s: tasks would not stop: %s", owner, [t.get_name() for t in pending])
    for task in tasks:
        if task.done() and not task.cancelled():
            with contextlib.suppress(BaseException):
                task.result()  # retrieved: not reported again as never retrieved
