"""A raw FishChat TCP client for tests: frames built and parsed by hand, no SDK.

Frame: 4-byte big-endian length, then UTF-8 JSON ``{"CmdName": str, "Args": [str]}``.
A background task reads the socket and queues every frame the server sends, so a
``recv`` timeout never loses half a frame, and every frame ever received is kept in
``received`` (a v1 test checks that list against the v1 frame set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

DEFAULT_TIMEOUT = 10.0

# What a v1 session may ever be sent, with the exact argument counts of v1.
V1_FRAMES = {
    "SELECT_MSG_SERVER_FOR_CLIENT": 1,
    "RESP_MESSAGE_P2P": 3,
    "RESP_MESSAGE_TOPIC": 3,
    "LOCATE_TOPIC_MSG_ADDR": 2,
}


class Frame(NamedTuple):
    cmd: str
    args: list[str]


class ConnectionClosed(AssertionError):
    """The server closed the connection while a frame was expected."""


class NoFrame(AssertionError):
    """No frame arrived in time."""


class BadServerFrame(AssertionError):
    """The server sent bytes that are not a valid frame."""


# The ``connect`` fixture: ``await connect(addr, [device_id, token | None], [name=])``.
Connect = Callable[..., Awaitable["RawClient"]]


def encode(cmd: str, *args: Any, newline: bool = True) -> bytes:
    """One frame. ``newline``: end the JSON with a newline counted in the length (as
    the server and the SDK do); v1 clients that do not are served the same."""
    body = json.dumps(
        {"CmdName": cmd, "Args": list(args)}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    if newline:
        body += b"\n"
    return len(body).to_bytes(4, "big") + body


def raw_frame(body: bytes) -> bytes:
    """Any bytes as a frame body, with its length prefix."""
    return len(body).to_bytes(4, "big") + body


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


class RawClient:
    """One TCP connection. ``connect()``, then ``send`` / ``recv`` / ``expect``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = ""
    ) -> None:
        self.reader = reader
        self.writer = writer
        sock = writer.get_extra_info("sockname")
        self.local = f"{sock[0]}:{sock[1]}"  # what the server logs as this peer
        self.name = name or self.local
        self.device_id = ""
        self.msg_server_addr = ""  # where it connected (JOIN_TOPIC answers name it)
        self.received: list[Frame] = []  # every frame the server sent, in order
        self.closed_by_server = False
        self.leftover = b""  # bytes of an incomplete frame at EOF
        self._queue: asyncio.Queue[Frame | BaseException | None] = asyncio.Queue()
        self._eof = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, addr: str, name: str = "", timeout: float = DEFAULT_TIMEOUT
    ) -> RawClient:
        host, port = split_addr(addr)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 22), timeout
        )
        client = cls(reader, writer, name)
        client.msg_server_addr = addr
        return client

    def __repr__(self) -> str:
        return f"<RawClient {self.name}>"

    # -- reading -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while True:
                try:
                    chunk = await self.reader.read(1 << 20)
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                if not chunk:
                    self.leftover = bytes(buf)
                    self.closed_by_server = True
                    self._queue.put_nowait(None)
                    return
                buf += chunk
                while len(buf) >= 4:
                    n = int.from_bytes(buf[:4], "big")
                    if len(buf) < 4 + n:
                        break
                    body = bytes(buf[4 : 4 + n])
                    del buf[: 4 + n]
                    frame = parse_server_frame(body)
                    self.received.append(frame)
                    self._queue.put_nowait(frame)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a malformed frame: the test must see it
            self._queue.put_nowait(exc)

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The next frame; ConnectionClosed at EOF, NoFrame after ``timeout``."""
        if self._eof:
            raise ConnectionClosed(f"{self.name}: connection closed by the server")
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise NoFrame(f"{self.name}: no frame within {timeout:g} s") from None
        if item is None:
            self._eof = True
            raise ConnectionClosed(f"{self.name}: connection closed by the server")
        if isinstance(item, BaseException):
            raise item
        return item

    async def expect(self, cmd: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """The next frame, which must be ``cmd``; returns its args."""
        frame = await self.recv(timeout)
        assert frame.cmd == cmd, f"{self.name}: expected {cmd}, got {frame}"
        return frame.args

    async def expect_error(
        self, code: str, ref: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """The next frame must be ``ERROR [code, text(, ref)]`` with a non-empty text."""
        args = await self.expect("ERROR", timeout)
        assert args[0] == code, f"{self.name}: expected ERROR {code}, got {args}"
        assert len(args) in (2, 3) and args[1].strip(), args
        if ref is not None:
            assert len(args) == 3 and args[2] == ref, f"ERROR should name {ref!r}: {args}"
        return args

    async def expect_closed(self, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """Wait until the server closes the connection; returns the frames it sent
        before closing (those not read yet)."""
        frames: list[Frame] = []
        while True:
            try:
                frames.append(await self.recv(timeout))
            except ConnectionClosed:
                return frames

    async def expect_silence(self, duration: float) -> None:
        """Nothing arrives (and the connection stays open) for ``duration`` seconds.
        Only for asserting an absence; never as synchronisation."""
        try:
            frame = await self.recv(duration)
        except NoFrame:
            return
        raise AssertionError(f"{self.name}: expected nothing, got {frame}")

    @property
    def is_closed(self) -> bool:
        return self._eof or self.closed_by_server

    # -- writing -----------------------------------------------------------------------
    async def send(self, cmd: str, *args: Any, newline: bool = True) -> None:
        await self.send_raw(encode(cmd, *args, newline=newline))

    async def send_frames(self, frames: Iterable[tuple[str, list[Any]]]) -> None:
        """Several frames in one write."""
        await self.send_raw(b"".join(encode(cmd, *args) for cmd, args in frames))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        """Close our side (idempotent, never raises)."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- protocol helpers --------------------------------------------------------------
    async def login(self, device_id: str, token: str) -> None:
        """Token login; the server answers LOGIN_OK [id] first."""
        await self.send("SEND_CLIENT_ID", device_id, token)
        args = await self.expect("LOGIN_OK")
        assert args == [device_id], args
        self.device_id = self.name = device_id

    async def login_v1(self, device_id: str) -> None:
        """v1 login: ``SEND_CLIENT_ID [id]``, no answer (v1 has none)."""
        await self.send("SEND_CLIENT_ID", device_id, newline=False)
        self.device_id = device_id
        self.name = f"{device_id}(v1)"

    async def send_p2p(self, to: str, body: str, msg_id: str, sender: str = "") -> None:
        """Token ``SEND_MESSAGE_P2P [to, msg, from, id]`` (``from`` is ignored)."""
        await self.send("SEND_MESSAGE_P2P", to, body, sender or self.device_id, msg_id)

    async def ack(self, device_id: str, *ids: str) -> None:
        await self.send("P2P_ACK", device_id, *ids)

    async def ping(self, skip: tuple[str, ...] = ()) -> list[Frame]:
        """Token sessions: SEND_PING -> PONG []; proves the session is open and every
        frame sent before it has been handled. Frames of the kinds in ``skip`` may come
        first (returned); anything else before the PONG fails."""
        await self.send("SEND_PING", "PING")
        skipped = []
        while (frame := await self.recv()).cmd in skip:
            skipped.append(frame)
        assert frame == ("PONG", []), f"{self.name}: expected PONG, got {frame}"
        return skipped

    def v1_violations(self) -> list[Frame]:
        """Received frames outside the v1 set or with other argument counts."""
        return [f for f in self.received if V1_FRAMES.get(f.cmd) != len(f.args)]


