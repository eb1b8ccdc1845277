"""The device SDK's own behaviour, byte for byte, against a scripted peer: a real TCP
listener in the test that plays gateway / msg_server frame by frame. This is how the
cases a real server does not produce on demand are pinned down (a redelivery while the
ack was lost, UNAVAILABLE, a silent server, split frames, ack batching, backpressure).
Nothing here claims to test the server; ``test_tcp_device.py`` does that."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from device_adapters.tcp.framing import FrameDecoder, FrameError, encode_frame
from firmware_sim.tcp_device import LOGIN_REFUSED, DeviceError, TcpDevice, V1Device
from fishchat_iot import errors


class Peer:
    """One accepted connection, read and written frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(1 << 20)
        self.frames: collections.deque[tuple[str, list[str]]] = collections.deque()

    async def frame(self, timeout: float = 5.0) -> tuple[str, list[str]]:
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the device closed the connection")
                for item in self.decoder.feed(data):
                    assert not isinstance(item, FrameError), item.text
                    self.frames.append(item)
        return self.frames.popleft()

    async def expect(self, cmd: str, timeout: float = 5.0) -> list[str]:
        """The next frame other than SEND_PING, which must be ``cmd``."""
        while True:
            got, args = await self.frame(timeout)
            if got != "SEND_PING":
                assert got == cmd, (got, args)
                return args

    def send(self, cmd: str, args: list[str]) -> None:
        self.writer.write(encode_frame(cmd, args))

    async def login(self) -> list[str]:
        args = await self.expect("SEND_CLIENT_ID")
        if len(args) == 2:
            self.send("LOGIN_OK", [args[0]])
        return args

    def close(self) -> None:
        self.writer.transport.abort()


