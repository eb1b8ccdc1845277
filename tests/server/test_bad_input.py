"""Bad input, each case on its own connection, while an established pair of devices
keeps exchanging messages (checked before and after every case).

What a device sees: a token session gets ``ERROR [code, text]`` and stays open for a
bad frame, or is told and closed when the stream cannot be resynced; a connection that
has not logged in gets one ERROR and is closed; a v1 session is just closed, with no
frame. Whatever it is, the server logs it exactly once, as a warning.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from support.raw_client import Connect, RawClient, encode, raw_frame
from support.server import ServerProcess

# Bytes from a seeded generator; the first four read as a length far above max_frame.
RANDOM_BYTES = b"\x5a\x17" + random.Random(7).randbytes(510)
RANDOM_IN_A_FRAME = raw_frame(b"\xa7" + random.Random(8).randbytes(199))

# Frames that are bad whoever sends them; the stream goes on after them.
BAD_FRAMES: dict[str, bytes] = {
    "invalid-json": raw_frame(b'{"CmdName": "SEND_PING", "Args": [}'),
    "invalid-utf8": raw_frame(b'{"CmdName":"SEND_PING","Args":["\xff\xfe\xfd"]}'),
    "random-bytes-in-a-frame": RANDOM_IN_A_FRAME,
    "not-an-object": raw_frame(b'["SEND_PING", ["PING"]]'),
    "no-cmdname": raw_frame(b'{"Args": ["PING"]}'),
    "empty-cmdname": raw_frame(b'{"CmdName": "", "Args": []}'),
    "non-string-args": raw_frame(b'{"CmdName": "SEND_PING", "Args": [1]}'),
    "args-not-a-list": raw_frame(b'{"CmdName": "SEND_PING", "Args": "PING"}'),
}
# Length prefixes the stream cannot recover from.
FATAL: dict[str, tuple[bytes, str]] = {
    "random-bytes": (RANDOM_BYTES, "FRAME_TOO_LARGE"),
    "length-2gib": (b"\x80\x00\x00\x00" + b'{"CmdName":', "FRAME_TOO_LARGE"),
    "length-64kib-plus-1": ((65537).to_bytes(4, "big") + b"{" * 100, "FRAME_TOO_LARGE"),
    "length-zero": (b"\x00\x00\x00\x00", "BAD_FRAME"),
}
TRUNCATED = b"\x00\x00\x01\x00" + b'{"CmdName":"SEND_MESSAGE_P2P","Args":["'


@dataclass
class Ctx:
    server: ServerProcess
    uid: str
    new_device: Callable[..., tuple[str, str]]
    a_id: str
    b_id: str


class Pair:
    """Two logged-in devices; ``check()`` sends one message each way, acked."""

    def __init__(self, a: RawClient, b: RawClient, uid: str) -> None:
        self.a, self.b, self.uid, self.n = a, b, uid, 0

    async def check(self) -> None:
        for s, r in ((self.a, self.b), (self.b, self.a)):
            self.n += 1
            mid = f"{self.uid}-{self.n}"
            await s.send_p2p(r.device_id, f"check {self.n}", mid)
            assert await s.expect("ACCEPTED") == [mid]
            args = await r.expect("RESP_MESSAGE_P2P")
            assert args[:3] == [f"check {self.n}", s.device_id, mid], args
            await r.ack(r.device_id, mid)
        await self.a.ping()
        await self.b.ping()


class DevicePool:
    """Devices registered ahead, several at once (the CLI costs a process each)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.free: dict[bool, list[tuple[str, str]]] = {False: [], True: []}
        self.n = 0

    def take(self, v1: bool = False) -> tuple[str, str]:
        if not self.free[v1]:
            ids = [f"pool-{'v1' if v1 else 'tk'}-{self.n + i}" for i in range(8)]
            self.n += 8
            self.free[v1] = list(self.server.register_many(ids, v1=v1).items())
        return self.free[v1].pop()


@pytest.fixture(scope="module")
def pool(up_server: ServerProcess) -> Iterator[DevicePool]:
    yield DevicePool(up_server)


@pytest.fixture(scope="module")
def pair_tokens(up_server: ServerProcess) -> dict[str, str]:
    return up_server.register_many(["pair-alice", "pair-bob"])


