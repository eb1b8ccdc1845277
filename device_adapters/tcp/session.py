"""One device connection on the msg_server TCP listener: decodes v1 frames, hands the
commands to the core, and encodes what the core emits.

Built the way DESIGN section 9 measured fast: an ``asyncio.Protocol`` that parses every
complete frame of a read in one call, appends every reply and delivery to a per-session
``bytearray`` and writes each session once per event-loop turn.

A v1 session (logged in without a token) is sent only v1 frames with v1 argument lists;
whatever it cannot be told (errors, receipts) is logged instead, and bad input from it
closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import orjson

from device_adapters.tcp.framing import FrameError, Item, append_frame, decode
from device_adapters.tcp.listener import TcpListener
from fishchat_iot import errors
from fishchat_iot.core.envelope import KIND_P2P, KIND_TOPIC, Envelope
from fishchat_iot.core.session import CLOSED, Session
from fishchat_iot.crypto.gateway import for_last_hop
from fishchat_iot.crypto.seal import CryptoError, parse_enc
from fishchat_iot.limits import DeviceRate, host_of, limits_for
from fishchat_iot.roles.msg_server import MAX_ID_LEN, MsgServer, valid_name
from fishchat_iot.stores.base import StoreUnavailable
from fishchat_iot.tls import peer_cn

log = logging.getLogger("fishchat.tcp")

MAX_BAD_FRAMES = 20  # a token session sending more bad frames than this is closed

# A handler returns a task when the command finishes later (it needs the store): the
# session's next frames wait for it, so a device's commands take effect in the order
# it sent them (JOIN_TOPIC then SEND_MESSAGE_TOPIC; a topic message then a p2p one).
Handler = Callable[["TcpSession", list[str]], "asyncio.Task[Any] | None"]

# The frames written once per message, by template: length, the command's bytes up to
# its Args (what append_frame would write), orjson of the args, "}\n" — byte-identical
# to append_frame without a dict lookup and a call per frame.
_pack_len = struct.Struct(">I").pack
_dumps = orjson.dumps
_P2P_PREFIX = b'{"CmdName":"RESP_MESSAGE_P2P","Args":'
_P2P_EXTRA = len(_P2P_PREFIX) + 2
_ACCEPTED_PREFIX = b'{"CmdName":"ACCEPTED","Args":'
_ACCEPTED_EXTRA = len(_ACCEPTED_PREFIX) + 2
_FRAME_END = b"}\n"
_ts_text: tuple[int, str] = (0, "0")  # the last delivery timestamp and its text


class TcpSession(Session, asyncio.Protocol):
    """One device connection. Slotted: an idle session is mostly this object, the
    transport and the core's tables (docs/benchmarks.md, memory per idle session)."""

    __slots__ = (
        "_read_pauses",
        "_throttled",
        "_write_paused",
        "bad_frames",
        "batch_ms",
        "cert_id",
        "held",
        "inbuf",
        "input_holds",
        "limits",
        "listener",
        "logging_in",
        "login_task",
        "login_timer",
        "rate",
        "server",
        "spoof_logged",
        "transport",
        "waiting",
    )

    transport_name = "tcp"

    def __init__(self, listener: TcpListener, server: MsgServer) -> None:
        super().__init__()
        self.listener = listener
        self.server = server
        self.inbuf: bytearray | None = None  # a frame's first part, until the rest comes
        self.transport: asyncio.Transport | None = None
        self.logging_in = False
        self.waiting = False  # a command is waiting for the store: hold the next frames
        self.held: list[Item] | None = None  # frames read while logging in or waiting
        self.input_holds = 0  # pause_input() calls not yet resumed (the core's backpressure)
        self.batch_ms = 0  # wall clock (ms) of the batch of frames being handled
        self.login_task: asyncio.Task[None] | None = None
        self.login_timer: asyncio.TimerHandle | None = None
        self.bad_frames = 0
        self.spoof_logged = False
        self._write_paused = False
        self._read_pauses = 0
        self.cert_id: str | None = None  # CN of a verified client certificate (TLS)
        self.limits = limits_for(server)
        self.rate: DeviceRate | None = None  # the device's rate buckets, once logged in
        self._throttled = False  # reading paused until the device's rate debt is paid

    @property
    def peer(self) -> str:
        """The device's address, for logs and per-address limits (asked of the
        transport when needed: an idle session keeps no string for it)."""
        t = self.transport
        try:
            peer = t.get_extra_info("peername") if t is not None else None
        except Exception:  # a closed transport may have no socket to ask
            peer = None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self.transport)
        # No TCP_NODELAY here: asyncio and uvloop set it on every TCP transport, and
        # asking for the socket object makes uvloop keep one per connection.
        peer = transport.get_extra_info("peername")
        if peer and not self.limits.connection_allowed(str(peer[0]), self.listener.name):
            self.transport.abort()  # over limits.conn_rate: no frame, no timer
            return
        if self.listener.tls is not None:
            self.cert_id = peer_cn(transport.get_extra_info("peercert"))
        self.login_timer = asyncio.get_running_loop().call_later(
            self.server.settings.tcp.login_timeout, self._login_timed_out
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.listener.connections.discard(self.transport)
        if self.login_timer is not None:
            self.login_timer.cancel()
        if self.login_task is not None:
            self.login_task.cancel()
        self.server.session_closed(self)

    def eof_received(self) -> bool | None:
        if self.inbuf:
            who = f"{self.device_id} ({self.peer})" if self.node is not None else self.peer
            log.warning(
                "%s hung up in the middle of a frame (%d bytes of it received)",
                who,
                len(self.inbuf),
            )
        return None  # close the transport

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.server.writable_again(self)

    def data_received(self, data: bytes) -> None:
        items, self.inbuf = decode(self.inbuf, data, self.server.settings.tcp.max_frame)
        rate = self.rate
        if self.node is not None:
            self.last_seen = now = time.monotonic()
            if rate is not None:  # one refill per read batch (limits.py)
                rate.refill(now)
                rate.take_bytes(len(data))
        self._handle(items)

    # -- command dispatch ------------------------------------------------------------
    def _handle(self, items: list[Item]) -> None:
        # One wall-clock read per batch: every message of it is stamped with it. Reset
        # afterwards: an idle session need not keep an int object for it.
        self.batch_ms = int(time.time() * 1000)
        try:
            self._dispatch(items)
        finally:
            self.batch_ms = 0
        # After every batch handled, whether just read or held back until now (login,
        # a command waiting, the core's backpressure): its messages count against the
        # rate before anything more is read.
        rate = self.rate
        if rate is not None and not self._throttled:
            wait = rate.wait()
            if wait > 0:  # over the byte rate (or a v1 session over the message rate)
                self._throttle(wait)

    def _dispatch(self, items: list[Item]) -> None:
        transport = self.transport
        commands = COMMANDS
        rated = self.rate is not None  # set at login, which a batch never spans
        # The usual frame, a token session's SEND_MESSAGE_P2P [to, body, from, id] with
        # its own id as from (or none) and a valid message id, takes a short lane: no
        # table lookup or per-command checks, and the core's one-step live path
        # (MsgServer.send_live) before its general one. Open while the session is
        # logged in and its connection open; looked at again after any other frame.
        lane = self._lane_open()
        me = self.device_id
        ts = self.batch_ms
        server = self.server
        for i, item in enumerate(items):
            if self.logging_in or self.waiting or self.input_holds or self.held is not None:
                # Bounded: reading is paused during login, while a command waits and
                # while the core holds this device back (the rest of this read waits,
                # and what comes next waits behind it).
                if self.held is None:
                    self.held = items[i:]
                else:
                    self.held.extend(items[i:])
                return
            if lane and type(item) is tuple and item[0] == "SEND_MESSAGE_P2P":
                args = item[1]
                if (
                    len(args) == 4
                    and (not args[2] or args[2] == me)
                    and args[3]
                    and len(args[3]) <= MAX_ID_LEN
                ):
                    if rated and not self._within_rate("SEND_MESSAGE_P2P", args):
                        continue
                    if not server.send_live(self, args[0], args[1], args[3], ts):
                        server.send_p2p(self, args[0], args[1], args[3], ts=ts)
                        lane = self._lane_open()
                    continue
            lane = False  # any other frame: the lane opens again after it
            if transport is None or transport.is_closing():
                return
            if isinstance(item, FrameError):
                self._bad_frame(item)
                continue
            cmd, args = item
            if self.node is None:
                if cmd == "SEND_CLIENT_ID":
                    self._begin_login(args)
                else:
                    self._refuse(errors.NOT_LOGGED_IN, f"{cmd} before SEND_CLIENT_ID")
                continue
            if self.mode is CLOSED:
                return
            entry = commands.get(cmd)
            if entry is None:
                self._bad_input(errors.UNKNOWN_COMMAND, f"unknown command {cmd[:40]!r}")
                continue
            lo, hi, handler = entry
            if not lo <= len(args) <= hi:
                want = f"{lo}" if lo == hi else f"{lo} to {hi}"
                self._bad_input(errors.BAD_ARGS, f"{cmd} takes {want} arguments, got {len(args)}")
                continue
            if rated and cmd in RATED and not self._within_rate(cmd, args):
                continue
            task = handler(self, args)
            if task is not None and not task.done():
                self.waiting = True
                self._pause_reading()
                task.add_done_callback(self._command_done)
            lane = self._lane_open()

    def _lane_open(self) -> bool:
        """May the next frame take _dispatch's short lane?"""
        t = self.transport
        return (
            self.node is not None
            and self.mode is not CLOSED
            and not self.v1
            and t is not None
            and not t.is_closing()
        )

    def _command_done(self, task: asyncio.Task[Any]) -> None:
        self.waiting = False
        self._handle_held()
        self._resume_reading()

    def _handle_held(self) -> None:
        """Handle the frames read while the session was held back, in order (any that
        are held back again wait in ``held`` once more)."""
        held, self.held = self.held, None
        if held:
            self._handle(held)

    def _bad_frame(self, err: FrameError) -> None:
        if self.node is None:
            self._refuse(err.code, err.text)
        elif err.fatal:
            # The stream cannot be resynced: close. A v1 session is only closed (it
            # must never be sent ERROR); a token session is told why first.
            log.warning(
                "bad input from %s (%s): %s: %s", self.device_id, self.peer, err.code, err.text
            )
            self.drop(err.code, err.text)
            self.server.session_closed(self)
        else:
            self._bad_input(err.code, err.text)

    def _bad_input(self, code: str, text: str) -> None:
        """Bad input in a logged-in session: told (token) or closed (v1); logged once."""
        log.warning("bad input from %s (%s): %s: %s", self.device_id, self.peer, code, text)
        if self.v1:
            self.drop(code, text)
            self.server.session_closed(self)
            return
        self.bad_frames += 1
        if self.bad_frames > MAX_BAD_FRAMES:
            self.drop(code, f"{text}; too many bad frames, closing")
            self.server.session_closed(self)
            return
        self.emit_error(code, text)
        self.mark_dirty()

    def _refuse(self, code: str, text: str) -> None:
        """Refuse a connection that has not logged in: one ERROR frame, then close."""
        log.warning("refused %s: %s: %s", self.peer, code, text)
        if self.transport is not None and not self.transport.is_closing():
            out = bytearray()
            append_frame(out, "ERROR", [code, text])
            self.transport.write(out)
            self.transport.close()

    def _within_rate(self, cmd: str, args: list[str]) -> bool:
        """A message within the device's limits.msg_rate? Over it, a token session is
        told RATE_LIMITED (not accepted); a v1 session is served and its reading paused
        after this batch until the rate allows (it cannot parse ERROR)."""
        assert self.rate is not None
        if self.rate.take_msg(force=self.v1) or self.v1:
            return True
        i = RATED[cmd]
        ref = args[i] if len(args) > i else ""
        self.emit_error(
            errors.RATE_LIMITED,
            f"over {self.server.settings.limits.msg_rate:g} messages/s (limits.msg_rate): "
            "not accepted, send it again later",
            ref,
        )
        self.mark_dirty()
        return False

    def _throttle(self, wait: float) -> None:
        self._throttled = True
        self._pause_reading()
        asyncio.get_running_loop().call_later(min(wait, 60.0), self._unthrottle)

    def _unthrottle(self) -> None:
        self._throttled = False
        self._resume_reading()

    # -- login -----------------------------------------------------------------------
    def _begin_login(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            self._refuse(errors.BAD_ARGS, "SEND_CLIENT_ID takes [id] or [id, token]")
            return
        if not valid_name(args[0]) or len(args[0]) > 64:
            if len(args) == 1:
                # A v1 login: a v1 client cannot parse ERROR, so close without one.
                log.warning(
                    "refused v1 login of %r from %s: invalid device id", args[0][:70], self.peer
                )
                if self.transport is not None:
                    self.transport.close()
            else:
                self._refuse(errors.AUTH_FAILED, f"invalid device id {args[0][:70]!r}")
            return
        token = args[1] if len(args) == 2 else None
        why = self.limits.login_blocked(host_of(self.peer), args[0])
        if why is not None:  # failed-login throttling: refused without a registry lookup
            if token is None:
                if self.transport is not None:
                    self.transport.close()
            elif self.transport is not None and not self.transport.is_closing():
                out = bytearray()
                append_frame(out, "ERROR", [errors.THROTTLED, why])
                self.transport.write(out)
                self.transport.close()
            return
        self.logging_in = True
        self._pause_reading()
        # [id] on TLS with a verified client certificate whose CN is that id: a token
        # session authenticated by the certificate (docs/security.md).
        cert = token is None and self.cert_id is not None and self.cert_id == args[0]
        self.login_task = asyncio.get_running_loop().create_task(self._login(args[0], token, cert))

    async def _login(self, device_id: str, token: str | None, cert: bool = False) -> None:
        failure = await self.server.login(self, device_id, token, cert=cert)
        self.login_task = None
        if self.transport is None or self.transport.is_closing():
            self.server.session_closed(self)
            return
        if failure is not None:
            code, text = failure
            if code == errors.AUTH_FAILED or code == errors.V1_NOT_ALLOWED:
                host = host_of(self.peer)
                why = self.limits.login_blocked(host, device_id)
                if why is None:
                    self.limits.login_failed(host, device_id)
                else:
                    # Other attempts reached the limit while this one read the registry:
                    # answered like the attempts after it, so no more than
                    # limits.login_fail_burst failures are ever told apart.
                    code, text = errors.THROTTLED, why
            if token is None and not cert:
                # A v1 client cannot parse ERROR: close, and say why in the log.
                log.warning("refused v1 login of %r from %s: %s", device_id, self.peer, text)
                self.transport.close()
            else:
                self._refuse(code, text)
            return
        if self.login_timer is not None:
            self.login_timer.cancel()
            self.login_timer = None
        self.rate = self.limits.device_rate(device_id, host_of(self.peer))
        log.info(
            "device %s logged in from %s (%s)",
            device_id,
            self.peer,
            "v1" if self.v1 else ("certificate" if cert else "token"),
        )
        if not self.v1:
            # Ahead of anything the queue feed appends.
            head = bytearray()
            append_frame(head, "LOGIN_OK", [device_id])
            self.out[:0] = head
            self.mark_dirty()
        self.logging_in = False
        self._handle_held()
        self._resume_reading()

    def _login_timed_out(self) -> None:
        self.login_timer = None
        if self.node is None:
            self._refuse(errors.NOT_LOGGED_IN, "no SEND_CLIENT_ID within the login timeout")

    # -- flow control ------------------------------------------------------------------
    def _pause_reading(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and self.transport is not None:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        self._read_pauses -= 1
        if (
            self._read_pauses == 0
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.transport.resume_reading()

    def pause_input(self) -> None:
        """The core holds this device back: nothing more of this read is handled and
        nothing more is read until ``resume_input``."""
        self.input_holds += 1
        self._pause_reading()

    def resume_input(self) -> None:
        self.input_holds -= 1
        self._resume_reading()
        if self.input_holds == 0 and self.held:
            # Not from here: the caller may be in the middle of writing what held this
            # device back (MsgServer._go_live), and these frames come after it.
            asyncio.get_running_loop().call_soon(self._release_held)

    def _release_held(self) -> None:
        if self.input_holds or self.waiting or self.logging_in or not self.held:
            return  # held back again meanwhile (or gone): released at that resume
        self._handle_held()

    # -- Session: what the core emits -------------------------------------------------
    def emit_message(self, env: Envelope) -> None:
        if self.psk and not self.v1:  # a gateway-terminated device: sealed for it here
            env = for_last_hop(self, env)
        if env.kind == KIND_P2P and env.enc == "none" and not self.v1:
            # The usual delivery, by template (the same bytes as append_frame).
            global _ts_text
            ts = env.ts
            text = _ts_text
            if text[0] != ts:  # one str() per batch: its messages share a timestamp
                text = _ts_text = (ts, str(ts))
            argv = _dumps((env.body, env.sender, env.id, text[1]))
            out = self.out
            out += _pack_len(len(argv) + _P2P_EXTRA)
            out += _P2P_PREFIX
            out += argv
            out += _FRAME_END
        elif env.enc != "none":
            self._emit_sealed(env)
        elif env.kind == KIND_TOPIC:
            if self.v1:
                append_frame(self.out, "RESP_MESSAGE_TOPIC", [env.topic, env.body, env.sender])
            else:
                append_frame(
                    self.out,
                    "RESP_MESSAGE_TOPIC",
                    [env.topic, env.body, env.sender, env.id, str(env.ts)],
                )
        elif self.v1:
            append_frame(self.out, "RESP_MESSAGE_P2P", [env.body, env.sender, env.id])
        else:
            append_frame(self.out, "RESP_MESSAGE_P2P", [env.body, env.sender, env.id, str(env.ts)])

    def _emit_sealed(self, env: Envelope) -> None:
        """A sealed (E2E) body: the token session's delivery frame with ``enc`` appended;
        a v1 session is never sent one (it could not open it): dropped and logged."""
        if self.v1:
            log.warning(
                "sealed message %s from %s not delivered to v1 session of %s",
                env.id,
                env.sender,
                self.device_id,
            )
        elif env.kind == KIND_TOPIC:
            append_frame(
                self.out,
                "RESP_MESSAGE_TOPIC",
                [env.topic, env.body, env.sender, env.id, str(env.ts), env.enc],
            )
        else:
            append_frame(
                self.out, "RESP_MESSAGE_P2P", [env.body, env.sender, env.id, str(env.ts), env.enc]
            )

    def emit_accepted(self, msg_id: str) -> None:
        if not self.v1:
            argv = _dumps((msg_id,))
            out = self.out
            out += _pack_len(len(argv) + _ACCEPTED_EXTRA)
            out += _ACCEPTED_PREFIX
            out += argv
            out += _FRAME_END

    def emit_error(self, code: str, text: str, ref: str = "") -> None:
        if self.v1:
            log.warning("v1 device %s: %s: %s", self.device_id, code, text)
        else:
            append_frame(self.out, "ERROR", [code, text, ref] if ref else [code, text])

    def emit_ok(self, command: str, name: str) -> None:
        if not self.v1:
            append_frame(self.out, "OK", [command, name])

    def emit_located(self, address: str, topic: str) -> None:
        append_frame(self.out, "LOCATE_TOPIC_MSG_ADDR", [address, topic])

    def write_out(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            out, self.out = self.out, bytearray()
            self.transport.write(out)
        else:
            self.out.clear()

    def can_write(self) -> bool:
        return not self._write_paused

    def drop(self, code: str, text: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self.v1 and self.node is not None:
            append_frame(self.out, "ERROR", [code, text])
        self.write_out()
        self.transport.close()


# -- command handlers: (min args, max args, handler) ----------------------------------
def _ping(s: TcpSession, args: list[str]) -> None:
    if not s.v1:
        append_frame(s.out, "PONG", [])
        s.mark_dirty()


def _send_p2p(s: TcpSession, args: list[str]) -> None:
    # [to, msg, from] (v1; from is ignored: the session's id is the sender) [, id]
    if args[2] and args[2] != s.device_id and not s.spoof_logged:
        s.spoof_logged = True  # once per session: a misbehaving device must not flood the log
        log.warning(
            "device %s (%s) claimed from=%r in SEND_MESSAGE_P2P: ignored, the sender is %s"
            " (not logged again for this session)",
            s.device_id,
            s.peer,
            args[2][:70],
            s.device_id,
        )
    s.server.send_p2p(
        s, args[0], args[1], args[3] if len(args) > 3 and not s.v1 else "", ts=s.batch_ms
    )


def _ack(s: TcpSession, args: list[str]) -> None:
    # [client_id, uuid] (v1); token sessions may ack several: [client_id, uuid, uuid, ...]
    s.server.ack(s, args[1:])


def _create_topic(s: TcpSession, args: list[str]) -> asyncio.Task[Any]:
    return s.server.spawn(s.server.create_topic(s, args[0]), "create-topic")


def _join_topic(s: TcpSession, args: list[str]) -> asyncio.Task[Any]:
    return s.server.spawn(s.server.join_topic(s, args[0]), "join-topic")


def _leave_topic(s: TcpSession, args: list[str]) -> asyncio.Task[Any]:
    return s.server.spawn(s.server.leave_topic(s, args[0]), "leave-topic")


def _send_topic(s: TcpSession, args: list[str]) -> asyncio.Task[Any] | None:
    return s.server.send_topic(s, args[0], args[1], args[2] if len(args) > 2 and not s.v1 else "")


def _check_e2e(s: TcpSession, cmd: str, body: str, enc: str, mid: str) -> bool:
    if s.v1:
        s._bad_input(errors.UNKNOWN_COMMAND, f"{cmd} needs a token session")
        return False
    try:
        parse_enc(enc)
    except CryptoError:
        s.emit_error(errors.BAD_ARGS, f"unknown enc {enc[:40]!r}", mid)
        s.mark_dirty()
        return False
    if not body:
        s.emit_error(errors.BAD_ARGS, "empty sealed body", mid)
        s.mark_dirty()
        return False
    return True


def _send_p2p_e2e(s: TcpSession, args: list[str]) -> asyncio.Task[Any] | None:
    # [to, sealed_b64, enc, id]; a PSK-sealed body is opened first (a task)
    if _check_e2e(s, "SEND_MESSAGE_P2P_E2E", args[1], args[2], args[3]):
        return s.server.send_p2p(s, args[0], args[1], args[3], args[2], ts=s.batch_ms)
    return None


def _send_topic_e2e(s: TcpSession, args: list[str]) -> asyncio.Task[Any] | None:
    # [name, sealed_b64, enc, id]
    if _check_e2e(s, "SEND_MESSAGE_TOPIC_E2E", args[1], args[2], args[3]):
        return s.server.send_topic(s, args[0], args[1], args[3], args[2])
    return None


def _get_public_key(s: TcpSession, args: list[str]) -> asyncio.Task[Any]:
    return s.server.spawn(_public_key(s, args[0]), "public-key")


async def _public_key(s: TcpSession, device_id: str) -> None:
    try:
        key = await s.server.public_key(device_id)
    except StoreUnavailable:
        s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", device_id)
    else:
        if key is None:
            s.emit_error(errors.UNKNOWN_DEVICE, f"no device {device_id!r}", device_id)
        elif not s.v1:
            append_frame(s.out, "PUBLIC_KEY", [device_id, key])
    s.mark_dirty()


def _get_topic_owner(s: TcpSession, args: list[str]) -> asyncio.Task[Any]:
    return s.server.spawn(_topic_owner(s, args[0]), "topic-owner")


async def _topic_owner(s: TcpSession, name: str) -> None:
    """``GET_TOPIC_OWNER [name]`` -> ``TOPIC_OWNER [name, owner]``, for members: their
    SDK takes a topic key only from the topic's owner (docs/crypto.md section 5)."""
    owner = await s.server.topic_owner(s, name)
    if owner is not None and not s.v1:
        append_frame(s.out, "TOPIC_OWNER", [name, owner])
    s.mark_dirty()


def _logout(s: TcpSession, args: list[str]) -> None:
    if not s.v1:
        append_frame(s.out, "OK", ["LOGOUT", s.device_id])
    log.info("device %s logged out", s.device_id)
    s.write_out()
    if s.transport is not None:
        s.transport.close()
    s.server.session_closed(s)


def _again(s: TcpSession, args: list[str]) -> None:
    s._bad_input(errors.ALREADY_LOGGED_IN, f"already logged in as {s.device_id!r}")


# The commands that send a message (limits.msg_rate), with the index of their id.
RATED = {
    "SEND_MESSAGE_P2P": 3,
    "SEND_MESSAGE_TOPIC": 2,
    "SEND_MESSAGE_P2P_E2E": 3,
    "SEND_MESSAGE_TOPIC_E2E": 3,
}

COMMANDS: dict[str, tuple[int, int, Handler]] = {
    "SEND_PING": (0, 1, _ping),
    "SEND_MESSAGE_P2P": (3, 4, _send_p2p),
    "P2P_ACK": (2, 1000, _ack),
    "CREATE_TOPIC": (1, 1, _create_topic),
    "JOIN_TOPIC": (1, 2, _join_topic),
    "LEAVE_TOPIC": (1, 2, _leave_topic),
    "SEND_MESSAGE_TOPIC": (2, 3, _send_topic),
    "LOGOUT": (0, 1, _logout),
    "SEND_CLIENT_ID": (1, 2, _again),
    "SEND_MESSAGE_P2P_E2E": (4, 4, _send_p2p_e2e),
    "SEND_MESSAGE_TOPIC_E2E": (4, 4, _send_topic_e2e),
    "GET_PUBLIC_KEY": (1, 1, _get_public_key),
    "GET_TOPIC_OWNER": (1, 1, _get_topic_owner),
}
