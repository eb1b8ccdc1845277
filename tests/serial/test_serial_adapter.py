"""The serial adapter over real pseudo-terminals, against a real ``fishchat-iot up``:
serial devices exchange messages with TCP devices; bad frames are NACKed, counted and
dropped while the port keeps working; a port that vanishes is reopened and its device
gets what was sent to it meanwhile; the upstream going away is survived."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from serial_helpers import *  # noqa: F403  (the fixtures)
from serial_helpers import (
    Cable,
    RawLine,
    Rfc2217Server,
    serial_device,
    serial_settings,
    until,
)
from support.server import ServerProcess

from device_adapters.serial.crc import CRC16
from device_adapters.serial.framing import (
    LOST_CLOSED,
    LOST_NOT_LOGGED_IN,
    NACK,
    NACK_CRC,
    NACK_TOO_LARGE,
    UPSTREAM_LOST,
    encode_body,
    encode_frame,
)
from firmware_sim.serial_device import SerialDevice
from firmware_sim.tcp_device import DeviceError, TcpDevice
from fishchat_iot import errors

AdapterFactory = Callable[..., Any]


def _tcp(server: ServerProcess, device_id: str, token: str) -> TcpDevice:
    return TcpDevice(device_id, token, msg_server=server.msg_server, backoff_max=0.3)


async def _texts(dev: TcpDevice, n: int, timeout: float = 10.0) -> list[str]:
    return [(await dev.receive(timeout)).text for _ in range(n)]


async def test_serial_and_tcp_devices_exchange_p2p_and_topic_messages(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    s_id, t_id, topic = f"{uid}-s", f"{uid}-t", f"{uid}-room"
    tokens = serial_server.register_many([s_id, t_id])
    adapter = await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": serial_server.msg_server})
    )
    async with (
        serial_device(cable, s_id, tokens[s_id]) as sdev,
        _tcp(serial_server, t_id, tokens[t_id]) as tdev,
    ):
        msg_id = await sdev.send(t_id, "hello from the UART")
        got = await tdev.receive(5)
        assert (got.kind, got.sender, got.id, got.text) == (
            "p2p",
            s_id,
            msg_id,
            "hello from the UART",
        )

        reply_id = await tdev.send(s_id, "hello, wire ✓")
        got = await sdev.receive(5)
        assert (got.kind, got.sender, got.id, got.text) == ("p2p", t_id, reply_id, "hello, wire ✓")

        # A burst both ways, in order.
        await asyncio.gather(*(sdev.send(t_id, f"s{i}") for i in range(30)))
        await asyncio.gather(*(tdev.send(s_id, f"t{i}") for i in range(30)))
        assert await _texts(tdev, 30) == [f"s{i}" for i in range(30)]
        assert await _texts(sdev, 30) == [f"t{i}" for i in range(30)]

        # Topics: the serial device creates one, the TCP device joins.
        await sdev.create_topic(topic)
        await tdev.join_topic(topic)
        await sdev.publish(topic, "to the room")
        got = await tdev.receive(5)
        assert (got.kind, got.topic, got.sender, got.text) == ("topic", topic, s_id, "to the room")
        await tdev.publish(topic, "from the room")
        got = await sdev.receive(5)
        assert (got.kind, got.topic, got.sender, got.text) == (
            "topic",
            topic,
            t_id,
            "from the room",
        )

    stats = adapter.stats()[cable.adapter_url]
    assert stats["device"] == s_id
    assert stats["corrupt"] == stats["oversize"] == stats["bad"] == stats["nacks"] == 0
    assert stats["frames_in"] >= 34 and stats["frames_out"] >= 34
    # (A second login happens when the adapter's PORT_OPENED crosses the first one.)
    assert stats["reopens"] == 0 and stats["logins"] in (1, 2)


async def test_serial_device_from_a_psk_bundle_seals_on_the_wire(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    """A microcontroller registered ``--psk`` (gateway-terminated): SerialDevice.from_bundle
    takes the bundle's key, the text never crosses the serial line in the clear either
    way, and the TCP device at the other end reads it as sent."""
    s_id, t_id = f"{uid}-sp", f"{uid}-tp"
    out = json.loads(serial_server.cli("device", "register", s_id, "--psk", "--json").stdout)
    tokens = serial_server.register_many([t_id])
    on_wire: dict[str, bytearray] = {"to_adapter": bytearray(), "to_device": bytearray()}

    def tap(direction: str) -> Callable[[bytes], bytes]:
        def keep(data: bytes) -> bytes:
            on_wire[direction] += data
            return data

        return keep

    for direction in on_wire:
        cable.filter(direction, tap(direction))
    await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": serial_server.msg_server})
    )
    sdev = SerialDevice.from_bundle(
        out["bundle"], port=cable.device_path, backoff_max=0.3, connect_timeout=5.0
    )
    assert sdev.psk is not None
    async with sdev, _tcp(serial_server, t_id, tokens[t_id]) as tdev:
        msg_id = await sdev.send(t_id, "sealed on the UART")
        got = await tdev.receive(5)
        assert (got.sender, got.id, got.text) == (s_id, msg_id, "sealed on the UART")

        reply_id = await tdev.send(s_id, "sealed back to the UART")
        got = await sdev.receive(5)
        assert (got.sender, got.id, got.text) == (t_id, reply_id, "sealed back to the UART")
    for direction in on_wire:
        cable.filter(direction, None)
    assert b"sealed on the UART" not in on_wire["to_adapter"]
    assert b"sealed back to the UART" not in on_wire["to_device"]
    assert len(on_wire["to_adapter"]) > 0 and len(on_wire["to_device"]) > 0


async def test_bad_frames_are_nacked_counted_and_dropped_while_the_port_keeps_working(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    s_id, t_id = f"{uid}-s", f"{uid}-t"
    tokens = serial_server.register_many([s_id, t_id])
    adapter = await adapter_factory(
        serial_settings(
            {"url": cable.adapter_url, "msg_server": serial_server.msg_server}, max_frame=1024
        )
    )
    bridge = adapter.ports[0]
    async with (
        serial_device(cable, s_id, tokens[s_id]) as sdev,
        _tcp(serial_server, t_id, tokens[t_id]) as tdev,
    ):
        await sdev.send(t_id, "before")
        assert (await tdev.receive(5)).text == "before"
        logins = bridge.logins

        # 1. One flipped bit in a frame that would otherwise deliver "evil".
        flipped = bytearray(encode_frame("SEND_MESSAGE_P2P", [t_id, "evil", s_id, "x-1"]))
        flipped[20] ^= 0x10
        cable.inject_to_adapter(b"\x00" + bytes(flipped))
        # 2. A truncated frame (the rest of it never came).
        cut = encode_frame("SEND_MESSAGE_P2P", [t_id, "evil", s_id, "x-2"])[:30]
        cable.inject_to_adapter(b"\x00" + cut + b"\x00")
        # 3. Line noise between frames.
        cable.inject_to_adapter(bytes([0x5A, 0xA5, 0x13, 0x37, 0x00]))
        # 4. An endless frame: 5000 bytes and no delimiter (the device's next frame,
        #    which starts with a 0x00, ends it).
        cable.inject_to_adapter(bytes([0x41]) * 5000)
        await until(lambda: bridge.oversize == 1, what="the oversize frame")

        await sdev.send(t_id, "after")
        assert (await tdev.receive(5)).text == "after"
        await tdev.send(s_id, "down")
        assert (await sdev.receive(5)).text == "down"

        await until(lambda: sdev.nacks_received == 4, what="4 NACKs at the device")
        stats = adapter.stats()[cable.adapter_url]
        assert stats["corrupt"] == 3
        assert stats["oversize"] == 1
        assert stats["nacks"] == 4
        assert stats["open"] and stats["reopens"] == 0 and stats["port_losses"] == 0
        assert stats["upstream"] == "up" and stats["logins"] == logins  # no new session

        # Corruption on the way down: the device counts it and logs in again, so a
        # delivery it may have lost comes again; nothing is lost or doubled.
        cable.inject_to_device(
            b"\x00" + encode_body(b'{"CmdName":"RESP_MESSAGE_P2P"}')[:-3] + b"\x00"
        )
        await until(lambda: sdev.corrupt_in == 1 and sdev.relogins == 1, what="relogin")
        await tdev.send(s_id, "still here")
        assert (await sdev.receive(5)).text == "still here"
        await sdev.send(t_id, "me too")
        assert (await tdev.receive(5)).text == "me too"
        assert sdev.inbox_size == 0 and tdev.inbox_size == 0
    assert tdev.received == 3 and sdev.received == 2  # "evil" never arrived


async def test_nack_and_upstream_lost_frames_on_the_wire(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    """The adapter's own frames, read raw off the line as a firmware author would."""
    s_id = f"{uid}-s"
    token = serial_server.register(s_id)
    await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": serial_server.msg_server})
    )
    line = RawLine(cable.device_path)
    try:
        line.send("SEND_PING", ["PING"])  # no session yet
        lost = await line.expect(UPSTREAM_LOST, LOST_NOT_LOGGED_IN)
        assert "log in with SEND_CLIENT_ID" in lost.args[1]

        bad = bytearray(encode_frame("SEND_PING", ["PING"]))
        bad[-2] ^= 0x01  # the CRC's last byte
        line.write(bytes(bad))
        nack = await line.expect(NACK)
        assert nack.args[0] == NACK_CRC and "crc16 mismatch" in nack.args[1]

        line.write(b"\x00" + bytes([0x42]) * 70000)
        nack = await line.expect(NACK)
        assert nack.args[0] == NACK_TOO_LARGE

        line.write(b"\x00")
        line.send("SEND_CLIENT_ID", [s_id, token])
        ok = await line.expect("LOGIN_OK")
        assert ok.args == [s_id]
        line.send("SEND_PING", ["PING"])
        await line.expect("PONG")
        line.send("LOGOUT", [])
        await line.expect("OK")
        await line.expect(UPSTREAM_LOST, LOST_CLOSED)
    finally:
        line.close()


