"""Group commit for the store and bus calls off the fast path: what many sessions submit
while a call is under way goes out together as the next call, one at a time in
submission order. With a remote store (MongoDB) a call costs round trips, not bytes:
one ``enqueue`` of 300 envelopes costs about what one of a single envelope does."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await submit(items)`` -> the results for ``items``, from one call of ``run`` on
    the concatenation of every submission waiting (at most ``max_items`` per call,
    whole submissions only). An exception of ``run`` goes to every submitter of that
    call. Its worker task lives while submissions wait and ends with them."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] | None = None,
        max_items: int = 1000,
    ) -> None:
        self._run = run
        self._spawn = spawn or asyncio.ensure_future  # the owner's, so its stop() ends it
        self._max = max_items
        self._waiting: collections.deque[tuple[Sequence[T], asyncio.Future[Sequence[R]]]] = (
            collections.deque()
        )
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[T]) -> Sequence[R]:
        fut: asyncio.Future[Sequence[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, fut))
        if self._worker is None:
            self._worker = self._spawn(self._work())
        return await fut

    async def _work(self) -> None:
        try:
            while self._waiting:
                batch: list[tuple[Sequence[T], asyncio.Future[Sequence[R]]]] = []
                n = 0
                while self._waiting and (not batch or n + len(self._waiting[0][0]) <= self._max):
                    entry = self._waiting.popleft()
                    batch.append(entry)
                    n += len(entry[0])
                flat = [item for items, _ in batch for item in items]
                try:
                    results = await self._run(flat)
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                except BaseException:
                    for _, fut in batch:
                        fut.cancel()
                    raise
                start = 0
                for items, fut in batch:
                    if not fut.done():
                        fut.set_result(results[start : start + len(items)])
                    start += len(items)
        finally:
            self._worker = None
            if self._waiting:  # cancelled while others waited: they are not left hanging
                for _, fut in self._waiting:
                    fut.cancel()
                self._waiting.clear()
