"""Real serial lines for the serial tests, and the fixtures that use them.

(This directory has no ``__init__.py`` and no ``conftest.py`` on purpose: as a package
it would be named ``serial`` and hide pyserial, and a second top-level ``conftest``
would clash with ``tests/conftest.py``. Test modules import the fixtures from here.)

A :class:`Cable` is a null-modem cable between two pseudo-terminals, copied by a thread,
as ``socat pty pty`` would: the device's end is a pty the SerialDevice opens by its
slave path, the adapter's end is a pty named by a symlink (as udev's
``/dev/serial/by-id/...`` names a USB adapter). ``unplug()`` closes the adapter-side
pty (its slave starts failing with EIO and its path disappears) and removes the symlink;
``replug()`` makes a new pty and points the symlink at it. ``inject_to_adapter`` /
``inject_to_device`` put raw bytes on the line, between the frames the ends write.

With ``tcp=True`` the adapter's end is a TCP listener instead (a ser2net-style
serial-over-TCP server): the adapter opens it as ``socket://127.0.0.1:PORT``.
"""

from __future__ import annotations

__all__ = [  # the fixtures: test modules take them with "from serial_helpers import *"
    "adapter_factory",
    "cable",
    "cable_factory",
    "own_server",
    "serial_server",
]

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
from support.server import ServerProcess

from device_adapters.serial.adapter import SerialAdapter
from device_adapters.serial.framing import (
    SerialDecoder,
    SerialFrame,
    SerialFrameError,
    encode_frame,
)
from firmware_sim.serial_device import SerialDevice
from fishchat_iot.config import SerialPortSettings, SerialSettings


