"""A device SDK for serial devices (``docs/serial.md``): the TCP SDK's device speaking
the serial framing over a pyserial URL, to the serial adapter at the other end of the
line::

    async with SerialDevice("lamp-1", token, "/dev/ttyUSB0") as dev:
        await dev.send("bob", "hello")        # returns after ACCEPTED
        msg = await dev.receive()

:class:`SerialDevice` *is* a :class:`~firmware_sim.tcp_device.TcpDevice` — same
methods, counters, receipts, acks, dedupe, keepalive, reconnect and errors — whose
"connection" is one login session over the serial line instead of a TCP socket: a
small ``asyncio.Transport`` (``_SerialSession``) re-frames what the TCP device writes
(``4-byte length + JSON``) as serial frames (``COBS(JSON || CRC) 0x00``) and hands the
frames from the line to the TCP device's reader as TCP frames. Logging in is writing
``SEND_CLIENT_ID [id, token]`` down the line; the adapter opens the upstream session.

What the serial line adds, handled here:

* ``UPSTREAM_LOST`` from the adapter ends the session as a closed socket would; the
  TCP device's reconnect logic logs in again (a login that meets ``UPSTREAM_LOST``,
  e.g. the adapter just (re)opened its port, is sent again at once).
* ``NACK`` (the adapter dropped a frame of ours): during login the login is sent
  again; otherwise every message still waiting for its receipt, and the most recent
  acks, are written again (same ids: the server acknowledges a retry without a second
  copy, and receivers drop duplicates).
* A receipt lost on the way down: a message without its receipt after
  ``resend_after`` seconds is written again, same id.
* A frame from the adapter that fails its CRC (``corrupt_in``) may have been a
  delivery: with ``relogin_on_corrupt`` the device logs in again (at most once a
  second), and the server delivers every unacked message again.
* The device's own port failing is a lost connection: it is reopened on the next
  reconnect attempt (with the TCP device's backoff).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_adapters.serial.crc import Crc, get_crc
from device_adapters.serial.framing import (
    DELIMITER,
    LOST_STOPPING,
    NACK,
    UPSTREAM_LOST,
    SerialDecoder,
    SerialFrame,
    SerialFrameError,
    encode_body,
    tcp_bodies,
)
from device_adapters.serial.port import OPEN_ERRORS, SerialPort
from device_adapters.tcp.framing import FrameDecoder, encode_frame
from firmware_sim.bundle import Bundle
from firmware_sim.tcp_device import (
    CLOSED,
    CONNECT_FAILED,
    TIMEOUT,
    DeviceError,
    Message,
    TcpDevice,
    _Conn,
)

log = logging.getLogger("firmware_sim.serial")

RELOGIN_MIN_INTERVAL = 1.0  # seconds between log-ins caused by corrupt frames from the line
RECENT_ACKS = 32  # acked ids written again after a NACK
_LOGIN_REPLIES = frozenset({"LOGIN_OK", "ERROR"})


class _SerialSession(asyncio.Transport):
    """One login session over the line, as the TCP device's transport."""

    def __init__(
        self,
        device: SerialDevice,
        protocol: asyncio.StreamReaderProtocol,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__({"peername": device.port_url, "serial_url": device.port_url})
        self._device = device
        self._protocol = protocol
        self._loop = loop
        self._closing = False
        self._write_paused = False
        self._read_paused = False
        self.logging_in = True  # until LOGIN_OK or ERROR
        self.lost: list[str] | None = None  # the UPSTREAM_LOST args that ended it
        self._login_body: bytes | None = None

    # -- from the line ---------------------------------------------------------------
    def deliver(self, frame: SerialFrame) -> None:
        if self._closing:
            self._device.stray_frames += 1
            return
        if self.logging_in:
            if frame.cmd not in _LOGIN_REPLIES:
                # The tail of the previous session: not acked, so delivered again later.
                self._device.stray_frames += 1
                return
            self.logging_in = False
        body = frame.body
        self._protocol.data_received(len(body).to_bytes(4, "big") + body)

    def upstream_lost(self, args: list[str]) -> None:
        self.lost = args
        self._end()

    def resend_login(self) -> None:
        if self._login_body is not None and not self._closing:
            self._device._write_body(self._login_body)

    def drained(self) -> None:
        if self._write_paused and not self._closing:
            self._write_paused = False
            self._protocol.resume_writing()

    # -- asyncio.Transport ------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        for body in tcp_bodies(bytes(data)):
            if body.endswith(b"\n"):
                body = body[:-1]
            if self.logging_in and self._login_body is None:
                self._login_body = body
            self._device._write_body(body)
        if not self._write_paused and self._device._backed_up():
            self._write_paused = True
            self._protocol.pause_writing()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._read_paused:
            self._read_paused = False
            self._device._resume_line()
        self._device._session_ended(self)
        self._loop.call_soon(self._protocol.connection_lost, None)

    def pause_reading(self) -> None:  # the TCP device's reader is full
        if not self._read_paused and not self._closing:
            self._read_paused = True
            self._device._pause_line()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._device._resume_line()

    def is_reading(self) -> bool:
        return not self._read_paused and not self._closing

    def get_write_buffer_size(self) -> int:
        return self._device._line_backlog()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class SerialDevice(TcpDevice):
    """A device on a serial line; see the module docstring. ``port`` is a pyserial URL
    (a device path such as ``/dev/ttyUSB0`` or a pty's slave, ``socket://``,
    ``rfc2217://``, ``loop://``). Every other option is the TcpDevice's (no ``v1``, no
    gateway: the adapter knows where the msg_server is)."""

    _needs_address = False  # the serial adapter knows the msg_server

    def __init__(
        self,
        device_id: str,
        token: str,
        port: str,
        *,
        baudrate: int = 115200,
        crc: str | Crc = "crc16",
        resend_after: float = 2.0,
        relogin_on_corrupt: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("v1", False):
            raise ValueError("serial devices log in with a token: there are no v1 sessions")
        for key in ("gateway", "msg_server"):
            if kwargs.pop(key, None):
                raise ValueError(f"a serial device has no {key}: its serial adapter has one")
        if not port:
            raise ValueError("give the serial port: a device path or pyserial URL")
        super().__init__(device_id, token, **kwargs)
        self.port_url = port
        self.baudrate = baudrate
        self.crc = get_crc(crc)
        self.resend_after = resend_after
        self.relogin_on_corrupt = relogin_on_corrupt
        self._port: SerialPort | None = None
        self._decoder = SerialDecoder(self.crc, max(self.max_frame, 1 << 20))
        self._session: _SerialSession | None = None
        self._recent_acks: collections.deque[str] = collections.deque(maxlen=RECENT_ACKS)
        self._resender: asyncio.Task[None] | None = None
        self._nack_timer: asyncio.TimerHandle | None = None
        self._last_relogin = 0.0
        # Counters of the line (the TcpDevice's counters count messages as usual).
        self.corrupt_in = 0  # frames from the adapter that failed (CRC, COBS, size, JSON)
        self.nacks_received = 0  # NACKs from the adapter
        self.upstream_lost = 0  # UPSTREAM_LOST frames from the adapter
        self.relogins = 0  # log-ins caused by corrupt frames
        self.port_failures = 0  # the device's own port failed
        self.stray_frames = 0  # frames that arrived between sessions (dropped)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | Mapping[str, Any] | str | Path,
        *,
        port: str = "",
        e2e: bool = False,
        **kwargs: Any,
    ) -> SerialDevice:
        """A device from its provisioning bundle (a Bundle, its decoded JSON or its
        path) on serial port ``port``; the bundle's addresses are not used. ``e2e=True``
        seals and opens with the bundle's private key (the adapter forwards frames as
        they are, so end-to-end sealing works through it unchanged). A bundle with a
        ``psk`` (gateway-terminated device) always uses it, as TcpDevice.from_bundle."""
        bundle = cls._read_bundle(bundle, e2e, kwargs)
        kwargs.pop("gateway", None)
        kwargs.pop("msg_server", None)
        return cls(bundle.id, bundle.token, port, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the port, log in through the adapter and start the session. Raises
        DeviceError (the server's code, UNAVAILABLE from an adapter that cannot reach
        its msg_server, CONNECT_FAILED for a port that does not open, TIMEOUT)."""
        await super().connect()
        if self._resender is None and self.resend_after > 0:
            self._resender = asyncio.create_task(
                self._resend_unreceipted(), name=f"fishchat-serial-resend-{self.device_id}"
            )

    async def close(self) -> None:
        """Log out, stop, and close the port. Idempotent."""
        await super().close()
        if self._resender is not None:
            self._resender.cancel()
            self._resender = None
        if self._nack_timer is not None:
            self._nack_timer.cancel()
            self._nack_timer = None
        port, self._port = self._port, None
        if port is not None:
            await port.close(flush_timeout=0.5)

    # -- the session: TcpDevice's hook ----------------------------------------------------
    async def _open_session(self) -> _Conn:
        self._attempt += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._open_port()
                while True:
                    conn = await self._login_over_line()
                    if conn is not None:
                        return conn
                    await asyncio.sleep(random.uniform(0.02, 0.1))
        except TimeoutError:
            raise DeviceError(
                TIMEOUT,
                f"no answer to the login over {self.port_url} within "
                f"{self.connect_timeout:g}s: is the serial adapter running and the line "
                "connected?",
            ) from None

    async def _open_port(self) -> None:
        if self._port is not None:
            return
        port = SerialPort(
            self.port_url,
            self.baudrate,
            self._on_line_data,
            self._on_port_lost,
            self._on_line_drained,
            name=f"device-{self.device_id}",
        )
        try:
            await port.open()
        except OPEN_ERRORS as exc:
            raise DeviceError(
                CONNECT_FAILED, f"cannot open serial port {self.port_url}: {exc}"
            ) from None
        if self._closing:
            await port.close()
            raise DeviceError(CLOSED, "the device was closed while connecting")
        self._decoder = SerialDecoder(self.crc, max(self.max_frame, 1 << 20))
        self._port = port

    async def _login_over_line(self) -> _Conn | None:
        """One login attempt: the connection, or None when the adapter said
        UPSTREAM_LOST meanwhile (try again)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        session = _SerialSession(self, protocol, loop)
        old, self._session = self._session, session
        if old is not None:
            old.abort()
        protocol.connection_made(session)
        writer = asyncio.StreamWriter(session, protocol, reader, loop)
        decoder = FrameDecoder(max(self.max_frame, 1 << 20))
        writer.write(encode_frame("SEND_CLIENT_ID", [self.device_id, self.token]))
        try:
            leftover = await self._token_login(reader, decoder)
        except DeviceError:
            session.abort()
            if session.lost is not None and session.lost[0] != LOST_STOPPING:
                log.debug("%s: login met UPSTREAM_LOST %s; again", self.device_id, session.lost)
                return None
            raise
        except BaseException:
            session.abort()
            raise
        return _Conn(self.port_url, reader, writer, decoder, leftover)

    def _session_ended(self, session: _SerialSession) -> None:
        if self._session is session:
            self._session = None

    # -- the line -----------------------------------------------------------------------
    def _write_body(self, body: bytes) -> None:
        port = self._port
        if port is not None:
            # A 0x00 first: noise on an idle line then ends before the frame, not in it.
            port.write(DELIMITER + encode_body(body, self.crc))

    def _backed_up(self) -> bool:
        return self._port is not None and self._port.backed_up

    def _line_backlog(self) -> int:
        return self._port.write_buffer_size if self._port is not None else 0

    def _pause_line(self) -> None:
        if self._port is not None:
            self._port.pause_reading()

    def _resume_line(self) -> None:
        if self._port is not None:
            self._port.resume_reading()

    def _on_line_drained(self) -> None:
        if self._session is not None:
            self._session.drained()

    def _on_port_lost(self, exc: BaseException) -> None:
        self.port_failures += 1
        log.warning("%s: serial port %s failed: %s", self.device_id, self.port_url, exc)
        port, self._port = self._port, None
        if port is not None:
            asyncio.get_running_loop().create_task(port.close())
        if self._session is not None:
            self._session.abort()  # the TCP device reconnects, reopening the port

    def _on_line_data(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, SerialFrameError):
                self._on_corrupt(item)
                continue
            session = self._session
            if item.cmd == NACK:
                self._on_nack(item.args)
            elif item.cmd == UPSTREAM_LOST:
                self.upstream_lost += 1
                log.info("%s: the adapter says UPSTREAM_LOST %s", self.device_id, item.args[:2])
                if session is not None:
                    session.upstream_lost(item.args)
            elif session is not None:
                session.deliver(item)
            else:
                self.stray_frames += 1

    def _on_corrupt(self, err: SerialFrameError) -> None:
        self.corrupt_in += 1
        log.debug("%s: dropped a frame from the line: %s", self.device_id, err)
        if not self.relogin_on_corrupt or self._closing or not self.connected:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_relogin >= RELOGIN_MIN_INTERVAL:
            # It may have been a delivery: a new session gets every unacked one again.
            self._last_relogin = now
            self.relogins += 1
            self.drop()

    def _on_nack(self, args: list[str]) -> None:
        self.nacks_received += 1
        log.debug("%s: NACK %s", self.device_id, args[:2])
        session = self._session
        if session is not None and session.logging_in:
            session.resend_login()
            return
        if self._nack_timer is None:  # one resend for a burst of NACKs
            self._nack_timer = asyncio.get_running_loop().call_later(0.05, self._resend_after_nack)

    def _resend_after_nack(self) -> None:
        self._nack_timer = None
        if not self.connected:
            return  # the next login writes every waiting message anyway
        for out in list(self._outgoing.values()):
            if out.written and out.timer is None and self._write(out.frame):
                self.resent += 1
        if self._recent_acks:
            self._write(encode_frame("P2P_ACK", [self.device_id, *self._recent_acks]))

    async def _resend_unreceipted(self) -> None:
        """Write again every message that had no receipt for a whole period."""
        seen: dict[str, object] = {}
        while True:
            await asyncio.sleep(self.resend_after)
            if not self.connected:
                seen = {}
                continue
            now = dict(self._outgoing)
            for msg_id, out in now.items():
                if seen.get(msg_id) is out and out.written and out.timer is None:
                    if self._write(out.frame):
                        self.resent += 1
            seen = dict(now)

    # -- acks: remembered for a NACK ------------------------------------------------------
    def _flush_acks(self) -> None:
        self._recent_acks.extend(self._acks)
        super()._flush_acks()

    def ack(self, msg: Message) -> None:
        super().ack(msg)
        if msg.id:
            self._recent_acks.append(msg.id)
