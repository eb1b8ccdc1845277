"""Waiting for what devices see, with generous timeouts (never as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from firmware_sim.tcp_device import Message


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)


async def receive_n(dev: Any, n: int, timeout: float = 20.0) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            got.append(await dev.receive())
    return got


async def nothing_more(dev: Any, wait: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        msg = await dev.receive(timeout=wait)
        raise AssertionError(f"unexpected message {msg}")