class Scripted:
    """A listener handing each connection to the test."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.all: list[Peer] = []
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.all.append(peer)
        await self.peers.put(peer)

    async def accept(self, timeout: float = 5.0) -> Peer:
        async with asyncio.timeout(timeout):
            return await self.peers.get()

    async def close(self) -> None:
        for peer in self.all:
            peer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def peer_server() -> AsyncIterator[Scripted]:
    s = Scripted()
    await s.start()
    yield s
    await s.close()


def device(srv: Scripted, **kwargs: Any) -> TcpDevice:
    kwargs.setdefault("keepalive", 0)
    kwargs.setdefault("backoff_max", 0.2)
    kwargs.setdefault("logout_timeout", 0.2)  # the scripts do not answer LOGOUT
    return TcpDevice("dev", "tok", msg_server=srv.address, **kwargs)


async def connected(srv: Scripted, dev: TcpDevice) -> Peer:
    task = asyncio.create_task(dev.connect())
    peer = await srv.accept()
    assert await peer.login() == ["dev", "tok"]
    await task
    return peer


async def test_login_and_logout_frames(peer_server: Scripted) -> None:
    dev = device(peer_server)
    peer = await connected(peer_server, dev)
    assert dev.connected
    closing = asyncio.create_task(dev.close())
    assert await peer.expect("LOGOUT") == []
    peer.send("OK", ["LOGOUT", "dev"])
    peer.close()
    started = time.monotonic()
    await closing
    assert time.monotonic() - started < 1.0


async def test_login_error_is_raised(peer_server: Scripted) -> None:
    dev = device(peer_server)
    task = asyncio.create_task(dev.connect())
    peer = await peer_server.accept()
    await peer.expect("SEND_CLIENT_ID")
    peer.send("ERROR", [errors.AUTH_FAILED, "unknown device or wrong token"])
    with pytest.raises(DeviceError) as info:
        await task
    assert (info.value.code, info.value.text) == (
        errors.AUTH_FAILED,
        "unknown device or wrong token",
    )


async def test_duplicate_is_acked_again_and_absorbed(peer_server: Scripted) -> None:
    dev = device(peer_server)
    peer = await connected(peer_server, dev)
    peer.send("RESP_MESSAGE_P2P", ["hi", "alice", "m1", "1700000000000"])
    assert await peer.expect("P2P_ACK") == ["dev", "m1"]
    peer.send("RESP_MESSAGE_P2P", ["hi", "alice", "m1", "1700000000000"])  # ack was "lost"
    assert await peer.expect("P2P_ACK") == ["dev", "m1"]
    msg = await dev.receive(timeout=1)
    assert (msg.kind, msg.id, msg.sender, msg.text, msg.ts) == (
        "p2p",
        "m1",
        "alice",
        "hi",
        1700000000000,
    )
    with pytest.raises(TimeoutError):
        await dev.receive(timeout=0.2)
    assert dev.duplicates == 1
    # Another sender's message with the same id is a different message.
    peer.send("RESP_MESSAGE_P2P", ["hey", "bob", "m1", "1700000000001"])
    assert (await dev.receive(timeout=1)).sender == "bob"
    await dev.close()


async def test_acks_of_one_read_share_a_frame(peer_server: Scripted) -> None:
    dev = device(peer_server)
    peer = await connected(peer_server, dev)
    batch = b"".join(
        encode_frame("RESP_MESSAGE_P2P", [f"t{i}", "alice", f"m{i}", "1"]) for i in range(3)
    )
    peer.writer.write(batch)
    assert await peer.expect("P2P_ACK") == ["dev", "m0", "m1", "m2"]
    await dev.close()


async def test_v1_speaks_v1_frames(peer_server: Scripted) -> None:
    dev = V1Device("old", msg_server=peer_server.address, keepalive=0, v1_login_wait=0.1)
    task = asyncio.create_task(dev.connect())
    peer = await peer_server.accept()
    assert await peer.login() == ["old"]  # no token, no LOGIN_OK
    await task
    peer.writer.write(
        encode_frame("RESP_MESSAGE_P2P", ["a", "alice", "u1"])
        + encode_frame("RESP_MESSAGE_P2P", ["b", "alice", "u2"])
        + encode_frame("RESP_MESSAGE_TOPIC", ["room", "c", "alice"])
    )
    assert await peer.expect("P2P_ACK") == ["old", "u1"]  # one ack per frame, v1 shape
    assert await peer.expect("P2P_ACK") == ["old", "u2"]
    got = [await dev.receive(timeout=1) for _ in range(3)]
    assert [(m.kind, m.id, m.text, m.topic) for m in got] == [
        ("p2p", "u1", "a", ""),
        ("p2p", "u2", "b", ""),
        ("topic", "", "c", "room"),  # v1 topic messages have no id and are not acked
    ]
    assert await dev.send("alice", "x") == ""
    assert await peer.expect("SEND_MESSAGE_P2P") == ["alice", "x", "old"]
    assert await dev.publish("room", "y") == ""
    assert await peer.expect("SEND_MESSAGE_TOPIC") == ["room", "y"]
    await dev.create_topic("t2")
    assert await peer.expect("CREATE_TOPIC") == ["t2"]
    joining = asyncio.create_task(dev.join_topic("t2"))
    assert await peer.expect("JOIN_TOPIC") == ["t2", "old"]
    peer.send("LOCATE_TOPIC_MSG_ADDR", ["10.0.0.1:19000", "t2"])
    assert await joining == "10.0.0.1:19000"
    await dev.close()  # v1 has no LOGOUT: just closes
    with pytest.raises(EOFError):
        await peer.expect("LOGOUT", timeout=1)


async def test_v1_refusal_is_a_close(peer_server: Scripted) -> None:
    dev = V1Device("old", msg_server=peer_server.address, keepalive=0)
    task = asyncio.create_task(dev.connect())
    peer = await peer_server.accept()
    await peer.expect("SEND_CLIENT_ID")
    peer.close()
    with pytest.raises(DeviceError) as info:
        await task
    assert info.value.code == LOGIN_REFUSED


async def test_unavailable_is_retried_with_the_same_id(peer_server: Scripted) -> None:
    dev = device(peer_server, backoff_min=0.05)
    peer = await connected(peer_server, dev)
    sending = asyncio.create_task(dev.send("bob", "hi", id="x1"))
    assert await peer.expect("SEND_MESSAGE_P2P") == ["bob", "hi", "dev", "x1"]
    peer.send("ERROR", [errors.UNAVAILABLE, "store busy", "x1"])
    assert await peer.expect("SEND_MESSAGE_P2P", timeout=2) == ["bob", "hi", "dev", "x1"]
    peer.send("ACCEPTED", ["x1"])
    assert await sending == "x1"
    assert dev.resent == 1
    await dev.close()


async def test_errors_reach_the_right_caller(peer_server: Scripted) -> None:
    dev = device(peer_server)
    peer = await connected(peer_server, dev)
    a = asyncio.create_task(dev.send("bob", "1", id="id-a"))
    b = asyncio.create_task(dev.send("nobody", "2", id="id-b"))
    await peer.expect("SEND_MESSAGE_P2P")
    await peer.expect("SEND_MESSAGE_P2P")
    peer.send("ERROR", [errors.UNKNOWN_DEVICE, "no device 'nobody'", "id-b"])
    peer.send("ACCEPTED", ["id-a"])
    assert await a == "id-a"
    with pytest.raises(DeviceError) as info:
        await b
    assert (info.value.code, info.value.ref) == (errors.UNKNOWN_DEVICE, "id-b")

    creating = asyncio.create_task(dev.create_topic("room"))
    assert await peer.expect("CREATE_TOPIC") == ["room"]
    peer.send("ERROR", [errors.TOPIC_EXISTS, "exists", "room"])
    with pytest.raises(DeviceError) as info:
        await creating
    assert info.value.code == errors.TOPIC_EXISTS

    leaving = asyncio.create_task(dev.leave_topic("room"))
    await peer.expect("LEAVE_TOPIC")
    peer.send("ERROR", [errors.UNKNOWN_COMMAND, "unknown command 'LEAVE_TOPIC'"])  # old server
    with pytest.raises(DeviceError) as info:
        await leaving
    assert info.value.code == errors.UNKNOWN_COMMAND

    joining = asyncio.create_task(dev.join_topic("room"))
    await peer.expect("JOIN_TOPIC")
    peer.send("LOCATE_TOPIC_MSG_ADDR", ["127.0.0.1:19000", "other"])  # not ours
    peer.send("OK", ["CREATE_TOPIC", "room"])  # not ours either
    await asyncio.sleep(0.1)
    assert not joining.done()
    peer.send("LOCATE_TOPIC_MSG_ADDR", ["127.0.0.1:19000", "room"])
    assert await joining == "127.0.0.1:19000"
    assert dev.connected
    await dev.close()


async def test_in_flight_messages_are_resent_in_order_after_reconnect(
    peer_server: Scripted,
) -> None:
    dev = device(peer_server)
    first = await connected(peer_server, dev)
    sends = [asyncio.create_task(dev.send("bob", f"m{i}", id=f"id{i}")) for i in range(4)]
    for i in range(4):
        assert (await first.expect("SEND_MESSAGE_P2P"))[3] == f"id{i}"
    first.send("ACCEPTED", ["id1"])
    assert await sends[1] == "id1"
    first.close()  # the connection breaks: id0, id2, id3 have no receipt
    second = await peer_server.accept()
    await second.login()
    resent = [(await second.expect("SEND_MESSAGE_P2P"))[3] for _ in range(3)]
    assert resent == ["id0", "id2", "id3"]
    later = asyncio.create_task(dev.send("bob", "after", id="id4"))
    assert (await second.expect("SEND_MESSAGE_P2P"))[3] == "id4"  # after the resends
    for i in (0, 2, 3, 4):
        second.send("ACCEPTED", [f"id{i}"])
    assert await asyncio.gather(*sends, later) == ["id0", "id1", "id2", "id3", "id4"]
    assert dev.reconnects == 1 and dev.resent == 3
    await dev.close()


async def test_requests_in_flight_are_resent_after_reconnect(peer_server: Scripted) -> None:
    dev = device(peer_server)
    first = await connected(peer_server, dev)
    joining = asyncio.create_task(dev.join_topic("room"))
    await first.expect("JOIN_TOPIC")
    first.close()
    second = await peer_server.accept()
    await second.login()
    assert await second.expect("JOIN_TOPIC") == ["room", "dev"]
    second.send("LOCATE_TOPIC_MSG_ADDR", ["h:1", "room"])
    assert await joining == "h:1"
    await dev.close()


async def test_full_inbox_stops_reading_and_acking(peer_server: Scripted) -> None:
    dev = device(peer_server, inbox_max=2)
    peer = await connected(peer_server, dev)
    peer.writer.write(
        b"".join(encode_frame("RESP_MESSAGE_P2P", ["t", "alice", f"m{i}", "1"]) for i in range(6))
    )
    acked: list[str] = []
    acked += (await peer.expect("P2P_ACK"))[1:]
    with pytest.raises(TimeoutError):
        acked += (await peer.expect("P2P_ACK", timeout=0.3))[1:]
    assert acked == ["m0", "m1"]  # only what is on the inbox
    assert dev.inbox_size == 2
    got = [(await dev.receive(timeout=1)).id for _ in range(6)]
    assert got == [f"m{i}" for i in range(6)]
    while len(acked) < 6:
        acked += (await peer.expect("P2P_ACK"))[1:]
    assert acked == [f"m{i}" for i in range(6)]
    await dev.close()


async def test_silent_server_is_left_and_the_device_reconnects(peer_server: Scripted) -> None:
    dev = device(peer_server, keepalive=0.3)
    first = await connected(peer_server, dev)
    cmd, args = await first.frame(timeout=1)
    assert (cmd, args) == ("SEND_PING", ["PING"])
    # No PONG, nothing at all: the device gives the connection up and comes back.
    second = await peer_server.accept(timeout=3)
    await second.login()
    await asyncio.wait_for(dev.wait_connected(), 2)
    assert dev.reconnects == 1
    await dev.close()


async def test_pong_keeps_the_session(peer_server: Scripted) -> None:
    dev = device(peer_server, keepalive=0.3)
    peer = await connected(peer_server, dev)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        cmd, _ = await peer.frame(timeout=1)
        assert cmd == "SEND_PING"
        peer.send("PONG", [])
    assert dev.connected and dev.reconnects == 0
    await dev.close()


async def test_session_replaced_is_final(peer_server: Scripted) -> None:
    dev = device(peer_server)
    peer = await connected(peer_server, dev)
    pending = asyncio.create_task(dev.send("bob", "x"))
    await peer.expect("SEND_MESSAGE_P2P")
    peer.send("ERROR", [errors.SESSION_REPLACED, "logged in on another connection"])
    peer.close()
    with pytest.raises(DeviceError) as info:
        await pending
    assert info.value.code == errors.SESSION_REPLACED
    with pytest.raises(TimeoutError):
        await peer_server.accept(timeout=0.5)  # no reconnect
    assert dev.closed and dev.final_error is not None
    with pytest.raises(DeviceError):
        await dev.receive()
    await dev.close()


async def test_split_and_unterminated_frames(peer_server: Scripted) -> None:
    dev = device(peer_server)
    task = asyncio.create_task(dev.connect())
    peer = await peer_server.accept()
    await peer.expect("SEND_CLIENT_ID")
    for byte in encode_frame("LOGIN_OK", ["dev"]):
        peer.writer.write(bytes([byte]))
        await asyncio.sleep(0)
    await task
    body = b'{"CmdName":"RESP_MESSAGE_P2P","Args":["no newline","alice","m9","5"]}'
    peer.writer.write(len(body).to_bytes(4, "big") + body)
    msg = await dev.receive(timeout=1)
    assert (msg.text, msg.id) == ("no newline", "m9")
    await dev.close()


async def test_gateway_is_asked_first(peer_server: Scripted) -> None:
    gateway = Scripted()
    await gateway.start()
    try:
        dev = TcpDevice("dev", "tok", gateway=gateway.address, keepalive=0, logout_timeout=0.2)
        task = asyncio.create_task(dev.connect())
        gw = await gateway.accept()
        assert await gw.expect("REQ_MSG_SERVER") == []
        gw.send("SELECT_MSG_SERVER_FOR_CLIENT", [peer_server.address])
        gw.close()
        peer = await peer_server.accept()
        await peer.login()
        await task
        assert dev.address == peer_server.address
        await dev.close()

        # The gateway has no msg_server: UNAVAILABLE, and nothing else to try.
        dev = TcpDevice("dev", "tok", gateway=gateway.address, keepalive=0, logout_timeout=0.2)
        task = asyncio.create_task(dev.connect())
        gw = await gateway.accept()
        await gw.expect("REQ_MSG_SERVER")
        gw.send("ERROR", [errors.UNAVAILABLE, "no msg_server is up"])
        gw.close()
        with pytest.raises(DeviceError) as info:
            await task
        assert info.value.code == "CONNECT_FAILED"
        assert "UNAVAILABLE" in info.value.text
    finally:
        await gateway.close()


async def test_send_before_connect_and_bad_arguments() -> None:
    dev = TcpDevice("dev", "tok", msg_server="127.0.0.1:9")
    with pytest.raises(DeviceError) as info:
        await dev.send("bob", "x")
    assert info.value.code == "CLOSED"
    with pytest.raises(ValueError):
        TcpDevice("dev", None, msg_server="127.0.0.1:9")
    with pytest.raises(ValueError):
        TcpDevice("dev", "tok")
    with pytest.raises(ValueError):
        TcpDevice("dev", "tok", gateway="no-port")


async def test_close_while_connecting_leaves_nothing_behind(peer_server: Scripted) -> None:
    dev = device(peer_server)
    connecting = asyncio.create_task(dev.connect())
    peer = await peer_server.accept()
    await peer.expect("SEND_CLIENT_ID")
    await dev.close()
    peer.send("LOGIN_OK", ["dev"])
    with pytest.raises(DeviceError) as info:
        await connecting
    assert info.value.code == "CLOSED"
    assert not dev.connected and dev.closed
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fishchat-")]
    with pytest.raises(EOFError):
        await peer.frame(timeout=2)  # the half-open session was dropped