@pytest.fixture
async def pair(
    up_server: ServerProcess, pair_tokens: dict[str, str], connect: Connect, uid: str
) -> AsyncIterator[Pair]:
    a = await connect(up_server.msg_server, "pair-alice", pair_tokens["pair-alice"])
    b = await connect(up_server.msg_server, "pair-bob", pair_tokens["pair-bob"])
    pair = Pair(a, b, uid)
    await pair.check()
    yield pair


def assert_logged_once(server: ServerProcess, mark: int, client: RawClient) -> str:
    """Exactly one warning since ``mark``, and it names the client's connection."""
    warnings = server.warnings_since(mark)
    assert len(warnings) == 1, "expected one warning:\n" + "\n".join(warnings)
    assert client.local in warnings[0], warnings[0]
    return warnings[0]


def const(frame: bytes) -> Callable[[Ctx], bytes]:
    return lambda ctx: frame


# -- not logged in -------------------------------------------------------------------------
def _login_unknown(ctx: Ctx) -> bytes:
    return encode("SEND_CLIENT_ID", f"{ctx.uid}-nobody", "x" * 43)


def _login_wrong_token(ctx: Ctx) -> bytes:
    device_id, token = ctx.new_device()
    return encode("SEND_CLIENT_ID", device_id, token[:-4] + "AAAA")


def _login_revoked(ctx: Ctx) -> bytes:
    device_id, token = ctx.new_device()
    ctx.server.revoke(device_id)
    return encode("SEND_CLIENT_ID", device_id, token)


UNAUTHENTICATED: dict[str, tuple[Callable[[Ctx], bytes], str]] = {
    **{name: (const(frame), "BAD_FRAME") for name, frame in BAD_FRAMES.items()},
    **{name: (const(frame), code) for name, (frame, code) in FATAL.items()},
    "unknown-command": (lambda ctx: encode("FLY_TO_THE_MOON"), "NOT_LOGGED_IN"),
    "send-before-login": (
        lambda ctx: encode("SEND_MESSAGE_P2P", ctx.b_id, "sneaky", ctx.a_id, "x-1"),
        "NOT_LOGGED_IN",
    ),
    "ack-before-login": (lambda ctx: encode("P2P_ACK", ctx.b_id, "x-1"), "NOT_LOGGED_IN"),
    "ping-before-login": (lambda ctx: encode("SEND_PING", "PING"), "NOT_LOGGED_IN"),
    "login-no-args": (lambda ctx: encode("SEND_CLIENT_ID"), "BAD_ARGS"),
    "login-three-args": (lambda ctx: encode("SEND_CLIENT_ID", "a", "b", "c"), "BAD_ARGS"),
    "login-invalid-id": (lambda ctx: encode("SEND_CLIENT_ID", "a/b", "tok"), "AUTH_FAILED"),
    "login-unknown-device": (_login_unknown, "AUTH_FAILED"),
    "login-wrong-token": (_login_wrong_token, "AUTH_FAILED"),
    "login-revoked-device": (_login_revoked, "REVOKED"),
}


@pytest.mark.parametrize("case", list(UNAUTHENTICATED))
async def test_not_logged_in_gets_one_error_and_is_closed(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect, uid: str, case: str
) -> None:
    make, code = UNAUTHENTICATED[case]
    ctx = Ctx(up_server, uid, pool.take, pair.a.device_id, pair.b.device_id)
    payload = make(ctx)
    mark = up_server.log_mark()
    client = await connect(up_server.msg_server)
    await client.send_raw(payload + encode("SEND_PING", "PING"))
    frames = await client.expect_closed()
    assert [f.cmd for f in frames] == ["ERROR"], frames
    assert frames[0].args[0] == code and len(frames[0].args) == 2, frames
    assert frames[0].args[1].strip()
    await pair.check()
    assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_not_logged_in_truncated_frame_then_hang_up(
    up_server: ServerProcess, pair: Pair, connect: Connect
) -> None:
    mark = up_server.log_mark()
    client = await connect(up_server.msg_server)
    await client.send_raw(TRUNCATED)
    client.writer.write_eof()
    assert await client.expect_closed() == []
    await pair.check()
    assert "middle of a frame" in assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


