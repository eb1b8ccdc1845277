"""The most efficient client for the gateway's TCP framing: raw ``asyncio.Protocol``
connections (no SDK), every frame pre-encoded, ``batch`` frames per write, acks
batched per read. Replies are read in place: receipts and deliveries are recognised
by their byte prefix and a delivery's id is cut out of it by position, so no frame is
copied or parsed as JSON (orjson per delivery and a bytes copy per frame cost the
client a fifth of its time, and paced the client shares the machine with the server).

Workload: ``pairs`` sender → receiver pairs logged in straight to the msg_server; each
sender sends its share of ``count`` p2p messages, at most ``window`` without a receipt;
each receiver acks what it gets. Done when every message is delivered and every
receipt is back. Latency: from the write of a message's batch to its delivery."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
from array import array
from typing import Any, cast

from device_adapters.tcp.framing import encode_frame

_ACCEPTED = b'{"CmdName":"ACCEPTED"'
_DELIVERY = b'{"CmdName":"RESP_MESSAGE_P2P"'
_LOGIN_OK = b'{"CmdName":"LOGIN_OK"'
_ERROR = b'{"CmdName":"ERROR"'
# Ids per P2P_ACK: the server takes 999 with the device id (1000 arguments). More were
# refused with BAD_ARGS, unnoticed: a read of 1000 deliveries or more (a recipient's
# hold written at once, under overload) was never acked and its receiver stalled.
_ACK_IDS = 999


_length = struct.Struct(">I").unpack_from
_ARG_SEP = b'","'


def _frames(buf: bytearray) -> tuple[list[int], int]:
    """Where each complete frame body in ``buf`` starts and ends (pairs in one flat
    list, no copy of any frame), and how many bytes they take in all."""
    spans: list[int] = []
    pos = 0
    n = len(buf)
    while n - pos >= 4:
        end = pos + 4 + _length(buf, pos)[0]
        if end > n:
            break
        spans += (pos + 4, end)
        pos = end
    return spans, pos


class _Client(asyncio.Protocol):
    def __init__(self, device_id: str, token: str) -> None:
        self.device_id = device_id
        self.token = token
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.logged_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, no isinstance.
        self.transport = t = cast(asyncio.Transport, transport)
        t.write(encode_frame("SEND_CLIENT_ID", [self.device_id, self.token]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.logged_in.done():
            self.logged_in.set_exception(ConnectionError(f"{self.device_id}: closed in login"))
        self.on_lost()

    def on_lost(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        spans, used = _frames(buf)
        if not spans:
            return
        if not self.logged_in.done():
            first = bytes(buf[spans[0] : spans[1]])
            del spans[:2]
            if first.startswith(_LOGIN_OK):
                self.logged_in.set_result(None)
            else:
                self.logged_in.set_exception(ConnectionError(f"{self.device_id}: {first[:200]!r}"))
                return
        if spans:
            self.on_frames(buf, spans)
        del buf[:used]

    def on_frames(self, buf: bytearray, spans: list[int]) -> None:
        """The frames of one read, in place: body k is ``buf[spans[2k]:spans[2k+1]]``."""


class _Sender(_Client):
    def __init__(self, run: _Run, device_id: str, token: str, to: str, n: int) -> None:
        super().__init__(device_id, token)
        self.run = run
        body = "x" * run.payload
        self.batches: list[bytes] = []
        tag = run.tag
        frames = [
            encode_frame("SEND_MESSAGE_P2P", [to, body, device_id, f"{tag}{i}"]) for i in range(n)
        ]
        self.frames = frames if run.rate else []
        for i in range(0, n, run.batch):
            self.batches.append(b"".join(frames[i : i + run.batch]))
        self.n = n
        self.sent = 0
        self.next_batch = 0
        self.receipts = 0
        self.errors = 0
        self.sent_at = array("d", bytes(8 * n))

    def pump(self) -> None:
        t = self.transport
        run = self.run
        if t is None or self.lost:
            return
        while self.next_batch < len(self.batches) and self.sent - self.receipts < run.window:
            now = time.perf_counter()
            b = self.next_batch
            start = b * run.batch
            end = min(self.n, start + run.batch)
            sent_at = self.sent_at
            for i in range(start, end):
                sent_at[i] = now
            t.write(self.batches[b])
            self.sent = end
            self.next_batch += 1

    def send_some(self, k: int) -> None:
        """Paced mode: the next ``k`` messages in one write."""
        t = self.transport
        if t is None or self.lost or self.sent >= self.n:
            return
        i = self.sent
        j = min(self.n, i + k)
        self.sent_at[i:j] = array("d", (time.perf_counter(),)) * (j - i)
        t.write(b"".join(self.frames[i:j]))
        self.sent = j

    def on_frames(self, buf: bytearray, spans: list[int]) -> None:
        receipts = 0
        for k in range(0, len(spans), 2):
            start = spans[k]
            if buf.startswith(_ACCEPTED, start):
                receipts += 1
            elif buf.startswith(_ERROR, start):
                self.errors += 1
                receipts += 1
        self.receipts += receipts
        self.run.receipts += receipts
        if not self.run.rate:
            self.pump()
        self.run.check()


class _Receiver(_Client):
    def __init__(self, run: _Run, device_id: str, token: str, n: int) -> None:
        super().__init__(device_id, token)
        self.run = run
        self.seen = bytearray(n)
        self.delivered = 0
        self.duplicates = 0
        self.stale = 0  # deliveries of an earlier run's messages (acked, not counted)
        self.sender: _Sender | None = None

    def on_frames(self, buf: bytearray, spans: list[int]) -> None:
        now = time.perf_counter()
        ids = []
        sender = self.sender
        assert sender is not None
        lat = self.run.latencies
        sent_at = sender.sent_at
        seen = self.seen
        new = 0
        tag = self.run.tag
        skip = len(tag)
        for k in range(0, len(spans), 2):
            start = spans[k]
            if not buf.startswith(_DELIVERY, start):
                continue
            # RESP_MESSAGE_P2P [body, from, id, ts]: the id is the last argument but
            # one, found from the end (a body may hold anything; the bench's ids and
            # the ts are plain). A sealed delivery (a fifth argument) never comes here.
            end = spans[k + 1]
            b = buf.rfind(_ARG_SEP, start, end)
            msg_id = buf[buf.rfind(_ARG_SEP, start, b) + 3 : b].decode()
            ids.append(msg_id)
            if not msg_id.startswith(tag):
                # An earlier run on the same devices: delivered again because the run
                # ended before the server had its ack (at least once). Ack it, skip it.
                self.stale += 1
                continue
            i = int(msg_id[skip:])
            if seen[i]:
                self.duplicates += 1
                continue
            seen[i] = 1
            new += 1
            lat.append(now - sent_at[i])
        self.delivered += new
        self.run.delivered += new
        if ids and self.transport is not None:
            me = self.device_id
            out = bytearray()
            for k in range(0, len(ids), _ACK_IDS):
                out += encode_frame("P2P_ACK", [me, *ids[k : k + _ACK_IDS]])
            self.transport.write(bytes(out))
        self.run.check()


class _Run:
    def __init__(
        self, count: int, pairs: int, payload: int, batch: int, window: int, rate: float
    ) -> None:
        self.rate = rate
        self.count = count
        self.pairs = pairs
        self.payload = payload
        self.batch = batch
        self.window = window
        self.latencies: array[float] = array("d")
        # Message ids are this tag + a counter: deliveries of another run's messages
        # (same devices) are told apart instead of counted as this run's.
        self.tag = f"{secrets.token_hex(3)}."
        # Totals of the receivers' deliveries and the senders' receipts: check() runs
        # after every read and looks at each client only once these reach count.
        self.delivered = 0
        self.receipts = 0
        self.senders: list[_Sender] = []
        self.receivers: list[_Receiver] = []
        self.done = asyncio.Event()

    def check(self) -> None:
        if self.delivered < self.count or self.receipts < self.count:
            return
        if all(r.delivered == r.seen.__len__() for r in self.receivers) and all(
            s.receipts == s.n for s in self.senders
        ):
            self.done.set()


def pair_ids(pairs: int, prefix: str = "bench") -> list[str]:
    return [f"{prefix}-{k}-{i}" for i in range(pairs) for k in ("tx", "rx")]


async def connect(addr: str, factory: Any, limit: int = 200, within: float = 60.0) -> list[_Client]:
    """Connect and log in every client ``factory()`` makes (a list of callables)."""
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(limit)

    async def one(make: Any) -> _Client:
        async with sem:
            _, proto = await loop.create_connection(make, host, int(port))
            await proto.logged_in
            return proto

    async with asyncio.timeout(within):
        return await asyncio.gather(*(one(m) for m in factory))


async def p2p(
    msg_server: str,
    token: str,
    count: int,
    pairs: int = 20,
    payload: int = 64,
    batch: int = 100,
    window: int = 1000,
    within: float = 120.0,
    on_start: Any = None,
    rate: float = 0.0,
    settle: float = 0.5,
    receivers_at: str = "",
    prefix: str = "bench",
) -> dict[str, Any]:
    """As fast as it goes (``rate`` 0: batches, windowed), or paced: ``rate`` messages a
    second in all (see ``_pace``). ``settle``: seconds between the last login and the
    first send. ``receivers_at``: log the receivers in to this msg_server instead
    (distributed mode: every message crosses nodes). ``prefix``: of the device ids
    (``pair_ids``), so runs on one server need not share devices."""
    run = _Run(count, pairs, payload, batch, window, rate)
    share = [count // pairs + (1 if i < count % pairs else 0) for i in range(pairs)]
    makers: list[Any] = []
    receiver_makers: list[Any] = []
    for i in range(pairs):
        if not share[i]:
            continue
        tx, rx = f"{prefix}-tx-{i}", f"{prefix}-rx-{i}"
        s = _Sender(run, tx, token, rx, share[i])
        r = _Receiver(run, rx, token, share[i])
        r.sender = s
        run.senders.append(s)
        run.receivers.append(r)
        makers.append(lambda s=s: s)
        (receiver_makers if receivers_at else makers).append(lambda r=r: r)
    clients = await connect(msg_server, makers)
    if receiver_makers:
        clients += await connect(receivers_at, receiver_makers)
    # LOGIN_OK comes before a recipient's first (empty) queue read is done; a stream
    # that reaches it in that moment goes through the store and stays there as long as
    # it streams (docs/benchmarks.md, "the login race"). What is measured here is the
    # live path: give the queue feeds a moment (not counted) before the first send.
    await asyncio.sleep(settle)
    pacer: asyncio.Task[None] | None = None
    try:
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        if rate:
            pacer = asyncio.create_task(_pace(run, rate, count))
        else:
            for s in run.senders:
                s.pump()
        deadline = time.perf_counter() + within
        last, moved = -1, time.perf_counter()
        while not run.done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await run.done.wait()
            now = time.perf_counter()
            progress = run.delivered + run.receipts
            if progress != last:
                last, moved = progress, now
            if now > deadline or now - moved > 5.0:  # stalled: the rest is lost
                break
        elapsed = time.perf_counter() - t0
    finally:
        if pacer is not None:
            pacer.cancel()
        for c in clients:
            if c.transport is not None:
                c.transport.close()
    return {
        "delivered": run.delivered,
        "receipts": run.receipts,
        "refused": sum(s.errors for s in run.senders),
        "duplicates": sum(r.duplicates for r in run.receivers),
        "stale": sum(r.stale for r in run.receivers),
        "seconds": elapsed,
        "latencies": run.latencies,
    }


async def _pace(run: _Run, rate: float, count: int) -> None:
    """Every millisecond (the event loop's timer resolution on uvloop), what is due:
    each sender's share in one write (a device that has several messages ready sends
    them together)."""
    senders = run.senders
    t0 = time.perf_counter()
    issued = 0
    while issued < count:
        due = min(count, int((time.perf_counter() - t0) * rate) + 1)
        if due > issued:
            # Message i is sender i % len(senders)'s: each sender's share of
            # issued..due-1 by arithmetic (a loop per message cost the client ~1 µs a
            # message at 100k msgs/s, when it shares the machine with the server).
            for k, n in enumerate(_shares(issued, due, len(senders))):
                if n:
                    senders[k].send_some(n)
            issued = due
        await asyncio.sleep(0.001)


def _shares(start: int, end: int, parts: int) -> list[int]:
    """How many of the numbers start..end-1 are congruent to k modulo ``parts``, for
    each k."""
    base, extra = divmod(end - start, parts)
    first = start % parts  # the residues first, first+1, ... (extra of them) get one more
    return [base + ((k - first) % parts < extra) for k in range(parts)]


async def idle(msg_server: str, ids: list[str], token: str) -> list[_Client]:
    """Log in ``ids`` and leave them connected (the caller closes them)."""
    return await connect(msg_server, [lambda i=i: _Client(i, token) for i in ids], limit=500)