def _pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line editing before pyserial opens it
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class Cable:
    def __init__(self, root: Path, name: str = "ttyFC0", tcp: bool = False) -> None:
        self.root = root
        self.link = root / name
        self.tcp = tcp
        self._lock = threading.Lock()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        # The device's end.
        self.dev_master, self._dev_slave, self.device_path = _pty()
        # The adapter's end.
        self.ad_fd: int | None = None
        self._ad_slave: int | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self.to_adapter_bytes = 0
        self.to_device_bytes = 0
        self.dropped_bytes = 0  # written while the adapter's end was unplugged
        self._filters: dict[str, Callable[[bytes], bytes]] = {}
        if tcp:
            self._listener = socket.create_server(("127.0.0.1", 0))
            self._listener.setblocking(False)
            self.adapter_url = f"socket://127.0.0.1:{self._listener.getsockname()[1]}"
        else:
            self.adapter_url = str(self.link)
            self.replug()
        self._thread = threading.Thread(target=self._run, name="cable", daemon=True)
        self._thread.start()

    # -- plugging ------------------------------------------------------------------
    def replug(self) -> None:
        """A new pty for the adapter's end, named by the symlink."""
        assert not self.tcp
        master, slave, path = _pty()
        with self._lock:
            self.ad_fd, self._ad_slave = master, slave
        tmp = self.link.with_suffix(".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(path)
        os.replace(tmp, self.link)
        self._wake()

    def unplug(self) -> None:
        """Pull the adapter's end: its pty goes away, and so does its name."""
        with self._lock:
            fds = [self.ad_fd, self._ad_slave]
            self.ad_fd = self._ad_slave = None
            conn, self._conn = self._conn, None
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        for fd in fds:
            if fd is not None:
                os.close(fd)
        if conn is not None:
            conn.close()
        self._wake()

    @property
    def plugged(self) -> bool:
        return self.ad_fd is not None

    # -- injecting -----------------------------------------------------------------
    def inject_to_adapter(self, data: bytes) -> None:
        """Raw bytes on the line as if the device wrote them."""
        with self._lock:
            fd = self.ad_fd
            if fd is not None:
                _write_all(fd, data)

    def inject_to_device(self, data: bytes) -> None:
        with self._lock:
            _write_all(self.dev_master, data)

    def filter(self, direction: str, fn: Callable[[bytes], bytes] | None) -> None:
        """Pass every chunk going ``"to_adapter"`` or ``"to_device"`` through ``fn``."""
        with self._lock:
            if fn is None:
                self._filters.pop(direction, None)
            else:
                self._filters[direction] = fn

    # -- the copying thread --------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                ad = self.ad_fd
                fds = [self.dev_master, self._wake_r]
                if ad is not None:
                    fds.append(ad)
                if self._listener is not None and ad is None:
                    fds.append(self._listener.fileno())
            try:
                ready, _, _ = select.select(fds, [], [], 0.5)
            except (OSError, ValueError):
                continue  # an fd closed under us (unplug): look again
            for fd in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif self._listener is not None and fd == self._listener.fileno():
                    self._accept()
                elif fd == self.dev_master:
                    self._pump(fd, "to_adapter")
                elif fd == ad:
                    self._pump(fd, "to_device")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        with self._lock:
            self._conn = conn
            self.ad_fd = conn.fileno()

    def _pump(self, fd: int, direction: str) -> None:
        with self._lock:
            # Unplugged since the select (and the number perhaps reused): leave it.
            if fd != (self.ad_fd if direction == "to_device" else self.dev_master):
                return
            self._pump_locked(fd, direction)

    def _pump_locked(self, fd: int, direction: str) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: the other side of this pty is closed (no peer now); EBADF: unplugged
            # under us.
            if exc.errno in (errno.EIO, errno.EBADF):
                return
            raise
        if not data:  # the TCP end hung up: unplugged
            if direction == "to_device" and self._conn is not None:
                self._conn.close()
                self._conn = None
                self.ad_fd = None
            return
        fn = self._filters.get(direction)
        if fn is not None:
            data = fn(data)
        if direction == "to_adapter":
            target = self.ad_fd
            self.to_adapter_bytes += len(data)
        else:
            target = self.dev_master
            self.to_device_bytes += len(data)
        if target is None:
            self.dropped_bytes += len(data)
            return
        with contextlib.suppress(OSError):
            _write_all(target, data)

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(5)
        self.unplug()
        for fd in (self.dev_master, self._dev_slave, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._listener is not None:
            self._listener.close()


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data``; what the other end has not made room for within a second is
    dropped (an end nobody reads, as a real line would)."""
    view = memoryview(data)
    deadline = time.monotonic() + 1.0
    while view and time.monotonic() < deadline:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 0.1)
            continue
        view = view[n:]


@pytest.fixture
def cable_factory(tmp_path: Path) -> Iterator[Callable[..., Cable]]:
    cables: list[Cable] = []

    def make(name: str = "ttyFC0", tcp: bool = False) -> Cable:
        cable = Cable(tmp_path, name, tcp=tcp)
        cables.append(cable)
        return cable

    yield make
    for cable in cables:
        cable.close()


@pytest.fixture
def cable(cable_factory: Callable[..., Cable]) -> Cable:
    return cable_factory()


def serial_settings(*ports: dict[str, Any], **options: Any) -> SerialSettings:
    """SerialSettings for tests: quick reopening unless told otherwise."""
    options.setdefault("reopen_min", 0.05)
    options.setdefault("reopen_max", 0.5)
    options.setdefault("connect_timeout", 5.0)
    return SerialSettings(ports=[SerialPortSettings(**p) for p in ports], **options)


@pytest.fixture
async def adapter_factory() -> AsyncIterator[Callable[..., Any]]:
    """``await make(settings)`` -> a started in-process SerialAdapter, every port open;
    stopped at teardown."""
    adapters: list[SerialAdapter] = []

    async def make(settings: SerialSettings, wait: bool = True) -> SerialAdapter:
        adapter = SerialAdapter(settings)
        adapters.append(adapter)
        await adapter.start()
        if wait:
            await adapter.wait_open(10)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.stop()


async def until(pred: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``pred`` until it is true (for counters that have no event to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


def serial_device(cable: Cable, device_id: str, token: str, **kwargs: Any) -> SerialDevice:
    """A SerialDevice on the device's end of ``cable``, with test-friendly timings."""
    kwargs.setdefault("backoff_max", 0.3)
    kwargs.setdefault("connect_timeout", 5.0)
    kwargs.setdefault("resend_after", 1.0)
    return SerialDevice(device_id, token, cable.device_path, **kwargs)


class RawLine:
    """A hand-driven device: raw bytes out, decoded frames in (no SDK in between)."""

    def __init__(self, url: str, crc: str = "crc16") -> None:
        self.ser = serial.serial_for_url(url, baudrate=115200, timeout=0.05)
        self.decoder = SerialDecoder(crc)
        self._pending: list[SerialFrame | SerialFrameError] = []

    def write(self, data: bytes) -> None:
        self.ser.write(data)

    def send(self, cmd: str, args: list[str]) -> None:
        self.ser.write(encode_frame(cmd, args, self.decoder.crc))

    async def read_frames(
        self, n: int, timeout: float = 5.0
    ) -> list[SerialFrame | SerialFrameError]:
        """The next ``n`` frames (or errors) from the line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._pending) < n:
            if loop.time() > deadline:
                raise AssertionError(f"wanted {n} frames, got {self._pending}")
            data = await asyncio.to_thread(self.ser.read, 4096)
            self._pending += self.decoder.feed(data)
        got, self._pending = self._pending[:n], self._pending[n:]
        return got

    async def expect(
        self, cmd: str, first_arg: str | None = None, timeout: float = 5.0
    ) -> SerialFrame:
        """Skip frames until one with ``cmd`` (and ``first_arg``, if given)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {cmd} {first_arg or ''} frame")
            (item,) = await self.read_frames(1, left)
            if isinstance(item, SerialFrame) and item.cmd == cmd:
                if first_arg is None or (item.args and item.args[0] == first_arg):
                    return item

    def close(self) -> None:
        self.ser.close()


# The serial suite needs no MQTT: its servers run without the MQTT edge (no port 1883
# to share with other suites, and a quicker start).
UP_ARGS = ("--mqtt-mode", "off")


def _finish(server: ServerProcess) -> None:
    if not server.running:
        server.stop()
        return
    try:
        server.assert_healthy()
    finally:
        code = server.stop()
    assert code == 0, f"fishchat-iot up exited {code} on SIGTERM:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def serial_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``fishchat-iot up`` per test module (tests use their own device ids)."""
    server = ServerProcess(tmp_path_factory.mktemp("up"), *UP_ARGS)
    server.start()
    yield server
    _finish(server)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own (one it restarts)."""
    server = ServerProcess(tmp_path / "own", *UP_ARGS)
    server.start()
    yield server
    _finish(server)


class _PtySerial(serial.Serial):
    """A pty has no modem lines: report them as a null-modem cable would."""

    @property
    def cts(self) -> bool:
        return True

    @property
    def dsr(self) -> bool:
        return True

    @property
    def ri(self) -> bool:
        return False

    @property
    def cd(self) -> bool:
        return True

    def _update_dtr_state(self) -> None:
        pass

    def _update_rts_state(self) -> None:
        pass

    def _update_break_state(self) -> None:
        pass


class Rfc2217Server:
    """A serial port served over the network with RFC 2217 (telnet COM port control),
    as a terminal server or ``ser2net`` in telnet mode does; pyserial's own PortManager
    does the protocol. One client at a time."""

    def __init__(self, serial_url: str) -> None:
        import serial.rfc2217

        self.ser = _PtySerial(serial_url, baudrate=115200, timeout=0.1)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"rfc2217://127.0.0.1:{self._listener.getsockname()[1]}"
        self._alive = True
        self._sock: socket.socket | None = None
        self._wlock = threading.Lock()
        self._manager_cls = serial.rfc2217.PortManager
        self._thread = threading.Thread(target=self._serve, name="rfc2217", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:  # PortManager's connection interface
        with self._wlock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendall(data)

    def _serve(self) -> None:
        while self._alive:
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            sock.settimeout(0.2)
            self._sock = sock
            manager = self._manager_cls(self.ser, self, logger=logging.getLogger("rfc2217srv"))
            reader = threading.Thread(target=self._to_network, args=(manager,), daemon=True)
            reader.start()
            while self._alive:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    self.ser.write(b"".join(manager.filter(data)))
                except Exception:
                    logging.getLogger("rfc2217srv").exception("filter")
            with self._wlock:
                self._sock = None
            sock.close()
            reader.join(2)

    def _to_network(self, manager: Any) -> None:
        while self._alive and self._sock is not None:
            try:
                data = self.ser.read(self.ser.in_waiting or 1)
            except Exception:
                return
            if data:
                self.write(b"".join(manager.escape(data)))

    def close(self) -> None:
        self._alive = False
        self._thread.join(5)
        self._listener.close()
        self.ser.close()