# -- token sessions ------------------------------------------------------------------------
PER_FRAME: dict[str, tuple[Callable[[Ctx], bytes], str]] = {
    **{name: (const(frame), "BAD_FRAME") for name, frame in BAD_FRAMES.items()},
    "unknown-command": (lambda ctx: encode("FLY_TO_THE_MOON", "now"), "UNKNOWN_COMMAND"),
    "p2p-one-arg": (lambda ctx: encode("SEND_MESSAGE_P2P", ctx.b_id), "BAD_ARGS"),
    "p2p-five-args": (
        lambda ctx: encode("SEND_MESSAGE_P2P", ctx.b_id, "m", "f", "id", "extra"),
        "BAD_ARGS",
    ),
    "ack-no-ids": (lambda ctx: encode("P2P_ACK", "me"), "BAD_ARGS"),
    "topic-send-one-arg": (lambda ctx: encode("SEND_MESSAGE_TOPIC", "t"), "BAD_ARGS"),
    "create-topic-no-args": (lambda ctx: encode("CREATE_TOPIC"), "BAD_ARGS"),
    "join-topic-three-args": (lambda ctx: encode("JOIN_TOPIC", "t", "me", "x"), "BAD_ARGS"),
    "login-again": (lambda ctx: encode("SEND_CLIENT_ID", ctx.a_id, "x"), "ALREADY_LOGGED_IN"),
}


@pytest.mark.parametrize("case", list(PER_FRAME))
async def test_token_session_bad_frame_gets_error_and_stays_open(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect, uid: str, case: str
) -> None:
    make, code = PER_FRAME[case]
    ctx = Ctx(up_server, uid, pool.take, pair.a.device_id, pair.b.device_id)
    device_id, token = pool.take()
    client = await connect(up_server.msg_server, device_id, token)
    mark = up_server.log_mark()
    await client.send_raw(make(ctx))
    args = await client.expect_error(code)
    assert len(args) == 2, args
    # Still open and working: the next frames are handled as usual.
    await client.ping()
    await client.send_p2p(pair.a.device_id, "still here", f"{uid}-after")
    assert await client.expect("ACCEPTED") == [f"{uid}-after"]
    assert (await pair.a.expect("RESP_MESSAGE_P2P"))[:3] == [
        "still here",
        device_id,
        f"{uid}-after",
    ]
    await pair.a.ack(pair.a.device_id, f"{uid}-after")
    await pair.check()
    assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


@pytest.mark.parametrize("case", list(FATAL))
async def test_token_session_unresyncable_stream_gets_error_and_is_closed(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect, case: str
) -> None:
    payload, code = FATAL[case]
    device_id, token = pool.take()
    client = await connect(up_server.msg_server, device_id, token)
    mark = up_server.log_mark()
    await client.send_raw(payload)
    frames = await client.expect_closed()
    assert [f.cmd for f in frames] == ["ERROR"] and frames[0].args[0] == code, frames
    await pair.check()
    assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_token_session_truncated_frame_then_hang_up(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect
) -> None:
    device_id, token = pool.take()
    client = await connect(up_server.msg_server, device_id, token)
    mark = up_server.log_mark()
    await client.send_raw(TRUNCATED)
    client.writer.write_eof()
    assert await client.expect_closed() == []
    await pair.check()
    assert "middle of a frame" in assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_token_session_spoofed_from_is_ignored(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect, uid: str
) -> None:
    device_id, token = pool.take()
    client = await connect(up_server.msg_server, device_id, token)
    mark = up_server.log_mark()
    for n in range(2):
        await client.send_p2p(
            pair.b.device_id, f"I am alice {n}", f"{uid}-{n}", sender="pair-alice"
        )
        assert await client.expect("ACCEPTED") == [f"{uid}-{n}"]
        args = await pair.b.expect("RESP_MESSAGE_P2P")
        assert args[:3] == [f"I am alice {n}", device_id, f"{uid}-{n}"], args
        await pair.b.ack(pair.b.device_id, f"{uid}-{n}")
    await pair.check()
    assert "pair-alice" in assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