async def test_port_that_vanishes_is_reopened_and_the_device_gets_what_was_sent_meanwhile(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    s_id, t_id = f"{uid}-s", f"{uid}-t"
    tokens = serial_server.register_many([s_id, t_id])
    adapter = await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": serial_server.msg_server})
    )
    bridge = adapter.ports[0]
    async with (
        serial_device(cable, s_id, tokens[s_id]) as sdev,
        _tcp(serial_server, t_id, tokens[t_id]) as tdev,
    ):
        await tdev.send(s_id, "first")
        assert (await sdev.receive(5)).text == "first"
        logins = bridge.logins

        cable.unplug()  # the USB cable is pulled: the pty and its name are gone
        await until(lambda: bridge.port_losses == 1 and bridge.upstream is None, what="loss")
        assert not cable.link.exists()
        # The device's session is closed: these wait in its durable queue.
        for i in range(5):
            await tdev.send(s_id, f"meanwhile {i}")
        await until(lambda: bridge.open_failures >= 1, what="a failed reopen")

        cable.replug()
        await until(lambda: bridge.reopens == 1, what="the reopen")
        got = await _texts(sdev, 5)
        assert got == [f"meanwhile {i}" for i in range(5)]
        await sdev.send(t_id, "back")
        assert (await tdev.receive(5)).text == "back"
    stats = adapter.stats()[cable.adapter_url]
    assert stats["reopens"] == 1 and stats["port_losses"] == 1
    assert stats["logins"] == logins + 1
    assert sdev.upstream_lost >= 1  # PORT_OPENED told it to log in again


