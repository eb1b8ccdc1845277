"""Background tasks owned by the object that started them: kept in its set until they
end, failures logged (never lost in a task nobody awaits), so its ``stop`` can wait for
or cancel every one of them."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
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
