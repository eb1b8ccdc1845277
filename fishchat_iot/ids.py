"""Cheap unique ids: a random per-process prefix plus a counter (uuid4 per message
cost ~2 us on the hot path, DESIGN section 9)."""

from __future__ import annotations

import itertools
import os
import time


class IdGenerator:
    """Ids like ``k3f9a1c2-1a``: 8 random hex digits, then a hex counter."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = (prefix if prefix is not None else os.urandom(4).hex()) + "-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


class OrderKeys:
    """Strictly increasing order keys: wall-clock nanoseconds, bumped past the last
    one handed out so two messages in the same nanosecond (or a clock step back)
    still get increasing keys. Survives restarts because it starts from the clock."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now = time.time_ns()
        last = self._last + 1
        key = now if now > last else last
        self._last = key
        return key
