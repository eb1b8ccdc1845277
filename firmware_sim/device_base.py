"""The device-side logic the SDKs (``TcpDevice``, ``MqttDevice``) share, written once in
:class:`DeviceBase`: message ids, messages waiting for their receipts and written again
(same id) after a reconnect, dedupe of deliveries, acks, control requests, reconnecting
with backoff, stopping and closing. A subclass brings the transport: how a session is
opened, served and closed, and how messages, requests and acks are written. Error
types and messages are in ``device_types``, end-to-end sealing in ``device_e2e``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypedDict, TypeVar

from firmware_sim.bundle import Bundle, load_bundle, parse_bundle
from firmware_sim.device_e2e import _E2E
from firmware_sim.device_types import (
    CLOSED,
    FATAL_CODES,
    MAX_ID_LEN,
    NO_KEY,
    TIMEOUT,
    DeviceError,
    Message,
    _describe,
    _Fatal,
    _Inbox,
)
from fishchat_iot import errors
from fishchat_iot.crypto.seal import CryptoError, b64d
from fishchat_iot.ids import IdGenerator

S = TypeVar("S")  # a transport's session: a TCP connection, an MQTT link


class _Outgoing:
    """A message written (or to be written) and waiting for its receipt. ``frame`` is
    what is written: a TCP frame, or an MQTT payload published on ``topic``."""

    __slots__ = ("frame", "future", "id", "pubacked", "retries", "timer", "topic", "written")

    def __init__(
        self, msg_id: str, frame: bytes, future: asyncio.Future[str], topic: str = ""
    ) -> None:
        self.id = msg_id
        self.frame = frame
        self.topic = topic
        self.future = future
        self.retries = 0
        self.written = False  # on some connection at least once
        self.pubacked = False  # MQTT: the broker PUBACKed it (not a receipt)
        self.timer: asyncio.TimerHandle | None = None


class _Request:
    """A control request (create, join or leave a topic, a public key; MQTT's hello)
    waiting for its reply. ``cmd`` is the transport's name for it."""

    __slots__ = ("cmd", "frame", "future", "name")

    def __init__(self, cmd: str, name: str, frame: bytes, future: asyncio.Future[str]) -> None:
        self.cmd = cmd
        self.name = name
        self.frame = frame
        self.future = future


class DeviceOptions(TypedDict, total=False):
    """The keyword arguments every device SDK takes; their defaults are
    :class:`DeviceBase`'s."""

    keepalive: float  # seconds; a session that hears nothing for this long is dead
    reconnect: bool  # re-establish lost sessions in the background
    inbox_max: int  # messages on the inbox before reading stops (backpressure)
    auto_ack: bool  # ack deliveries once they are on the inbox
    max_inflight: int  # messages waiting for receipts before send() waits for room
    dedupe_max: int  # (sender, id) pairs remembered to drop redeliveries
    connect_timeout: float
    request_timeout: float
    backoff_min: float  # reconnect (and UNAVAILABLE retry) backoff, seconds
    backoff_max: float
    retry_unavailable: bool  # write a message again after UNAVAILABLE
    logout_timeout: float
    id_prefix: str | None
    private_key: str | bytes | None  # X25519: end-to-end sealing on
    key_wait: float  # seconds a sealed delivery waits for its key
    psk: str | bytes | None  # gateway-terminated device: its pre-shared key


class DeviceBase(_E2E, Generic[S]):
    """One simulated device, whatever its transport: ids, receipts, resends, dedupe,
    acks, the inbox, control requests, reconnecting, stopping and closing. A subclass
    opens, serves and closes sessions (``S``) and writes what this class hands it; the
    methods below that raise NotImplementedError are its part. Not thread-safe: use it
    from one event loop."""

    _task_name: ClassVar[str] = "fishchat-device"  # + device id: the supervisor task

    def __init__(
        self,
        device_id: str,
        token: str,
        *,
        keepalive: float = 30.0,
        reconnect: bool = True,
        inbox_max: int = 10000,
        auto_ack: bool = True,
        max_inflight: int = 1000,
        dedupe_max: int = 65536,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        retry_unavailable: bool = True,
        logout_timeout: float = 2.0,
        id_prefix: str | None = None,
        private_key: str | bytes | None = None,
        key_wait: float = 10.0,
        psk: str | bytes | None = None,
    ) -> None:
        self.device_id = device_id
        self.token = token
        self.keepalive = keepalive
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.retry_unavailable = retry_unavailable
        self.logout_timeout = logout_timeout
        self._dedupe_max = dedupe_max
        self._ids = IdGenerator(id_prefix)
        self._inbox = _Inbox(inbox_max)
        # (sender, id) -> acked? ; most recent last
        self._seen: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        self._acks: list[str] = []  # ids to ack at the end of the current read
        self._outgoing: dict[str, _Outgoing] = {}  # insertion order = send order
        self._slots: asyncio.Semaphore | None = None
        self._request: _Request | None = None
        self._request_lock: asyncio.Lock | None = None
        self._connected = asyncio.Event()
        self._done = asyncio.Event()  # closed, or stopped by a final error
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._final: DeviceError | None = None
        self._attempt = 0
        self.address = ""  # the server of the current (or last) session
        # Counters, for tests, the simulator and the benchmark.
        self.sent = 0  # messages handed to send()/publish() and written at least once
        self.accepted = 0
        self.rejected = 0  # ERROR for a message id
        self.received = 0  # messages put on the inbox
        self.duplicates = 0  # deliveries of a (sender, id) already seen, absorbed
        self.resent = 0  # messages written again after a reconnect or UNAVAILABLE
        self.reconnects = 0
        self.server_errors: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=100)
        # End-to-end encryption (docs/crypto.md): on when the device has its private key;
        # gateway-terminated mode when it has a pre-shared key.
        self._init_e2e(private_key, key_wait, psk)

    @staticmethod
    def _read_bundle(
        bundle: Bundle | Mapping[str, Any] | str | Path, e2e: bool, kwargs: dict[str, Any]
    ) -> Bundle:
        """A provisioning bundle (a Bundle, its decoded JSON or the path of the file),
        its keys put in ``kwargs``: a gateway-terminated device's ``psk`` always (it is
        then always sealed), the ``private_key`` with ``e2e``."""
        if isinstance(bundle, str | Path):
            bundle = load_bundle(bundle)
        elif not isinstance(bundle, Bundle):
            bundle = parse_bundle(bundle)
        if bundle.raw.get("psk") and "psk" not in kwargs:
            kwargs["psk"] = bundle.raw["psk"]
        if e2e and not bundle.raw.get("psk"):
            key = bundle.raw.get("private_key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"bundle of {bundle.id!r} has no private_key: register again")
            kwargs["private_key"] = key
        return bundle

    # -- state -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a session is up (and the messages waiting for it are written)."""
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    @property
    def final_error(self) -> DeviceError | None:
        """The error that stopped the device (SESSION_REPLACED, REVOKED ...), if any."""
        return self._final

    @property
    def inflight(self) -> int:
        """Messages waiting for their receipt."""
        return len(self._outgoing)

    @property
    def inbox_size(self) -> int:
        return len(self._inbox)

    def next_id(self) -> str:
        """A fresh message id (random prefix + counter)."""
        return self._ids.next()

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open a session (TCP: a msg_server from the gateway, then the login; MQTT:
        CONNECT, SUBSCRIBE and the gateway's hello). Raises DeviceError (the server's
        code, or CONNECT_FAILED / TIMEOUT / LOGIN_REFUSED / AUTH_FAILED ...). After this
        returns, lost connections are re-established in the background."""
        if self._done.is_set() or self._closing:
            raise DeviceError(CLOSED, "the device is closed")
        if self._supervisor is not None:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
            self._request_lock = asyncio.Lock()
            self._start()
        session = await self._open_session()
        if self._closing or self._supervisor is not None:  # close() or connect() meanwhile
            await self._discard(session)
            if self._closing:
                raise DeviceError(CLOSED, "the device was closed while connecting")
            return
        self._install(session)
        self._supervisor = asyncio.create_task(
            self._supervise(session), name=f"{self._task_name}-{self.device_id}"
        )

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until a session is up; raises the final error if the device stopped,
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._wait_ready()

    async def close(self) -> None:
        """Say goodbye to the server (TCP ``LOGOUT``, MQTT ``bye``), stop every task,
        fail every waiter with CLOSED. Messages still on the inbox can be received
        afterwards. Idempotent."""
        if self._closing:
            if self._supervisor is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._supervisor)
            return
        self._closing = True
        if self._connected.is_set():
            await self._goodbye()
        tasks = [task for task in self._own_tasks() if task is not None]
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._close_session()
        self._connected.clear()
        self._stop(DeviceError(CLOSED, "the device is closed"), final=False)

    # -- sending -----------------------------------------------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        """Send a p2p message; return its id once the server accepted it.

        Sealed end to end when the device has its private key, under its pre-shared key
        for the gateway when it has one; ``e2e=False`` sends this one in plaintext over
        the connection (to a gateway-terminated device, which has no public key).

        Raises DeviceError with the server's code (UNKNOWN_DEVICE, QUEUE_FULL,
        DUPLICATE_ID, BAD_ARGS ...) or CLOSED. While disconnected it waits for the
        next session and the message is written then."""
        msg_id = self._check_id(id)
        sealed = await self._seal("p2p", to, msg_id, text, e2e)
        frame, topic = self._message("p2p", to, msg_id, text, sealed)
        return await self._submit(msg_id, frame, topic)

    async def publish(
        self, topic: str, text: str, *, id: str | None = None, e2e: bool = True
    ) -> str:
        """Send a message to a topic the device is a member of; return its id once
        every other member's copy is accepted. ``e2e=False``: plaintext over the
        connection (a topic with gateway-terminated members, which hold no group key)."""
        msg_id = self._check_id(id)
        sealed = await self._seal("topic", topic, msg_id, text, e2e)
        frame, where = self._message("topic", topic, msg_id, text, sealed)
        return await self._submit(msg_id, frame, where)

    # -- control requests --------------------------------------------------------------
    async def public_key(self, device_id: str) -> bytes:
        """The registered X25519 public key of a device, cached. Raises
        DeviceError(UNKNOWN_DEVICE) or NO_KEY when it has none."""
        if self.crypto is not None and device_id in self.crypto.peers:
            return self.crypto.peers[device_id]
        b64 = await self._control("public_key", device_id)
        if not b64:
            raise DeviceError(NO_KEY, f"device {device_id!r} has no public key", device_id)
        key = b64d(b64)
        if self.crypto is not None:
            self.crypto.add_peer(device_id, key)
        return key

    async def create_topic(self, name: str) -> None:
        """Create an open topic owned by this device (it becomes a member).
        Raises DeviceError(TOPIC_EXISTS / BAD_ARGS)."""
        await self._control("create_topic", name)
        self._topic_owners[name] = self.device_id  # topic keys come from the owner only

    async def join_topic(self, name: str) -> str:
        """Join a topic; returns the address of the server that has it. Raises
        DeviceError(UNKNOWN_TOPIC / FORBIDDEN), or TIMEOUT (a v1 session is told
        nothing when it is refused)."""
        return await self._control("join_topic", name)

    async def leave_topic(self, name: str) -> None:
        """Leave a topic. Raises DeviceError(NOT_A_MEMBER / UNKNOWN_TOPIC)."""
        await self._control("leave_topic", name)

    # -- receiving ---------------------------------------------------------------------
    async def receive(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """The next message. TimeoutError after ``timeout`` seconds; DeviceError
        (CLOSED or the final error) once the device stopped and the inbox is empty."""
        if timeout is None:
            return await self._inbox.get()
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    async def messages(self) -> AsyncIterator[Message]:
        """Every message, until the device is closed (then the iteration ends) or
        stopped by a final error (raised)."""
        while True:
            try:
                msg = await self._inbox.get()
            except DeviceError as exc:
                if exc.code == CLOSED:
                    return
                raise
            yield msg

    def ack(self, msg: Message) -> None:
        """Ack a message (only needed with ``auto_ack=False``). If the connection is
        down the server delivers the message again; it is then acked automatically."""
        if not msg.id:
            return
        key = (msg.sender, msg.id)
        if key in self._seen:
            self._seen[key] = True
        self._write_ack(msg.id)

    # -- the transport's part ----------------------------------------------------------
    def _start(self) -> None:
        """The first connect(): start what runs for the device's lifetime."""

    async def _open_any(self) -> S:
        """Open and log in one session, trying the known servers in turn."""
        raise NotImplementedError

    async def _discard(self, session: S) -> None:
        """Close a session that was opened but will not be used."""
        raise NotImplementedError

    def _attach(self, session: S) -> None:
        """Make ``session`` the current one (before what waits for it is written)."""
        raise NotImplementedError

    async def _serve(self, session: S) -> None:
        """Run the session until it ends (returns or raises)."""
        raise NotImplementedError

    async def _goodbye(self) -> None:
        """close(), while connected: tell the server the device is leaving."""

    def _own_tasks(self) -> list[asyncio.Task[None] | None]:
        """The tasks close() cancels."""
        return [self._supervisor]

    async def _close_session(self) -> None:
        """close(), after the tasks stopped: close the current session, if any."""
        raise NotImplementedError

    def _message(
        self, kind: str, to: str, msg_id: str, text: str, sealed: tuple[str, str] | None
    ) -> tuple[bytes, str]:
        """A p2p or topic message as written: (frame, MQTT topic or ""); ``sealed`` is
        (body, enc), None for plaintext."""
        raise NotImplementedError

    def _control_frame(self, op: str, name: str) -> tuple[str, bytes]:
        """A control request (``public_key``, ``create_topic``, ``join_topic``,
        ``leave_topic``) as (the transport's name for it, frame)."""
        raise NotImplementedError

    def _write_out(self, out: _Outgoing) -> bool:
        """Write a message waiting for its receipt; False when there is no session."""
        raise NotImplementedError

    def _write_control(self, frame: bytes) -> bool:
        """Write a control request; False when there is no session."""
        raise NotImplementedError

    def _write_ack(self, msg_id: str) -> None:
        """Ack one message now (``ack()``)."""
        raise NotImplementedError

    async def _drain(self) -> None:
        """Wait until what was written can be written further (flow control)."""

    async def _request_ready(self) -> None:
        """A control request is about to be made: raise if the device stopped."""
        self._check_open()

    def _unmatched_error(self, code: str, text: str, ref: str) -> None:
        """An ERROR that names no waiting message or request."""
        raise NotImplementedError

    # -- internals: sessions -----------------------------------------------------------
    async def _open_session(self) -> S:
        """A new session, always raising DeviceError on failure."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._open_any()
        except TimeoutError:
            raise DeviceError(
                TIMEOUT, f"no session within {self.connect_timeout:g}s (server too slow or stuck)"
            ) from None

    def _rotated(self, items: list[str]) -> list[str]:
        """``items`` starting one further at each attempt (spreads reconnects)."""
        if not items:
            return []
        k = self._attempt % len(items)
        return items[k:] + items[:k]

    def _install(self, session: S) -> None:
        """The session is up: write what waits for it, in order, then open the gate."""
        self._clear_held()  # held sealed deliveries were not acked: they come again
        self._attach(session)
        for out in self._outgoing.values():
            if out.timer is not None:
                out.timer.cancel()
                out.timer = None
            self._put(out)
        self._connected.set()

    async def _supervise(self, session: S) -> None:
        while True:
            try:
                await self._serve(session)
            except _Fatal as exc:
                self._log.warning("%s: stopped: %s", self.device_id, exc.error)
                self._stop(exc.error, final=True)
                return
            except (OSError, asyncio.IncompleteReadError) as exc:
                self._log.debug("%s: connection lost: %s", self.device_id, _describe(exc))
            except Exception:
                self._log.exception("%s: session failed; reconnecting", self.device_id)
            if self._closing:
                return
            if not self.reconnect:
                self._stop(DeviceError(CLOSED, "the connection was lost"), final=True)
                return
            next_session = await self._reconnect()
            if next_session is None:
                return
            session = next_session

    async def _reconnect(self) -> S | None:
        delay = self.backoff_min
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                session = await self._open_session()
            except DeviceError as exc:
                if exc.code in FATAL_CODES:
                    self._stop(exc, final=True)
                    return None
                self._log.debug("%s: reconnect failed: %s", self.device_id, exc)
                delay = min(delay * 2, self.backoff_max)
                continue
            if self._closing:
                await self._discard(session)
                return None
            self.reconnects += 1
            self._install(session)
            return session
        return None

    def _stop(self, error: DeviceError, *, final: bool) -> None:
        """No more sessions: fail every waiter with ``error``."""
        if final and self._final is None:
            self._final = error
        err = self._final or error
        for out in list(self._outgoing.values()):
            self._forget(out)
            if not out.future.done():
                out.future.set_exception(err.copy())
        req = self._request
        if req is not None and not req.future.done():
            req.future.set_exception(err.copy())
        self._inbox.close(err)
        self._connected.clear()
        self._done.set()

    # -- internals: sending ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._final is not None:
            raise self._final.copy()
        if self._closing or self._done.is_set():
            raise DeviceError(CLOSED, "the device is closed")
        if self._supervisor is None:
            raise DeviceError(CLOSED, "the device is not connected: call connect() first")

    def _check_id(self, msg_id: str | None) -> str:
        if msg_id is None:
            return self._ids.next()
        if not 1 <= len(msg_id) <= MAX_ID_LEN:
            raise DeviceError(errors.BAD_ARGS, f"a message id is 1 to {MAX_ID_LEN} characters")
        return msg_id

    async def _wait_ready(self) -> None:
        """Wait for a live session, or raise if the device stopped."""
        while not self._connected.is_set():
            self._check_open()
            up = asyncio.ensure_future(self._connected.wait())
            done = asyncio.ensure_future(self._done.wait())
            try:
                await asyncio.wait({up, done}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                done.cancel()
        self._check_open()

    async def _seal(
        self, kind: str, to: str, msg_id: str, text: str, e2e: bool
    ) -> tuple[str, str] | None:
        """(sealed body, enc) for a message to a device or topic; None: plaintext."""
        if self.psk is not None:
            return self.psk.seal(kind, to, msg_id, text)
        if self.crypto is None or not e2e:
            return None
        if kind == "p2p":
            if to not in self.crypto.peers:
                await self.public_key(to)
            return self.crypto.seal_p2p(to, msg_id, text)
        try:
            return self.crypto.seal_topic(to, msg_id, text)
        except CryptoError as exc:
            raise DeviceError(NO_KEY, str(exc), msg_id) from None

    async def _submit(self, msg_id: str, frame: bytes, topic: str = "") -> str:
        self._check_open()
        if msg_id in self._outgoing:
            raise DeviceError(
                errors.DUPLICATE_ID, "a message with this id is still waiting for its receipt"
            )
        assert self._slots is not None
        await self._slots.acquire()
        try:
            self._check_open()
            if msg_id in self._outgoing:
                raise DeviceError(
                    errors.DUPLICATE_ID, "a message with this id is still waiting for its receipt"
                )
        except BaseException:
            self._slots.release()
            raise
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        out = _Outgoing(msg_id, frame, fut, topic)
        self._outgoing[msg_id] = out
        self.sent += 1
        try:
            if self._connected.is_set() and self._put(out):
                await self._drain()
            return await fut
        finally:
            if self._outgoing.get(msg_id) is out:  # cancelled by the caller
                self._forget(out)

    def _put(self, out: _Outgoing) -> bool:
        """Write a message waiting for its receipt, counting it in ``resent`` when it
        was written before."""
        if not self._write_out(out):
            return False
        self.resent += out.written
        out.written = True
        return True

    def _forget(self, out: _Outgoing) -> None:
        del self._outgoing[out.id]
        if out.timer is not None:
            out.timer.cancel()
            out.timer = None
        if self._slots is not None:
            self._slots.release()

    def _retry_later(self, out: _Outgoing, delay: float) -> None:
        if out.timer is not None:
            out.timer.cancel()
        out.retries += 1
        out.timer = asyncio.get_running_loop().call_later(delay, self._rewrite, out)

    def _rewrite(self, out: _Outgoing) -> None:
        out.timer = None
        if self._outgoing.get(out.id) is out and self._connected.is_set():
            self._put(out)

    async def _control(self, op: str, name: str) -> str:
        cmd, frame = self._control_frame(op, name)
        return await self._request_reply(cmd, name, frame)

    async def _request_reply(self, cmd: str, name: str, frame: bytes) -> str:
        self._check_open()
        assert self._request_lock is not None
        async with self._request_lock:
            await self._request_ready()
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._request = _Request(cmd, name, frame, fut)
            try:
                if self._connected.is_set() and self._write_control(frame):
                    await self._drain()
                async with asyncio.timeout(self.request_timeout):
                    return await fut
            except TimeoutError:
                raise DeviceError(
                    TIMEOUT, f"no answer to {cmd} within {self.request_timeout:g}s", name
                ) from None
            finally:
                self._request = None

    # -- internals: what the server sends ----------------------------------------------
    async def _take(self, msg: Message, enc: str) -> None:
        """A delivery: opened first when it came sealed."""
        if enc != "none":
            await self._deliver_sealed(msg, enc)
        else:
            await self._deliver(msg)

    async def _deliver(self, msg: Message) -> None:
        if self._closing:
            return  # not acked: the server delivers it again at the next login
        if not msg.id:  # v1 topic message: no id, no ack, no dedupe
            if await self._inbox.put(msg):
                self.received += 1
            return
        key = (msg.sender, msg.id)
        acked = self._seen.get(key)
        if acked is not None:
            self._seen.move_to_end(key)
            self.duplicates += 1
            if acked:
                self._acks.append(msg.id)
            return
        if self._inbox.full():
            self._flush_acks()  # do not hold earlier acks while waiting for room
        if not await self._inbox.put(msg):
            return
        self.received += 1
        self._seen[key] = self.auto_ack
        if len(self._seen) > self._dedupe_max:
            self._seen.popitem(last=False)
        if self.auto_ack:
            self._acks.append(msg.id)

    def _accepted(self, msg_id: str) -> None:
        """The receipt of a message: its send() returns."""
        out = self._outgoing.get(msg_id)
        if out is not None:
            self._forget(out)
            self.accepted += 1
            if not out.future.done():
                out.future.set_result(out.id)

    def _answer(self, cmd: str, name: str, result: str) -> None:
        """The reply to the control request in flight, if it is the one answered."""
        req = self._request
        if req is not None and req.cmd == cmd and req.name == name and not req.future.done():
            req.future.set_result(result)

    def _on_error(self, code: str, text: str, ref: str) -> None:
        self.server_errors.append((code, text, ref))
        # The reference is a message id, a topic name or a device id; ERROR does not
        # say which command it answers, so look among the messages first (their ids
        # are random), then at the one control request in flight.
        if ref:
            if ("peer", ref) in self._held and code != errors.UNAVAILABLE:
                # The sender of held sealed messages has no key (unknown, revoked).
                self._drop_held(("peer", ref), f"{code} {text}")
            if ("owner", ref) in self._held:
                # No owner to check a held topic key against: it is not taken.
                self._drop_held(("owner", ref), f"topic owner unknown: {code} {text}")
            out = self._outgoing.get(ref)
            if out is not None:
                if code == errors.UNAVAILABLE and self.retry_unavailable and not self._closing:
                    delay = min(self.backoff_min * 2**out.retries, self.backoff_max)
                    self._retry_later(out, delay * random.uniform(0.5, 1.0))
                    return
                self._forget(out)
                self.rejected += 1
                if not out.future.done():
                    out.future.set_exception(DeviceError(code, text, ref))
                return
            req = self._request
            if req is not None and req.name == ref and not req.future.done():
                req.future.set_exception(DeviceError(code, text, ref))
                return
        self._unmatched_error(code, text, ref)
