"""What a sender is told about one message, once everything it waits for is done: the
live deliveries it waits to be acked (``delivery.receipt = "acked"``), the store or
bus hand-offs under way. One ``Receipt`` per message that cannot be answered at once."""

from __future__ import annotations

from collections.abc import Callable


class Receipt:
    """Starts holding one unit (the sending itself); ``hold`` adds one per thing to wait
    for, ``release`` ends one, keeping the first error. When the last unit is released,
    ``on_done(code, text)`` runs once (code "" = accepted)."""

    __slots__ = ("code", "on_done", "text", "waiting")

    def __init__(self, on_done: Callable[[str, str], None]) -> None:
        self.waiting = 1
        self.code = ""
        self.text = ""
        self.on_done = on_done

    def hold(self) -> None:
        self.waiting += 1

    def release(self, code: str = "", text: str = "") -> None:
        if code and not self.code:
            self.code, self.text = code, text
        self.waiting -= 1
        if self.waiting == 0:
            self.on_done(self.code, self.text)


class AckWait:
    """The receipts waiting for one live delivery to be acked, and since when
    (``time.monotonic()``): past ``delivery.ack_wait`` the delivery is stored instead."""

    __slots__ = ("receipts", "since")

    def __init__(self, receipt: Receipt, since: float) -> None:
        self.receipts = [receipt]
        self.since = since

    def release(self) -> None:
        for r in self.receipts:
            r.release()
