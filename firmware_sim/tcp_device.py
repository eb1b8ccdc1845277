"""An asyncio device SDK for the FishChat TCP protocol (``docs/protocol.md``).

This is the client the tests, the fleet simulator and the benchmark drive devices with::

    async with TcpDevice("alice", token, gateway="127.0.0.1:17000") as dev:
        msg_id = await dev.send("bob", "hello")       # returns after ACCEPTED
        async for msg in dev.messages():               # Message(kind, id, sender, ...)
            print(msg.sender, msg.text)

What it does for the application:

* **Connecting** asks a gateway for a msg_server (``REQ_MSG_SERVER``), logs in there
  (``SEND_CLIENT_ID [id, token]`` → ``LOGIN_OK``) and raises :class:`DeviceError` with the
  server's code (``AUTH_FAILED``, ``REVOKED`` ...) when it is refused.
* **Sending** is at least once: ``send`` returns the message id when the server's
  ``ACCEPTED [id]`` arrives, or raises ``DeviceError`` for its ``ERROR [code, text, id]``.
  A message without a receipt when the connection drops is written again, same id, in
  the original order, right after the next login; ``UNAVAILABLE`` is retried after a
  backoff. At most ``max_inflight`` messages wait for receipts; ``send`` waits for room.
* **Receiving**: every ``RESP_MESSAGE_P2P`` / ``RESP_MESSAGE_TOPIC`` becomes a
  :class:`Message` on a bounded inbox (``receive()``, ``messages()``); with ``auto_ack``
  it is acked (``P2P_ACK``) once it is on the inbox (the acks of one read share a
  frame). A full inbox stops reading from the socket (TCP backpressure) instead of
  growing. Messages the server delivers
  again (same sender and id, after a reconnect) are acked again, counted in
  ``duplicates`` and not handed to the application; the ids seen are kept in a bounded
  LRU (``dedupe_max``).
* **Keepalive**: ``SEND_PING`` every ``keepalive / 3`` seconds; a token session that
  hears nothing (not even ``PONG``) for ``keepalive`` seconds is treated as dead.
* **Reconnect**: through the gateway again, exponential backoff with jitter from
  ``backoff_min`` to ``backoff_max``. ``SESSION_REPLACED``, ``REVOKED`` and
  ``AUTH_FAILED`` are final: the device stops and every waiter gets that error.
* **Closing** sends ``LOGOUT`` (token sessions), waits briefly for the server to close,
  cancels every task the device owns and fails whatever still waits with ``CLOSED``.
* **End-to-end encryption** (``docs/crypto.md``) when the device has its X25519 private
  key (``private_key=``, or ``from_bundle(path, e2e=True)``): ``send`` / ``publish`` seal
  (``SEND_MESSAGE_*_E2E``; peers' public keys come from ``GET_PUBLIC_KEY``, cached),
  sealed deliveries are opened before they reach the inbox (``Message.enc`` says how
  they came) and ones that do not open are acked, dropped and counted in
  ``open_failed``. Topic owners hand out group keys with ``share_topic_key`` (at
  creation and after a member leaves) and ``send_topic_key`` (a late joiner); a
  member takes a topic key from the topic's owner only (``set_topic_owner`` pins it,
  else the SDK asks the server with ``GET_TOPIC_OWNER``) and counts others in
  ``topic_keys_refused``.
* **TLS** (``tls=`` an ``ssl.SSLContext``, or ``from_bundle(path, tls=True)``, which
  trusts only the bundle's ``ca``): the gateway is asked for its TLS msg_server
  (``REQ_MSG_SERVER ["tls"]``) and the session runs over TLS.
* **Gateway-terminated devices** (``psk=``, or a bundle of ``device register --psk``,
  which ``from_bundle`` picks up): everything sent is sealed under the device's
  pre-shared key for the gateway (``enc`` ``psk-chacha20poly1305``), every delivery
  arrives sealed under it and is opened here. A body the gateway could read (from a PSK
  device, a v1 device, ``e2e=False``) reaches an end-to-end device as plaintext with
  ``Message.enc == "none"``: never mistaken for an end-to-end message.

:class:`V1Device` speaks exactly the FishChatServer v1 frames (no token, no receipts,
``PONG``-less keepalive) for compatibility tests: ``send`` returns ``""`` once the frame
is written, and a login refusal can only be seen as the server closing the connection
(within ``v1_login_wait`` seconds).

Error codes in :class:`DeviceError` are the server's (``fishchat_iot.errors``) or one of
the SDK's own (``CLOSED``, ``CONNECT_FAILED``, ``TIMEOUT``, ``PROTOCOL``, ``NOT_SUPPORTED``,
``LOGIN_REFUSED``). What this module shares with the MQTT SDK (ids, receipts, resends,
dedupe, acks, the inbox, sealing) is :class:`~firmware_sim.device_base.DeviceBase`; this
module is the TCP transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

from device_adapters.tcp.framing import FrameDecoder, FrameError, encode_frame
from firmware_sim.bundle import Bundle
from firmware_sim.device_base import (
    DeviceBase,
    DeviceOptions,
    _Outgoing,
)
from firmware_sim.device_types import (
    CLOSED,
    CONNECT_FAILED,
    FATAL_CODES,
    LOGIN_REFUSED,
    MAX_ID_LEN,
    NO_KEY,
    NOT_SUPPORTED,
    PROTOCOL,
    TIMEOUT,
    DeviceError,
    Message,
    _as_list,
    _describe,
    _Fatal,
    _now_ms,
    parse_address,
)
from fishchat_iot import errors

log = logging.getLogger("firmware_sim.tcp")

# The SDK's error codes, types and helpers live in firmware_sim.device_base (shared with
# the MQTT SDK); they are importable from here as before.
__all__ = [
    "CLOSED",
    "CONNECT_FAILED",
    "FATAL_CODES",
    "LOGIN_REFUSED",
    "MAX_ID_LEN",
    "NOT_SUPPORTED",
    "NO_KEY",
    "PROTOCOL",
    "TIMEOUT",
    "DeviceError",
    "Message",
    "TcpDevice",
    "V1Device",
    "parse_address",
]

# A session-level error (no reference) that most likely answers the request in flight.
_REQUEST_ERRORS = frozenset({errors.BAD_ARGS, errors.UNKNOWN_COMMAND, errors.BAD_FRAME})
ACK_BATCH = 256  # ids per P2P_ACK frame in token sessions (the server takes up to 999)
_PING_FRAME = encode_frame("SEND_PING", ["PING"])
_LOGOUT_FRAME = encode_frame("LOGOUT", [])
_READ_SIZE = 65536
# Control requests: the SDK's name -> the command.
_CONTROL = {
    "public_key": "GET_PUBLIC_KEY",
    "create_topic": "CREATE_TOPIC",
    "join_topic": "JOIN_TOPIC",
    "leave_topic": "LEAVE_TOPIC",
}


class _Conn:
    __slots__ = ("address", "decoder", "leftover", "reader", "writer")

    def __init__(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        leftover: list[tuple[str, list[str]] | FrameError],
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.leftover = leftover


async def _close_writer(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


class TcpDevice(DeviceBase[_Conn]):
    """One simulated device on the FishChat TCP protocol. See the module docstring.

    Give ``gateway`` (one ``"host:port"`` or several, asked in turn) and/or
    ``msg_server`` (used directly when no gateway answers, or when there is none).
    The other keyword arguments are :class:`~firmware_sim.device_base.DeviceOptions`.
    Every queue it keeps is bounded and every task it starts is cancelled by
    :meth:`close`. Not thread-safe: use it from one event loop.
    """

    # False in a subclass that brings its own link to the server (SerialDevice): it
    # then needs no gateway or msg_server address and overrides _open_session.
    _needs_address = True
    _log = log

    def __init__(
        self,
        device_id: str,
        token: str | None = None,
        gateway: str | Sequence[str] | None = None,
        msg_server: str | Sequence[str] | None = None,
        *,
        v1: bool = False,
        max_frame: int = 65536,
        v1_login_wait: float = 0.3,
        tls: ssl.SSLContext | None = None,
        **options: Unpack[DeviceOptions],
    ) -> None:
        if not device_id:
            raise ValueError("device_id must not be empty")
        if not v1 and not token:
            raise ValueError("a token is needed (use V1Device for a token-less v1 session)")
        super().__init__(device_id, token or "", **options)
        self.v1 = v1
        self._gateways = _as_list(gateway)
        self._msg_servers = _as_list(msg_server)
        # TLS: ask gateways for the TLS msg_server (REQ_MSG_SERVER ["tls"]) and log in
        # over TLS, checking the server with this context (``msg_server`` addresses
        # are then TLS listeners too).
        self.tls = tls
        if not self._gateways and not self._msg_servers and self._needs_address:
            raise ValueError("give a gateway or a msg_server address ('host:port')")
        for addr in (*self._gateways, *self._msg_servers):
            parse_address(addr)
        self.max_frame = max_frame
        self.v1_login_wait = v1_login_wait
        self._conn: _Conn | None = None
        self._last_rx = 0.0

    # -- construction helpers ------------------------------------------------
    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | Mapping[str, Any] | str | Path,
        *,
        gateway: str | Sequence[str] | None = None,
        msg_server: str | Sequence[str] | None = None,
        e2e: bool = False,
        tls: bool = False,
        **kwargs: Any,
    ) -> TcpDevice:
        """A token-session device from a provisioning bundle (a Bundle, its decoded JSON
        or the path of the file). ``gateway`` / ``msg_server`` override the bundle's.
        ``tls=True`` connects over TLS, trusting only the bundle's ``ca`` certificate,
        to the msg_server the gateway names for TLS or the bundle's ``msg_server_tls``.
        ``e2e=True`` seals and opens every message with the bundle's ``private_key``. A
        bundle with a ``psk`` (gateway-terminated device) always uses it."""
        bundle = cls._read_bundle(bundle, e2e, kwargs)
        if tls:
            ca = bundle.raw.get("ca")
            if not isinstance(ca, str) or not ca:
                raise ValueError(f"bundle of {bundle.id!r} has no CA certificate ('ca')")
            kwargs["tls"] = ssl.create_default_context(cadata=ca)
            if msg_server is None:
                raw = bundle.raw.get("msg_server_tls")
                msg_server = [raw] if isinstance(raw, str) else list(raw or [])
        return cls(
            bundle.id,
            bundle.token,
            gateway=gateway if gateway is not None else list(bundle.gateway),
            msg_server=msg_server if msg_server is not None else list(bundle.msg_server),
            **kwargs,
        )

    # -- state ---------------------------------------------------------------
    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(self._gateways)

    @property
    def msg_servers(self) -> tuple[str, ...]:
        return tuple(self._msg_servers)

    # -- lifecycle -----------------------------------------------------------
    def drop(self) -> None:
        """Abort the current connection as a network failure would (for tests and
        offline-period scenarios); the device reconnects if ``reconnect`` is on."""
        conn = self._conn
        if conn is not None:
            conn.writer.transport.abort()

    # -- sending: what v1 sessions do otherwise ----------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        """:meth:`DeviceBase.send`; v1 sessions return ``""`` as soon as the frame is
        written (v1 has no receipts)."""
        if self.v1:
            await self._write_when_ready(
                self._frame("SEND_MESSAGE_P2P", [to, text, self.device_id], "")
            )
            self.sent += 1
            return ""
        return await super().send(to, text, id=id, e2e=e2e)

    async def publish(
        self, topic: str, text: str, *, id: str | None = None, e2e: bool = True
    ) -> str:
        """:meth:`DeviceBase.publish`; v1 sessions return ``""`` once written."""
        if self.v1:
            await self._write_when_ready(self._frame("SEND_MESSAGE_TOPIC", [topic, text], ""))
            self.sent += 1
            return ""
        return await super().publish(topic, text, id=id, e2e=e2e)

    async def create_topic(self, name: str) -> None:
        """:meth:`DeviceBase.create_topic`; v1 sessions return once written."""
        if self.v1:
            await self._write_when_ready(self._control_frame("create_topic", name)[1])
            return
        await super().create_topic(name)

    async def leave_topic(self, name: str) -> None:
        """:meth:`DeviceBase.leave_topic`; v1 sessions have none (NOT_SUPPORTED)."""
        if self.v1:
            raise DeviceError(NOT_SUPPORTED, "v1 sessions have no LEAVE_TOPIC", name)
        await super().leave_topic(name)

    # -- internals: writing ----------------------------------------------------
    def _message(
        self, kind: str, to: str, msg_id: str, text: str, sealed: tuple[str, str] | None
    ) -> tuple[bytes, str]:
        cmd = "SEND_MESSAGE_P2P" if kind == "p2p" else "SEND_MESSAGE_TOPIC"
        if sealed is not None:
            return self._frame(f"{cmd}_E2E", [to, *sealed, msg_id], msg_id), ""
        if kind == "p2p":
            return self._frame(cmd, [to, text, self.device_id, msg_id], msg_id), ""
        return self._frame(cmd, [to, text, msg_id], msg_id), ""

    def _control_frame(self, op: str, name: str) -> tuple[str, bytes]:
        cmd = _CONTROL[op]
        args = [name, self.device_id] if cmd == "JOIN_TOPIC" else [name]
        return cmd, self._frame(cmd, args, name)

    def _write_out(self, out: _Outgoing) -> bool:
        return self._write(out.frame)

    def _write_control(self, frame: bytes) -> bool:
        return self._write(frame)

    def _write_ack(self, msg_id: str) -> None:
        self._write(encode_frame("P2P_ACK", [self.device_id, msg_id]))

    def _frame(self, cmd: str, args: list[str], ref: str) -> bytes:
        frame = encode_frame(cmd, args)
        if len(frame) - 4 > self.max_frame:
            raise DeviceError(
                errors.FRAME_TOO_LARGE,
                f"the {cmd} frame is {len(frame) - 4} bytes, above the {self.max_frame} limit",
                ref,
            )
        return frame

    def _write(self, frame: bytes) -> bool:
        conn = self._conn
        if conn is None or conn.writer.transport.is_closing():
            return False
        conn.writer.write(frame)
        return True

    async def _drain(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                await conn.writer.drain()

    async def _write_when_ready(self, frame: bytes) -> None:
        while True:
            await self._wait_ready()
            if self._write(frame):
                await self._drain()
                return
            await asyncio.sleep(0.01)  # the transport is closing: the session is ending

    # -- internals: sessions -------------------------------------------------
    async def _discard(self, session: _Conn) -> None:
        await _close_writer(session.writer, abort=True)

    def _attach(self, session: _Conn) -> None:
        self._conn = session
        self.address = session.address
        self._last_rx = asyncio.get_running_loop().time()
        req = self._request
        if req is not None and not req.future.done():
            self._write(req.frame)

    async def _goodbye(self) -> None:
        # LOGOUT → OK ["LOGOUT", id], then the server closes: the session ends.
        sup = self._supervisor
        if sup is not None and not self.v1 and self._write(_LOGOUT_FRAME):
            with contextlib.suppress(Exception):
                await asyncio.wait({sup}, timeout=self.logout_timeout)

    async def _close_session(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            await _close_writer(conn.writer, abort=True)

    async def _open_any(self) -> _Conn:
        self._attempt += 1
        problems: list[str] = []
        candidates: list[str] = []
        for gw in self._rotated(self._gateways):
            try:
                candidates = [await self._ask_gateway(gw)]
                break
            except (OSError, DeviceError, FrameError) as exc:
                problems.append(f"gateway {gw}: {_describe(exc)}")
        if not candidates:
            candidates = self._rotated(self._msg_servers)
        if not candidates:
            raise DeviceError(CONNECT_FAILED, "; ".join(problems) or "no address to connect to")
        last: DeviceError | None = None
        for addr in candidates:
            try:
                return await self._login(addr)
            except DeviceError as exc:
                if exc.code in FATAL_CODES or exc.code == LOGIN_REFUSED:
                    raise
                last = exc
            except OSError as exc:
                last = DeviceError(CONNECT_FAILED, f"msg_server {addr}: {_describe(exc)}")
        assert last is not None
        if problems:  # say why the gateways were passed over, too
            raise DeviceError(last.code, "; ".join([*problems, last.text]), last.ref)
        raise last

    async def _ask_gateway(self, addr: str) -> str:
        host, port = parse_address(addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(encode_frame("REQ_MSG_SERVER", ["tls"] if self.tls else []))
            decoder = FrameDecoder(max(self.max_frame, 1 << 20))
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise DeviceError(PROTOCOL, "the gateway closed without an answer")
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        raise DeviceError(PROTOCOL, f"bad frame from the gateway: {item.text}")
                    cmd, args = item
                    if cmd == "SELECT_MSG_SERVER_FOR_CLIENT" and args:
                        parse_address(args[0])  # ValueError is a protocol problem
                        return args[0]
                    if cmd == "ERROR":
                        code = args[0] if args else PROTOCOL
                        raise DeviceError(code, args[1] if len(args) > 1 else "")
                    raise DeviceError(PROTOCOL, f"the gateway answered {cmd} {args}")
        except ValueError as exc:
            raise DeviceError(PROTOCOL, f"the gateway named a bad address: {exc}") from None
        finally:
            await _close_writer(writer)

    async def _login(self, addr: str) -> _Conn:
        host, port = parse_address(addr)
        if self.tls is not None:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self.tls, server_hostname=host
            )
        else:
            reader, writer = await asyncio.open_connection(host, port)
        decoder = FrameDecoder(max(self.max_frame, 1 << 20))
        try:
            if self.v1:
                writer.write(encode_frame("SEND_CLIENT_ID", [self.device_id]))
                leftover = await self._v1_login(reader, decoder)
            else:
                writer.write(encode_frame("SEND_CLIENT_ID", [self.device_id, self.token]))
                leftover = await self._token_login(reader, decoder)
        except BaseException:
            await _close_writer(writer, abort=True)
            raise
        return _Conn(addr, reader, writer, decoder, leftover)

    async def _token_login(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> list[tuple[str, list[str]] | FrameError]:
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise DeviceError(CLOSED, "the msg_server closed the connection during login")
            items = decoder.feed(data)
            if not items:
                continue
            first = items[0]
            if isinstance(first, FrameError):
                raise DeviceError(PROTOCOL, f"bad frame in answer to login: {first.text}")
            cmd, args = first
            if cmd == "LOGIN_OK":
                return items[1:]
            if cmd == "ERROR":
                code = args[0] if args else PROTOCOL
                raise DeviceError(code, args[1] if len(args) > 1 else "login refused")
            raise DeviceError(PROTOCOL, f"the msg_server answered login with {cmd} {args}")

    async def _v1_login(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> list[tuple[str, list[str]] | FrameError]:
        # v1 acknowledges nothing: silence means logged in, a close means refused.
        try:
            async with asyncio.timeout(self.v1_login_wait):
                data = await reader.read(_READ_SIZE)
        except TimeoutError:
            return []
        if not data:
            raise DeviceError(
                LOGIN_REFUSED,
                "the msg_server closed the connection after the v1 login: the device is "
                "unknown, revoked or not registered --v1, or the listener refuses v1",
            )
        return decoder.feed(data)

    async def _serve(self, conn: _Conn) -> None:
        pinger = (
            asyncio.create_task(self._keepalive(conn), name=f"fishchat-ping-{self.device_id}")
            if self.keepalive > 0
            else None
        )
        loop = asyncio.get_running_loop()
        try:
            items = conn.leftover
            conn.leftover = []
            while True:
                for item in items:
                    if isinstance(item, FrameError):
                        log.warning("%s: bad frame from server: %s", self.device_id, item.text)
                        if item.fatal:
                            return
                        continue
                    await self._dispatch(item[0], item[1])
                self._flush_acks()
                data = await conn.reader.read(_READ_SIZE)
                if not data:
                    return
                self._last_rx = loop.time()
                items = conn.decoder.feed(data)
        finally:
            self._connected.clear()
            if pinger is not None:
                pinger.cancel()
                with contextlib.suppress(BaseException):
                    await pinger
            if self._conn is conn:
                self._conn = None
            await _close_writer(conn.writer, abort=True)

    async def _keepalive(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        interval = self.keepalive / 3
        while True:
            await asyncio.sleep(interval)
            if not self.v1 and loop.time() - self._last_rx > self.keepalive:
                log.info(
                    "%s: nothing heard for %.0fs; reconnecting", self.device_id, self.keepalive
                )
                conn.writer.transport.abort()
                return
            if not conn.writer.transport.is_closing():
                conn.writer.write(_PING_FRAME)

    # -- internals: what the server sends --------------------------------------
    async def _dispatch(self, cmd: str, args: list[str]) -> None:
        n = len(args)
        if cmd == "RESP_MESSAGE_P2P" and n >= 3:
            # token: [msg, from, id, ts_ms] [+ enc when sealed]; v1: [msg, from, uuid]
            ts = int(args[3]) if n >= 4 and args[3].isdigit() else _now_ms()
            msg = Message("p2p", args[2], args[1], args[0], "", ts)
            await self._take(msg, args[4] if n >= 5 else "none")
        elif cmd == "RESP_MESSAGE_TOPIC" and n >= 3:
            # token: [topic, msg, from, id, ts_ms] [+ enc when sealed]; v1: [topic, msg, from]
            msg_id = args[3] if n >= 4 else ""
            ts = int(args[4]) if n >= 5 and args[4].isdigit() else _now_ms()
            msg = Message("topic", msg_id, args[2], args[1], args[0], ts)
            await self._take(msg, args[5] if n >= 6 else "none")
        elif cmd == "TOPIC_OWNER" and n >= 2:
            await self._got_topic_owner(args[0], args[1])
        elif cmd == "PUBLIC_KEY" and n >= 2:
            await self._got_public_key(args[0], args[1])
            self._answer("GET_PUBLIC_KEY", args[0], args[1])
        elif cmd == "ACCEPTED" and n >= 1:
            self._accepted(args[0])
        elif cmd == "ERROR":
            code = args[0] if args else PROTOCOL
            self._on_error(code, args[1] if n > 1 else "", args[2] if n > 2 else "")
        elif cmd == "PONG":
            pass
        elif cmd == "OK" and n >= 2:
            self._answer(args[0], args[1], args[1])
        elif cmd == "LOCATE_TOPIC_MSG_ADDR" and n >= 2:
            self._answer("JOIN_TOPIC", args[1], args[0])
        else:
            log.debug("%s: ignoring %s %s", self.device_id, cmd, args)

    def _unmatched_error(self, code: str, text: str, ref: str) -> None:
        if ref:
            log.info("%s: server error for %r: %s %s", self.device_id, ref, code, text)
            return
        log.info("%s: server error: %s %s", self.device_id, code, text)
        if code in FATAL_CODES:
            raise _Fatal(DeviceError(code, text))
        req = self._request
        if code in _REQUEST_ERRORS and req is not None and not req.future.done():
            req.future.set_exception(DeviceError(code, text, req.name))

    def _ask_public_key(self, device_id: str) -> None:
        self._write(encode_frame("GET_PUBLIC_KEY", [device_id]))

    def _ask_topic_owner(self, topic: str) -> bool:
        # Not written (the session is ending): the key stays unacked and comes again.
        self._write(encode_frame("GET_TOPIC_OWNER", [topic]))
        return True

    def _flush_acks(self) -> None:
        """Write the acks gathered from one read: v1 sessions one ``P2P_ACK [client_id,
        uuid]`` each, token sessions up to ACK_BATCH ids per frame."""
        acks = self._acks
        if not acks:
            return
        self._acks = []
        out = bytearray()
        if self.v1:
            for msg_id in acks:
                out += encode_frame("P2P_ACK", [self.device_id, msg_id])
        else:
            for i in range(0, len(acks), ACK_BATCH):
                out += encode_frame("P2P_ACK", [self.device_id, *acks[i : i + ACK_BATCH]])
        self._write(bytes(out))


class V1Device(TcpDevice):
    """A FishChatServer v1 client: ``SEND_CLIENT_ID [id]`` without a token, the v1
    argument lists, acks ``P2P_ACK [client_id, uuid]``, no receipts, no LEAVE_TOPIC.
    The device must be registered ``--v1`` and the listener must allow v1."""

    def __init__(
        self,
        device_id: str,
        gateway: str | Sequence[str] | None = None,
        msg_server: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("v1", None)
        kwargs.pop("token", None)
        super().__init__(device_id, None, gateway, msg_server, v1=True, **kwargs)