async def test_upstream_lost_is_told_and_the_device_logs_in_again(
    own_server: ServerProcess,
    cable: Cable,
    adapter_factory: AdapterFactory,
    uid: str,
) -> None:
    server = own_server
    s_id, t_id = f"{uid}-s", f"{uid}-t"
    tokens = server.register_many([s_id, t_id])
    adapter = await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": server.msg_server})
    )
    bridge = adapter.ports[0]
    async with (
        serial_device(cable, s_id, tokens[s_id]) as sdev,
        _tcp(server, t_id, tokens[t_id]) as tdev,
    ):
        await sdev.send(t_id, "one")
        assert (await tdev.receive(5)).text == "one"
        await asyncio.to_thread(server.restart)
        await until(lambda: bridge.upstream_lost >= 1, what="UPSTREAM_LOST")
        # The device learns it and logs in again (as the TCP device reconnects).
        await until(lambda: bridge.logins >= 2 and sdev.connected, what="the new login")
        await sdev.send(t_id, "two")
        assert (await tdev.receive(10)).text == "two"
        await tdev.send(s_id, "three")
        assert (await sdev.receive(10)).text == "three"
    assert sdev.upstream_lost >= 1


async def test_login_with_no_upstream_is_refused_as_unavailable(
    cable: Cable, adapter_factory: AdapterFactory
) -> None:
    adapter = await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": "127.0.0.1:1"})
    )
    dev = serial_device(cable, "nobody", "t0k3n", reconnect=False)
    with pytest.raises(DeviceError) as info:
        await dev.connect()
    assert info.value.code == errors.UNAVAILABLE
    assert "cannot connect" in info.value.text
    await dev.close()
    assert adapter.stats()[cable.adapter_url]["upstream_failures"] >= 1


