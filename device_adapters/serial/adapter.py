"""The serial adapter: runs on the host the hardware is wired to, one device per port,
and bridges each port to its own TCP session on a msg_server (``docs/serial.md``).

Per port (``PortBridge``):

- **The port** is opened from its pyserial URL (``port.SerialPort``: a reader and a
  writer thread, the event loop never blocks). When it fails (USB unplugged, the pty's
  other side closed, the socket reset) the upstream session is closed — so the server
  ends the device's session and queues its messages — and the port is reopened with
  exponential backoff (``reopen_min`` doubling up to ``reopen_max``, with jitter).
  Every time it opens, the adapter tells the device ``UPSTREAM_LOST [PORT_OPENED]``: it
  has no session until it logs in.
- **Device → msg_server.** Each good frame's body is forwarded as it is, with the TCP
  length prefix. ``SEND_CLIENT_ID`` (the device's own id and token) opens a new
  upstream connection — closing the previous one, whose late frames are dropped — so
  every login is a fresh session with the device's own credentials. A command with no
  session gets ``UPSTREAM_LOST [NOT_LOGGED_IN]``. A frame that fails (CRC, COBS, size,
  JSON) is counted, answered with ``NACK [reason, text]`` and dropped.
- **msg_server → device.** Each frame is re-framed for the line. When the connection
  ends without the device asking (server restart, network), the device is told
  ``UPSTREAM_LOST [CLOSED]``; the next ``SEND_CLIENT_ID`` connects again. A login that
  cannot reach any upstream is answered ``ERROR [UNAVAILABLE, text]``, as a busy server
  would.
- **Backpressure** both ways: a serial line backed up above its high-water mark pauses
  reading from the upstream socket (the msg_server then feeds the device from its
  durable queue); an upstream socket backed up pauses reading from the port.

``SerialAdapter.stats()`` returns every port's counters (for the monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from device_adapters.serial.crc import Crc, get_crc
from device_adapters.serial.framing import (
    CORRUPT_REASONS,
    DELIMITER,
    LOST_CLOSED,
    LOST_NOT_LOGGED_IN,
    LOST_PORT_OPENED,
    LOST_STOPPING,
    NACK,
    NACK_BUSY,
    NACK_TOO_LARGE,
    UPSTREAM_LOST,
    SerialDecoder,
    SerialFrame,
    SerialFrameError,
    encode_body,
    encode_frame,
)
from device_adapters.serial.port import OPEN_ERRORS, SerialPort
from device_adapters.tcp.framing import FrameDecoder, FrameError
from device_adapters.tcp.framing import encode_frame as tcp_frame
from fishchat_iot import errors
from fishchat_iot.config import ConfigError, SerialSettings

log = logging.getLogger("fishchat.serial")

STABLE_AFTER = 2.0  # seconds a port must stay open for the reopen backoff to start over
PENDING_MAX = 256 * 1024  # bytes from the device held while its upstream connects
UPSTREAM_MAX_FRAME = 16 * 1024 * 1024  # sanity bound on frames from the msg_server
WARN_EVERY = 10.0  # seconds between warnings about dropped frames on one port


@dataclass(frozen=True, slots=True)
class PortConfig:
    """One port with every default resolved."""

    name: str
    url: str
    baudrate: int
    crc: Crc
    msg_server: str  # "" = none
    gateway: str  # "" = none

    @property
    def upstream(self) -> str:
        parts = []
        if self.gateway:
            parts.append(f"gateway {self.gateway}")
        if self.msg_server:
            parts.append(f"msg_server {self.msg_server}")
        return ", then ".join(parts)


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)``; ValueError if not."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _check_url(url: str, where: str) -> None:
    scheme, sep, _ = url.partition("://")
    if not sep:
        return  # a device path
    if (
        not scheme.isidentifier()
        or importlib.util.find_spec(f"serial.urlhandler.protocol_{scheme}") is None
    ):
        raise ConfigError(
            f"{where}: url {url!r}: pyserial has no {scheme!r} URLs: use a device path or "
            "rfc2217://, socket://, loop://, spy:// ..."
        )


def resolve_ports(settings: SerialSettings, default_msg_server: str = "") -> list[PortConfig]:
    """The ports of ``settings`` with their defaults filled in; ConfigError (one line,
    naming the port and the option) for anything that cannot work."""
    if settings.max_frame < 64:
        raise ConfigError(f"serial.max_frame {settings.max_frame} is too small: use 64 or more")
    if not 0 < settings.reopen_min <= settings.reopen_max:
        raise ConfigError("serial.reopen_min must be above 0 and at most serial.reopen_max")
    out: list[PortConfig] = []
    names: set[str] = set()
    for i, port in enumerate(settings.ports):
        where = f"serial.ports[{i}]"
        url = port.url.strip()
        _check_url(url, where)
        name = port.name or url
        if name in names:
            raise ConfigError(f"{where}: a second port named {name!r}: give each a distinct name")
        names.add(name)
        try:
            crc = get_crc(port.crc or settings.crc)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        baudrate = port.baudrate or settings.baudrate
        if baudrate <= 0:
            raise ConfigError(f"{where}: baudrate {baudrate} must be above 0")
        msg_server = port.msg_server or settings.msg_server or default_msg_server
        gateway = port.gateway or settings.gateway
        for key, addr in (("msg_server", msg_server), ("gateway", gateway)):
            if addr:
                try:
                    parse_address(addr)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {key}: {exc}") from None
        if not msg_server and not gateway:
            raise ConfigError(
                f"{where} ({name}): no upstream: set msg_server or gateway (host:port) in "
                "[serial] or in the port"
            )
        out.append(PortConfig(name, url, baudrate, crc, msg_server, gateway))
    return out


class _Upstream(asyncio.Protocol):
    """The TCP connection of one device session to its msg_server."""

    def __init__(self, bridge: PortBridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.detached = False  # replaced or closed by the adapter: ignore what comes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.detached:
            return
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if n > UPSTREAM_MAX_FRAME:
                log.warning("port %s: frame of %d bytes from upstream", self.bridge.name, n)
                self.close(abort=True)
                return
            if end - pos - 4 < n:
                break
            body = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            self.bridge._from_upstream(self, body)
            if self.detached:
                return
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge._upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.bridge._upstream_backed_up(self, True)

    def resume_writing(self) -> None:
        self.bridge._upstream_backed_up(self, False)

    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, abort: bool = False) -> None:
        self.detached = True
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


async def ask_gateway(addr: str, limit: float) -> str:
    """``REQ_MSG_SERVER`` → the msg_server address the gateway picks (within ``limit``
    seconds)."""
    host, port = parse_address(addr)
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(tcp_frame("REQ_MSG_SERVER", []))
            decoder = FrameDecoder(65536)
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the gateway closed without an answer")
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        raise ConnectionError(f"bad frame from the gateway: {item.text}")
                    cmd, args = item
                    if cmd == "SELECT_MSG_SERVER_FOR_CLIENT" and args:
                        parse_address(args[0])
                        return args[0]
                    raise ConnectionError(f"the gateway answered {cmd} {args[:2]}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class PortBridge:
    """One port, its device and that device's upstream session. ``start``/``stop``."""

    def __init__(self, cfg: PortConfig, settings: SerialSettings) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.settings = settings
        self.crc = cfg.crc
        self.decoder = SerialDecoder(cfg.crc, settings.max_frame)
        self.port: SerialPort | None = None
        self.upstream: _Upstream | None = None
        self.upstream_address = ""
        self.device_id = ""  # from the last SEND_CLIENT_ID
        self._connecting: asyncio.Task[None] | None = None
        self._pending = bytearray()  # TCP frames waiting for the upstream to connect
        self._task: asyncio.Task[None] | None = None
        self._port_lost: asyncio.Event = asyncio.Event()
        self.opened = asyncio.Event()  # set while the port is open
        self._stopping = False
        self._reading_paused = False
        self._last_warn = 0.0
        self._unwarned = 0
        # Counters (stats()).
        self.frames_in = 0  # good frames from the device
        self.frames_out = 0  # frames written to the device (relayed, NACK, UPSTREAM_LOST)
        self.bytes_in = 0
        self.bytes_out = 0
        self.corrupt = 0  # CRC mismatch, bad COBS, no body
        self.oversize = 0  # above max_frame, or no delimiter in time
        self.bad = 0  # CRC fine but not a command frame
        self.nacks = 0  # NACK frames sent
        self.nacks_suppressed = 0  # NACKs not sent because the line was backed up
        self.opens = 0
        self.reopens = 0  # opens after the first
        self.open_failures = 0
        self.port_losses = 0
        self.logins = 0  # SEND_CLIENT_ID frames relayed (upstream connections opened)
        self.upstream_failures = 0  # logins that could not reach any upstream
        self.upstream_lost = 0  # UPSTREAM_LOST [CLOSED] sent

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"serial-port-{self.name}"
        )

    async def stop(self) -> None:
        self._stopping = True
        self.opened.clear()
        self._close_upstream()
        port = self.port
        if port is not None and port.is_open:
            self._send(UPSTREAM_LOST, [LOST_STOPPING, "the serial adapter is stopping"])
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if port is not None:
            await port.close(flush_timeout=0.5)
            self.port = None

    @property
    def is_open(self) -> bool:
        return self.port is not None and self.port.is_open

    def stats(self) -> dict[str, Any]:
        if self.upstream is not None:
            state = "up"
        elif self._connecting is not None:
            state = "connecting"
        else:
            state = "none"
        return {
            "name": self.name,
            "url": self.cfg.url,
            "open": self.is_open,
            "device": self.device_id,
            "upstream": state,
            "upstream_address": self.upstream_address if state == "up" else "",
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "corrupt": self.corrupt,
            "oversize": self.oversize,
            "bad": self.bad,
            "nacks": self.nacks,
            "nacks_suppressed": self.nacks_suppressed,
            "opens": self.opens,
            "reopens": self.reopens,
            "open_failures": self.open_failures,
            "port_losses": self.port_losses,
            "logins": self.logins,
            "upstream_failures": self.upstream_failures,
            "upstream_lost": self.upstream_lost,
        }

    async def _run(self) -> None:
        s = self.settings
        delay = s.reopen_min
        failures_in_row = 0
        while not self._stopping:
            port = SerialPort(
                self.cfg.url,
                self.cfg.baudrate,
                self._on_bytes,
                self._on_port_lost,
                self._on_port_drained,
                name=self.name,
            )
            try:
                await port.open()
            except OPEN_ERRORS as exc:
                self.open_failures += 1
                failures_in_row += 1
                level = logging.WARNING if failures_in_row == 1 else logging.DEBUG
                log.log(
                    level,
                    "port %s: cannot open %s: %s; retrying in %.1fs (and backing off)",
                    self.name,
                    self.cfg.url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.0))
                delay = min(delay * 2, s.reopen_max)
                continue
            failures_in_row = 0
            self.opens += 1
            if self.opens > 1:
                self.reopens += 1
            self.port = port
            self._port_lost = asyncio.Event()
            self.decoder = SerialDecoder(self.crc, s.max_frame)
            self._reading_paused = False
            opened = time.monotonic()
            log.info(
                "port %s: open (%s, %s); upstream: %s",
                self.name,
                self.cfg.url,
                self.crc.name,
                self.cfg.upstream,
            )
            self.opened.set()
            self._send(UPSTREAM_LOST, [LOST_PORT_OPENED, "the adapter opened the port: log in"])
            await self._port_lost.wait()
            self.opened.clear()
            # The port is gone: end the device's session, then reopen.
            self.port_losses += 1
            self._close_upstream()
            self.port = None
            await port.close()
            if time.monotonic() - opened >= STABLE_AFTER:
                delay = s.reopen_min
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, s.reopen_max)

    def _on_port_lost(self, exc: BaseException) -> None:
        if self._stopping:
            return
        log.warning(
            "port %s: lost (%s); device %s's session is closed; reopening",
            self.name,
            exc,
            self.device_id or "-",
        )
        self._port_lost.set()

    # -- device -> upstream --------------------------------------------------------
    def _on_bytes(self, data: bytes) -> None:
        self.bytes_in += len(data)
        for item in self.decoder.feed(data):
            if isinstance(item, SerialFrameError):
                self._dropped(item)
            else:
                self._from_device(item)

    def _dropped(self, err: SerialFrameError) -> None:
        if err.reason in CORRUPT_REASONS:
            self.corrupt += 1
        elif err.reason == NACK_TOO_LARGE:
            self.oversize += 1
        else:
            self.bad += 1
        port = self.port
        if port is not None and port.backed_up:
            self.nacks_suppressed += 1
        else:
            self.nacks += 1
            self._send(NACK, [err.reason, err.text])
        now = time.monotonic()
        self._unwarned += 1
        if now - self._last_warn >= WARN_EVERY:
            log.warning(
                "port %s: dropped %d bad frame(s) from device %s (last: %s: %s)",
                self.name,
                self._unwarned,
                self.device_id or "-",
                err.reason,
                err.text,
            )
            self._last_warn = now
            self._unwarned = 0

    def _from_device(self, frame: SerialFrame) -> None:
        self.frames_in += 1
        cmd = frame.cmd
        if cmd == "SEND_CLIENT_ID":
            self._login(frame)
            return
        if cmd == NACK:
            log.debug("port %s: NACK from the device: %s", self.name, frame.args[:2])
            return
        data = len(frame.body).to_bytes(4, "big") + frame.body
        if self.upstream is not None:
            self.upstream.write(data)
        elif self._connecting is not None:
            if len(self._pending) + len(data) > PENDING_MAX:
                self.nacks += 1
                self._send(NACK, [NACK_BUSY, "the session is still connecting: send again"])
                return
            self._pending += data
        else:
            self._send(
                UPSTREAM_LOST,
                [LOST_NOT_LOGGED_IN, f"no session for {cmd[:40]}: log in with SEND_CLIENT_ID"],
            )

    def _login(self, frame: SerialFrame) -> None:
        self._close_upstream()
        self.device_id = frame.args[0][:64] if frame.args else ""
        self.logins += 1
        self._pending = bytearray(len(frame.body).to_bytes(4, "big") + frame.body)
        self._connecting = asyncio.get_running_loop().create_task(
            self._connect(), name=f"serial-upstream-{self.name}"
        )

    async def _connect(self) -> None:
        problems: list[str] = []
        upstream: _Upstream | None = None
        loop = asyncio.get_running_loop()
        timeout = self.settings.connect_timeout
        candidates: list[str] = []
        if self.cfg.gateway:
            try:
                candidates.append(await ask_gateway(self.cfg.gateway, timeout))
            except (OSError, ValueError, TimeoutError) as exc:
                problems.append(f"gateway {self.cfg.gateway}: {errors.reason(exc)}")
        if self.cfg.msg_server and self.cfg.msg_server not in candidates:
            candidates.append(self.cfg.msg_server)
        for addr in candidates:
            try:
                host, port = parse_address(addr)
                async with asyncio.timeout(timeout):
                    _, proto = await loop.create_connection(lambda: _Upstream(self), host, port)
                upstream = proto
                self.upstream_address = addr
                break
            except (OSError, ValueError, TimeoutError) as exc:
                problems.append(f"msg_server {addr}: {errors.reason(exc)}")
        if asyncio.current_task() is not self._connecting:
            if upstream is not None:  # replaced while connecting
                upstream.close()
            return
        self._connecting = None
        pending, self._pending = self._pending, bytearray()
        if upstream is None:
            self.upstream_failures += 1
            text = "; ".join(problems) or "no upstream address"
            log.warning("port %s: device %s: no upstream: %s", self.name, self.device_id, text)
            self._send("ERROR", [errors.UNAVAILABLE, f"the serial adapter cannot connect: {text}"])
            return
        self.upstream = upstream
        log.info(
            "port %s: device %s: session via %s", self.name, self.device_id, self.upstream_address
        )
        upstream.write(pending)

    def _close_upstream(self) -> None:
        """End the current session (the device asked for a new one, or the port went)."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        self._pending = bytearray()
        up, self.upstream = self.upstream, None
        if up is not None:
            up.close()
        if self._reading_paused:
            self._reading_paused = False
            if self.port is not None:
                self.port.resume_reading()

    # -- upstream -> device --------------------------------------------------------
    def _from_upstream(self, up: _Upstream, body: bytes) -> None:
        if up is not self.upstream:
            return
        if body.endswith(b"\n"):
            body = body[:-1]
        self._write(encode_body(body, self.crc))
        port = self.port
        if port is not None and port.backed_up and up.transport is not None:
            up.transport.pause_reading()

    def _upstream_lost(self, up: _Upstream, exc: Exception | None) -> None:
        if up is not self.upstream or up.detached:
            return
        self.upstream = None
        self.upstream_lost += 1
        reason = (
            f"the msg_server connection ended ({errors.reason(exc)})"
            if exc
            else ("the msg_server closed the connection")
        )
        log.info("port %s: device %s: %s", self.name, self.device_id, reason)
        self._send(UPSTREAM_LOST, [LOST_CLOSED, f"{reason}: log in again"])
        if self._reading_paused:
            self._reading_paused = False
            if self.port is not None:
                self.port.resume_reading()

    def _upstream_backed_up(self, up: _Upstream, backed_up: bool) -> None:
        if up is not self.upstream or self.port is None:
            return
        self._reading_paused = backed_up
        if backed_up:
            self.port.pause_reading()
        else:
            self.port.resume_reading()

    def _on_port_drained(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.resume_reading()

    def _send(self, cmd: str, args: list[str]) -> None:
        self._write(encode_frame(cmd, args, self.crc))

    def _write(self, frame: bytes) -> None:
        port = self.port
        if port is None or not port.is_open:
            return
        # A 0x00 first: noise on an idle line then ends before the frame, not in it.
        port.write(DELIMITER + frame)
        self.frames_out += 1
        self.bytes_out += len(frame) + 1


class SerialAdapter:
    """Every configured port. ``await start()``, ``stats()``, ``await stop()``.

    ``default_msg_server`` is the upstream of ports that name none (``up`` passes its
    own msg_server)."""

    def __init__(self, settings: SerialSettings, default_msg_server: str = "") -> None:
        self.settings = settings
        self.ports = [
            PortBridge(cfg, settings) for cfg in resolve_ports(settings, default_msg_server)
        ]

    async def start(self) -> None:
        for bridge in self.ports:
            bridge.start()

    async def stop(self) -> None:
        await asyncio.gather(*(bridge.stop() for bridge in self.ports))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per port name: frames and bytes in/out, corrupt, oversize, bad,
        nacks, reopens, logins, upstream state ... (see PortBridge.stats)."""
        return {bridge.name: bridge.stats() for bridge in self.ports}

    async def wait_open(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every port is open (for tests and start-up checks)."""
        async with asyncio.timeout(timeout):
            for bridge in self.ports:
                await bridge.opened.wait()
