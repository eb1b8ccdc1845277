"""``SerialPort``: pyserial driven by a reader and a writer thread, the loop never
blocked; checked on pyserial's ``loop://`` (what is written comes back) and a pty."""

from __future__ import annotations

import asyncio
import os
import tty

import pytest

from device_adapters.serial.port import SerialPort


async def test_loop_url_round_trip_and_close() -> None:
    got = bytearray()
    lost: list[BaseException] = []
    arrived = asyncio.Event()

    def on_data(data: bytes) -> None:
        got.extend(data)
        if len(got) >= 20_000:
            arrived.set()

    port = SerialPort("loop://", 115200, on_data, lost.append)
    await port.open()
    assert port.is_open
    payload = os.urandom(20_000)
    for i in range(0, len(payload), 1000):
        port.write(payload[i : i + 1000])
    await asyncio.wait_for(arrived.wait(), 10)
    assert bytes(got) == payload
    assert port.bytes_in == port.bytes_out == len(payload)
    await port.close()
    assert not port.is_open and not lost
    port.write(b"after close")  # ignored, no error
    await port.close()  # idempotent


async def test_a_pty_whose_other_side_closes_is_reported_lost_once() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    lost: list[BaseException] = []
    got = asyncio.Event()
    port = SerialPort(path, 115200, lambda d: got.set(), lost.append)
    await port.open()
    os.write(master, b"hi")
    await asyncio.wait_for(got.wait(), 5)
    os.close(master)
    os.close(slave)
    for _ in range(250):
        if lost:
            break
        await asyncio.sleep(0.02)
    assert len(lost) == 1
    await port.close()


async def test_open_failure_is_an_exception() -> None:
    port = SerialPort("/nonexistent/ttyNONE", 115200, lambda d: None, lambda e: None)
    with pytest.raises(Exception, match="could not open port"):
        await port.open()