async def test_socket_url(
    serial_server: ServerProcess,
    cable_factory: Callable[..., Cable],
    adapter_factory: AdapterFactory,
    uid: str,
) -> None:
    """The same through a serial-over-TCP server (ser2net style): socket://host:port."""
    tcable = cable_factory("net0", tcp=True)
    assert tcable.adapter_url.startswith("socket://")
    s_id, t_id = f"{uid}-s", f"{uid}-t"
    tokens = serial_server.register_many([s_id, t_id])
    adapter = await adapter_factory(
        serial_settings(
            {"url": tcable.adapter_url, "msg_server": serial_server.msg_server, "crc": "crc32"}
        )
    )
    assert adapter.ports[0].crc.name == "crc32"
    async with (
        serial_device(tcable, s_id, tokens[s_id], crc="crc32") as sdev,
        _tcp(serial_server, t_id, tokens[t_id]) as tdev,
    ):
        await sdev.send(t_id, "over the network")
        assert (await tdev.receive(5)).text == "over the network"
        await tdev.send(s_id, "and back")
        assert (await sdev.receive(5)).text == "and back"


async def test_wrong_crc_setting_is_nacked_not_fatal(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    """A device speaking CRC-32 to a CRC-16 port: every frame NACKed, nothing breaks."""
    token = serial_server.register(f"{uid}-s")
    adapter = await adapter_factory(
        serial_settings({"url": cable.adapter_url, "msg_server": serial_server.msg_server})
    )
    dev = SerialDevice(f"{uid}-s", token, cable.device_path, crc="crc32", connect_timeout=1.0)
    with pytest.raises(DeviceError) as info:
        await dev.connect()
    assert info.value.code == "TIMEOUT"
    await dev.close()
    stats = adapter.stats()[cable.adapter_url]
    assert stats["corrupt"] >= 1 and stats["nacks"] >= 1 and stats["open"]
    assert CRC16.name == "crc16"


@pytest.mark.filterwarnings("ignore:set(Name|Daemon):DeprecationWarning")  # pyserial 3.5
async def test_rfc2217_url(
    serial_server: ServerProcess, cable: Cable, adapter_factory: AdapterFactory, uid: str
) -> None:
    """The same through a terminal server speaking RFC 2217: rfc2217://host:port."""
    server = await asyncio.to_thread(Rfc2217Server, cable.adapter_url)
    try:
        s_id, t_id = f"{uid}-s", f"{uid}-t"
        tokens = serial_server.register_many([s_id, t_id])
        adapter = await adapter_factory(
            serial_settings({"url": server.url, "msg_server": serial_server.msg_server})
        )
        assert adapter.ports[0].cfg.url.startswith("rfc2217://")
        async with (
            serial_device(cable, s_id, tokens[s_id]) as sdev,
            _tcp(serial_server, t_id, tokens[t_id]) as tdev,
        ):
            await sdev.send(t_id, "through a terminal server")
            assert (await tdev.receive(5)).text == "through a terminal server"
            await tdev.send(s_id, "and back")
            assert (await sdev.receive(5)).text == "and back"
        await adapter.stop()
    finally:
        await asyncio.to_thread(server.close)