# -- v1 sessions ---------------------------------------------------------------------------
V1_BAD: dict[str, bytes] = {
    **BAD_FRAMES,
    **{name: frame for name, (frame, _code) in FATAL.items()},
    "unknown-command": encode("FLY_TO_THE_MOON", newline=False),
    "p2p-one-arg": encode("SEND_MESSAGE_P2P", "pair-bob", newline=False),
    "ack-no-ids": encode("P2P_ACK", "me", newline=False),
    "login-again": encode("SEND_CLIENT_ID", "pair-alice", newline=False),
}


async def v1_session(pair: Pair, pool: DevicePool, connect: Connect, addr: str) -> RawClient:
    """A logged-in v1 session that has been served a message (and acked it)."""
    device_id, _ = pool.take(v1=True)
    client = await connect(addr, device_id, None)
    mid = f"{device_id}-hello"
    await pair.a.send_p2p(device_id, "hello v1", mid)
    assert await pair.a.expect("ACCEPTED") == [mid]
    assert await client.expect("RESP_MESSAGE_P2P") == ["hello v1", pair.a.device_id, mid]
    await client.send("P2P_ACK", device_id, mid, newline=False)
    return client


@pytest.mark.parametrize("case", list(V1_BAD))
async def test_v1_session_bad_input_is_just_closed(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect, case: str
) -> None:
    client = await v1_session(pair, pool, connect, up_server.msg_server)
    mark = up_server.log_mark()
    await client.send_raw(V1_BAD[case])
    assert await client.expect_closed() == []
    assert client.v1_violations() == []
    await pair.check()
    assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_v1_session_truncated_frame_then_hang_up(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect
) -> None:
    client = await v1_session(pair, pool, connect, up_server.msg_server)
    mark = up_server.log_mark()
    await client.send_raw(TRUNCATED)
    client.writer.write_eof()
    assert await client.expect_closed() == []
    assert client.v1_violations() == []
    await pair.check()
    assert "middle of a frame" in assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_v1_session_spoofed_from_is_ignored(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect
) -> None:
    client = await v1_session(pair, pool, connect, up_server.msg_server)
    device_id = client.device_id
    mark = up_server.log_mark()
    for n in range(2):
        await client.send("SEND_MESSAGE_P2P", "pair-bob", f"I am alice {n}", "pair-alice")
        body, sender, mid, _ts = await pair.b.expect("RESP_MESSAGE_P2P")
        assert (body, sender) == (f"I am alice {n}", device_id)
        await pair.b.ack("pair-bob", mid)
    await pair.check()
    assert "pair-alice" in assert_logged_once(up_server, mark, client)
    assert client.v1_violations() == []
    up_server.assert_healthy()


# -- the gateway ---------------------------------------------------------------------------
GATEWAY_BAD: dict[str, tuple[bytes, str]] = {
    "random-bytes": (RANDOM_BYTES, "FRAME_TOO_LARGE"),
    "invalid-json": (BAD_FRAMES["invalid-json"], "BAD_FRAME"),
    "not-an-object": (BAD_FRAMES["not-an-object"], "BAD_FRAME"),
    "unknown-command": (encode("SEND_CLIENT_ID", "me"), "UNKNOWN_COMMAND"),
}


@pytest.mark.parametrize("case", list(GATEWAY_BAD))
async def test_gateway_bad_input_gets_one_error_and_is_closed(
    up_server: ServerProcess, pair: Pair, connect: Connect, case: str
) -> None:
    payload, code = GATEWAY_BAD[case]
    mark = up_server.log_mark()
    client = await connect(up_server.gateway)
    await client.send_raw(payload + encode("REQ_MSG_SERVER"))
    frames = await client.expect_closed()
    assert [(f.cmd, f.args[0]) for f in frames] == [("ERROR", code)], frames
    await pair.check()
    assert_logged_once(up_server, mark, client)
    up_server.assert_healthy()


async def test_token_session_overlong_message_id_is_answered_at_once(
    up_server: ServerProcess, pair: Pair, pool: DevicePool, connect: Connect
) -> None:
    """The refusal is written right away, not left until the next frame to the device."""
    device_id, token = pool.take()
    client = await connect(up_server.msg_server, device_id, token)
    await client.send_p2p(pair.a.device_id, "body", "x" * 65)
    args = await client.expect_error("BAD_ARGS", timeout=3)
    assert "longer than 64" in args[1], args
    await client.ping()
    await pair.check()