def parse_server_frame(body: bytes) -> Frame:
    """Strictly parse a frame from the server: UTF-8 JSON object with a CmdName string
    and Args, a list of strings (one optional trailing newline)."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadServerFrame(f"server frame is not UTF-8 JSON: {body[:200]!r}") from exc
    if not isinstance(obj, dict) or set(obj) != {"CmdName", "Args"}:
        raise BadServerFrame(f"server frame is not {{CmdName, Args}}: {body[:200]!r}")
    cmd, args = obj["CmdName"], obj["Args"]
    if not isinstance(cmd, str) or not isinstance(args, list):
        raise BadServerFrame(f"server frame has bad types: {body[:200]!r}")
    if not all(isinstance(a, str) for a in args):
        raise BadServerFrame(f"server frame Args are not all strings: {body[:200]!r}")
    return Frame(cmd, args)


async def gateway_lookup(gateway: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """v1 step one: REQ_MSG_SERVER -> SELECT_MSG_SERVER_FOR_CLIENT [addr], then the
    gateway closes. Returns the address."""
    async with await RawClient.connect(gateway, "gateway") as gw:
        await gw.send("REQ_MSG_SERVER", newline=False)
        args = await gw.expect("SELECT_MSG_SERVER_FOR_CLIENT", timeout)
        assert len(args) == 1, args
        assert await gw.expect_closed(timeout) == []
        return args[0]


# -- test-side protocol helpers -------------------------------------------------------
_marker_ids = iter(range(1, 1 << 30))


async def recv_deliveries(
    client: RawClient, n: int, cmd: str = "RESP_MESSAGE_P2P", timeout: float = DEFAULT_TIMEOUT
) -> list[list[str]]:
    """The next ``n`` frames, each of which must be a delivery ``cmd``; their args."""
    out = []
    for _ in range(n):
        out.append(await client.expect(cmd, timeout))
    return out


async def collect_receipts(
    client: RawClient, ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Read ``ACCEPTED`` receipts until every id in ``ids`` has one (any order; each
    exactly once). Anything else fails."""
    want = set(ids)
    while want:
        args = await client.expect("ACCEPTED", timeout)
        assert len(args) == 1, args
        assert args[0] in want, f"unexpected or repeated receipt {args[0]!r}"
        want.discard(args[0])


async def assert_next_delivery_is_new(
    sender: RawClient, receiver: RawClient, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Prove that nothing older is waiting for ``receiver``: ``sender`` (a token
    session) sends a fresh marker, and it must be the very next frame the receiver gets
    (the server feeds a receiver its queue, in order, before anything new from the same
    sender). The receiver acks it."""
    mid = f"marker-{next(_marker_ids)}"
    await sender.send_p2p(receiver.device_id, f"body of {mid}", mid)
    assert await sender.expect("ACCEPTED", timeout) == [mid]
    frame = await receiver.recv(timeout)
    assert frame.cmd == "RESP_MESSAGE_P2P" and frame.args[2] == mid, (
        f"{receiver.name}: expected the marker {mid}, got {frame}"
    )
    assert frame.args[1] == sender.device_id, frame
    await receiver.ack(receiver.device_id, mid)
