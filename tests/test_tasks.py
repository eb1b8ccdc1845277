"""Stopping owned tasks (fishchat_iot/core/tasks.py): a task that swallows a cancel, as a
redis-py or pymongo call can on Python 3.11 when the cancel lands as its own timeout
expires, is cancelled again until it ends, so a role's stop does not hang."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fishchat_iot.core.tasks import cancel_and_wait


async def _swallows_cancels(times: int, ended: list[str]) -> None:
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallowed < times:
                swallowed += 1
                continue  # what the driver's timeout did with the cancel
            ended.append("cancelled")
            raise


async def test_a_task_that_swallows_cancels_is_cancelled_until_it_ends() -> None:
    ended: list[str] = []
    task = asyncio.create_task(_swallows_cancels(3, ended))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task], logging.getLogger("test"), "test"), 10)
    assert task.cancelled() and ended == ["cancelled"]


async def test_one_cancel_and_an_await_would_hang_on_it() -> None:
    """Why: what the roles' stop did before."""
    task = asyncio.create_task(_swallows_cancels(1, []))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 0.5)
    await cancel_and_wait([task], logging.getLogger("test"), "test")
    assert task.cancelled()


async def test_a_task_that_will_not_stop_is_reported_not_waited_for_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = asyncio.create_task(_swallows_cancels(5, []))
    await asyncio.sleep(0)
    await cancel_and_wait([task], logging.getLogger("test.tasks"), "the owner", rounds=3)
    assert not task.done()
    assert "the owner: tasks would not stop" in caplog.text
    await cancel_and_wait([task], logging.getLogger("test.tasks"), "the owner")
    assert task.cancelled()
