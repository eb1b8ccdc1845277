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
the local ones below (``CLOSED``, ``CONNECT_FAILED``, ``TIMEOUT``, ``PROTOCOL``,
``NOT_SUPPORTED``, ``LOGIN_REFUSED``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from device_adapters.tcp.framing import FrameDecoder, FrameError, encode_frame
from firmware_sim.bundle import Bundle, load_bundle, parse_bundle
from fishchat_iot import errors
from fishchat_iot.crypto.device import DeviceCrypto, PskCrypto
from fishchat_iot.crypto.seal import ENC_PSK, CryptoError, b64d
from fishchat_iot.ids import IdGenerator

log = logging.getLogger("firmware_sim.tcp")

# Local error codes: never sent by a server, raised by the SDK itself.
CLOSED = "CLOSED"  # the device was closed, or lost its connection with reconnect=False
CONNECT_FAILED = "CONNECT_FAILED"  # no gateway / msg_server could be reached
TIMEOUT = "TIMEOUT"  # no answer in time (connect_timeout, request_timeout)
PROTOCOL = "PROTOCOL"  # the server sent something this SDK cannot make sense of
NOT_SUPPORTED = "NOT_SUPPORTED"  # e.g. leave_topic in a v1 session
LOGIN_REFUSED = "LOGIN_REFUSED"  # v1: the server closed the connection after SEND_CLIENT_ID
NO_KEY = "NO_KEY"  # end-to-end: no key to seal with (peer without public key, topic key)

# Errors after which reconnecting is pointless: the device stops.
FATAL_CODES = frozenset(
    {errors.AUTH_FAILED, errors.REVOKED, errors.SESSION_REPLACED, errors.V1_NOT_ALLOWED}
)
# A session-level error (no reference) that most likely answers the request in flight.
_REQUEST_ERRORS = frozenset({errors.BAD_ARGS, errors.UNKNOWN_COMMAND, errors.BAD_FRAME})

MAX_ID_LEN = 64
ACK_BATCH = 256  # ids per P2P_ACK frame in token sessions (the server takes up to 999)
_PING_FRAME = encode_frame("SEND_PING", ["PING"])
_LOGOUT_FRAME = encode_frame("LOGOUT", [])
_READ_SIZE = 65536


class DeviceError(Exception):
    """An error from the server (``ERROR [code, text, ref]``) or from the SDK.

    ``ref`` is the message id or topic name the error is about, when there is one."""

    def __init__(self, code: str, text: str, ref: str = "") -> None:
        super().__init__(f"{code}: {text}" if text else code)
        self.code = code
        self.text = text
        self.ref = ref

    def copy(self) -> DeviceError:
        return DeviceError(self.code, self.text, self.ref)


@dataclass(frozen=True, slots=True)
class Message:
    """A message delivered to this device.

    ``id`` is the sender's message id (server-assigned for v1 senders; ``""`` for topic
    messages in a v1 session, which carry none). ``ts`` is the server's timestamp in ms
    (for v1 sessions, which are not told one: the local receive time)."""

    kind: str  # "p2p" or "topic"
    id: str
    sender: str
    text: str
    topic: str = ""
    ts: int = 0
    enc: str = "none"  # how it was sealed on the wire; ``text`` is always the plaintext


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)``; ValueError if malformed."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DeviceError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class _Inbox:
    """A bounded FIFO of messages that can be closed with an error (receivers drain
    what is left, then get the error)."""

    __slots__ = ("_error", "_items", "_max", "_readable", "_writable")

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[Message] = collections.deque()
        self._max = max(1, maxsize)
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: DeviceError | None = None

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self._max

    async def put(self, item: Message) -> bool:
        """Wait for room; False if the inbox was closed (the item was not added)."""
        while len(self._items) >= self._max and self._error is None:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            return False
        self._items.append(item)
        self._readable.set()
        return True

    async def get(self) -> Message:
        while not self._items:
            if self._error is not None:
                raise self._error.copy()
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self, error: DeviceError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()


class _Outgoing:
    """A message written (or to be written) and waiting for its receipt."""

    __slots__ = ("frame", "future", "id", "retries", "timer", "written")

    def __init__(self, msg_id: str, frame: bytes, future: asyncio.Future[str]) -> None:
        self.id = msg_id
        self.frame = frame
        self.future = future
        self.retries = 0
        self.written = False  # on some connection at least once
        self.timer: asyncio.TimerHandle | None = None


class _Request:
    """A control request (CREATE_TOPIC, JOIN_TOPIC, LEAVE_TOPIC) waiting for its reply."""

    __slots__ = ("cmd", "frame", "future", "name")

    def __init__(self, cmd: str, name: str, frame: bytes, future: asyncio.Future[str]) -> None:
        self.cmd = cmd
        self.name = name
        self.frame = frame
        self.future = future


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


class _Fatal(Exception):
    def __init__(self, error: DeviceError) -> None:
        super().__init__(str(error))
        self.error = error


async def _close_writer(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


class _E2E:
    """End-to-end encryption for the device SDKs (``TcpDevice``, ``MqttDevice``): the
    opening of sealed deliveries, the deliveries held while a key is fetched, the topic
    keys an owner hands out. docs/crypto.md is the construction."""

    device_id: str
    crypto: DeviceCrypto | None
    psk: PskCrypto | None
    key_wait: float
    opened: int
    open_failed: int
    topic_keys_received: int
    _closing: bool
    _seen: collections.OrderedDict[tuple[str, str], bool]
    _acks: list[str]
    _held: dict[tuple[str, str], list[tuple[Message, str]]]
    _held_timers: dict[tuple[str, str], asyncio.TimerHandle]
    _topic_owners: dict[str, str]

    def _init_e2e(
        self, private_key: str | bytes | None, key_wait: float, psk: str | bytes | None = None
    ) -> None:
        self.crypto = None
        if private_key:
            raw = b64d(private_key) if isinstance(private_key, str) else private_key
            self.crypto = DeviceCrypto(self.device_id, raw)
        # Gateway-terminated mode (docs/crypto.md section 7): the pre-shared key.
        self.psk = None
        if psk:
            self.psk = PskCrypto(self.device_id, b64d(psk) if isinstance(psk, str) else psk)
        self.key_wait = key_wait
        # Sealed deliveries waiting for a key (a peer's public key, a topic epoch key),
        # unacked: ("peer", id) / ("topic", "name:epoch") -> [(message, enc)].
        self._held = {}
        self._held_timers = {}
        self.opened = 0  # sealed messages opened
        self.open_failed = 0  # sealed messages that did not open (tampered, no key): dropped
        self.topic_keys_received = 0
        self.topic_keys_refused = 0  # topic keys from a device that does not own the topic
        # topic -> its owner's device id: topic keys are taken from the owner only.
        self._topic_owners = {}

    def _clear_held(self) -> None:
        """A new session: held deliveries were not acked, the server sends them again."""
        for timer in self._held_timers.values():
            timer.cancel()
        self._held_timers.clear()
        self._held.clear()

    # -- what the SDK provides ---------------------------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        raise NotImplementedError

    async def _deliver(self, msg: Message) -> None:
        raise NotImplementedError

    def _flush_acks(self) -> None:
        raise NotImplementedError

    def _ask_public_key(self, device_id: str) -> None:
        """Ask the server for a public key without waiting (the answer comes in order
        with the deliveries and ends in ``_got_public_key``)."""
        raise NotImplementedError

    def _ask_topic_owner(self, topic: str) -> bool:
        """Ask the server who owns ``topic`` without waiting (the answer ends in
        ``_got_topic_owner``); False when this transport cannot ask."""
        return False

    # -- topic owners ----------------------------------------------------------------
    def set_topic_owner(self, topic: str, owner: str) -> None:
        """Pin the owner of ``topic`` (from provisioning, say): topic keys are then taken
        from ``owner`` only, without asking the server. A device that creates a topic
        is its owner; otherwise the SDK asks the server (``GET_TOPIC_OWNER``) the first
        time a key for the topic arrives."""
        self._topic_owners[topic] = owner

    # -- topic keys --------------------------------------------------------------
    async def share_topic_key(self, topic: str, members: Sequence[str]) -> int:
        """Topic owner: start a new key epoch for ``topic`` (a fresh random group key)
        and hand it to every member, sealed under each pairwise key. Call it when the
        topic is created and whenever a member leaves or is removed (with the members
        that remain): the removed member cannot open anything sealed afterwards.
        Returns the new epoch."""
        if self.crypto is None:
            raise DeviceError(NOT_SUPPORTED, "end-to-end encryption is off (no private key)")
        epoch, _ = self.crypto.new_topic_epoch(topic)
        for member in members:
            if member != self.device_id:
                await self.send_topic_key(topic, member)
        return epoch

    async def send_topic_key(self, topic: str, member: str) -> str:
        """Hand the current key of ``topic`` to one member (a late joiner)."""
        if self.crypto is None:
            raise DeviceError(NOT_SUPPORTED, "end-to-end encryption is off (no private key)")
        try:
            control = self.crypto.topic_key_control(topic)
        except CryptoError as exc:
            raise DeviceError(NO_KEY, str(exc), topic) from None
        return await self.send(member, control)

    # -- internals: end-to-end -------------------------------------------------
    async def _deliver_sealed(self, msg: Message, enc: str) -> None:
        """Open a sealed delivery and hand its plaintext on. One that does not open
        (flipped bit, moved to another recipient, wrong key) is acked and dropped,
        counted in ``open_failed``; a replayed id is absorbed by the dedupe as always."""
        if self._closing:
            return
        if enc == ENC_PSK:
            await self._deliver_psk(msg, enc)
            return
        key = (msg.sender, msg.id)
        crypto = self.crypto
        if key in self._seen or crypto is None:
            if crypto is None:
                self._reject(msg, "end-to-end encryption is off (no private key)")
            else:
                await self._deliver(msg)  # a duplicate: acked again, not delivered
            return
        hold: tuple[str, str] | None = None
        if msg.kind == "topic":
            epoch = enc.rpartition(":")[2]
            if (
                epoch.isdigit()
                and int(epoch) not in crypto.group_keys.get(msg.topic, {})
                and int(epoch) > crypto.current_epoch.get(msg.topic, 0)
            ):
                hold = ("topic", f"{msg.topic}:{epoch}")  # its key may be on its way
        elif msg.sender not in crypto.peers:
            hold = ("peer", msg.sender)  # ask the server for the sender's public key
        if hold is not None:
            self._hold(hold, msg, enc)
            return
        try:
            opened = crypto.open(
                sender=msg.sender,
                msg_id=msg.id,
                body=msg.text,
                enc=enc,
                topic=msg.topic,
                apply_control=False,
            )
        except CryptoError as exc:
            self._reject(msg, str(exc))
            return
        self.opened += 1
        if opened.control is not None:
            # A topic key: consumed by the SDK, never on the inbox, and taken only from
            # the topic's owner (anyone can seal a p2p message to a member).
            ctl = opened.control
            topic = str(ctl["topic"])
            owner = self._topic_owners.get(topic)
            if owner is None:
                if ("owner", topic) in self._held or self._ask_topic_owner(topic):
                    self.opened -= 1  # opened again once the owner is known
                    self._hold(("owner", topic), msg, enc)
                    return
                owner = ""  # cannot be asked and not pinned: nobody's key is taken
            self._seen[key] = True
            self._acks.append(msg.id)
            if msg.sender != owner:
                self.topic_keys_refused += 1
                log.warning(
                    "%s: ignored a key for topic %r from %s, which does not own it (owner: %s)",
                    self.device_id,
                    topic,
                    msg.sender,
                    owner or "unknown",
                )
                return
            crypto.apply_control(ctl)
            self.topic_keys_received += 1
            await self._release(("topic", f"{topic}:{ctl['epoch']}"))
            return
        await self._deliver(replace(msg, text=opened.text, enc=enc))

    async def _deliver_psk(self, msg: Message, enc: str) -> None:
        """A delivery the gateway sealed under this device's pre-shared key."""
        if (msg.sender, msg.id) in self._seen:
            await self._deliver(msg)  # a duplicate: acked again, not delivered
            return
        if self.psk is None:
            self._reject(msg, "sealed under a pre-shared key this device does not have")
            return
        try:
            text = self.psk.open(sender=msg.sender, msg_id=msg.id, body=msg.text, topic=msg.topic)
        except CryptoError as exc:
            self._reject(msg, str(exc))
            return
        self.opened += 1
        await self._deliver(replace(msg, text=text, enc=enc))

    def _reject(self, msg: Message, why: str) -> None:
        self.open_failed += 1
        log.warning(
            "%s: dropped sealed message %r from %s: %s", self.device_id, msg.id, msg.sender, why
        )
        self._acks.append(msg.id)

    def _hold(self, hkey: tuple[str, str], msg: Message, enc: str) -> None:
        held = self._held.get(hkey)
        if held is None:
            held = self._held[hkey] = []
            loop = asyncio.get_running_loop()
            self._held_timers[hkey] = loop.call_later(
                self.key_wait, self._drop_held, hkey, "no key in time"
            )
            if hkey[0] == "peer":
                self._ask_public_key(hkey[1])
        held.append((msg, enc))

    def _drop_held(self, hkey: tuple[str, str], why: str) -> None:
        timer = self._held_timers.pop(hkey, None)
        if timer is not None:
            timer.cancel()
        for msg, _ in self._held.pop(hkey, []):
            self._reject(msg, why)
        self._flush_acks()

    async def _release(self, hkey: tuple[str, str]) -> None:
        timer = self._held_timers.pop(hkey, None)
        if timer is not None:
            timer.cancel()
        for msg, enc in self._held.pop(hkey, []):
            await self._deliver_sealed(msg, enc)

    async def _got_topic_owner(self, topic: str, owner: str) -> None:
        """The server named the owner of a topic: decide on the keys that waited."""
        self._topic_owners.setdefault(topic, owner)
        await self._release(("owner", topic))

    async def _got_public_key(self, device_id: str, b64: str) -> None:
        """A peer's public key arrived: cache it, then open what waited for it."""
        if self.crypto is not None and b64:
            try:
                self.crypto.add_peer(device_id, b64d(b64))
            except CryptoError:
                log.warning("%s: bad public key of %s", self.device_id, device_id)
        if self.crypto is not None and device_id not in self.crypto.peers:
            self._drop_held(("peer", device_id), "sender has no public key")
        else:
            await self._release(("peer", device_id))


class TcpDevice(_E2E):
    """One simulated device on the FishChat TCP protocol. See the module docstring.

    Give ``gateway`` (one ``"host:port"`` or several, asked in turn) and/or
    ``msg_server`` (used directly when no gateway answers, or when there is none).
    Every queue it keeps is bounded and every task it starts is cancelled by
    :meth:`close`. Not thread-safe: use it from one event loop.
    """

    # False in a subclass that brings its own link to the server (SerialDevice): it
    # then needs no gateway or msg_server address and overrides _open_session.
    _needs_address = True

    def __init__(
        self,
        device_id: str,
        token: str | None = None,
        gateway: str | Sequence[str] | None = None,
        msg_server: str | Sequence[str] | None = None,
        *,
        keepalive: float = 30.0,
        reconnect: bool = True,
        inbox_max: int = 10000,
        auto_ack: bool = True,
        v1: bool = False,
        max_inflight: int = 1000,
        dedupe_max: int = 65536,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        max_frame: int = 65536,
        retry_unavailable: bool = True,
        v1_login_wait: float = 0.3,
        logout_timeout: float = 2.0,
        id_prefix: str | None = None,
        private_key: str | bytes | None = None,
        key_wait: float = 10.0,
        psk: str | bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not device_id:
            raise ValueError("device_id must not be empty")
        if not v1 and not token:
            raise ValueError("a token is needed (use V1Device for a token-less v1 session)")
        self.device_id = device_id
        self.token = token or ""
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
        self.keepalive = keepalive
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self.max_frame = max_frame
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.retry_unavailable = retry_unavailable
        self.v1_login_wait = v1_login_wait
        self.logout_timeout = logout_timeout
        self._max_inflight = max_inflight
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
        self._conn: _Conn | None = None
        self._connected = asyncio.Event()
        self._done = asyncio.Event()  # closed, or stopped by a final error
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._final: DeviceError | None = None
        self._last_rx = 0.0
        self._attempt = 0
        self.address = ""  # the msg_server of the current (or last) session
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
        if isinstance(bundle, str | Path):
            bundle = load_bundle(bundle)
        elif not isinstance(bundle, Bundle):
            bundle = parse_bundle(bundle)
        if bundle.raw.get("psk") and "psk" not in kwargs:
            kwargs["psk"] = bundle.raw["psk"]
        if tls:
            ca = bundle.raw.get("ca")
            if not isinstance(ca, str) or not ca:
                raise ValueError(f"bundle of {bundle.id!r} has no CA certificate ('ca')")
            kwargs["tls"] = ssl.create_default_context(cadata=ca)
            if msg_server is None:
                raw = bundle.raw.get("msg_server_tls")
                msg_server = [raw] if isinstance(raw, str) else list(raw or [])
        if e2e and not bundle.raw.get("psk"):
            key = bundle.raw.get("private_key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"bundle of {bundle.id!r} has no private_key: register again")
            kwargs["private_key"] = key
        return cls(
            bundle.id,
            bundle.token,
            gateway=gateway if gateway is not None else list(bundle.gateway),
            msg_server=msg_server if msg_server is not None else list(bundle.msg_server),
            **kwargs,
        )

    # -- state ---------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while logged in (and, for token sessions, resends are written)."""
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    @property
    def final_error(self) -> DeviceError | None:
        """The error that stopped the device (SESSION_REPLACED, REVOKED ...), if any."""
        return self._final

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(self._gateways)

    @property
    def msg_servers(self) -> tuple[str, ...]:
        return tuple(self._msg_servers)

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

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> TcpDevice:
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
        """Locate a msg_server, log in and start the session. Raises DeviceError
        (the server's code, or CONNECT_FAILED / TIMEOUT / LOGIN_REFUSED). After this
        returns, lost connections are re-established in the background."""
        if self._done.is_set() or self._closing:
            raise DeviceError(CLOSED, "the device is closed")
        if self._supervisor is not None:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_inflight)
            self._request_lock = asyncio.Lock()
        conn = await self._open_session()
        if self._closing or self._supervisor is not None:  # close() or connect() meanwhile
            await _close_writer(conn.writer, abort=True)
            if self._closing:
                raise DeviceError(CLOSED, "the device was closed while connecting")
            return
        self._install(conn)
        self._supervisor = asyncio.create_task(
            self._supervise(conn), name=f"fishchat-device-{self.device_id}"
        )

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until a session is up; raises the final error if the device stopped,
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._wait_ready()

    def drop(self) -> None:
        """Abort the current connection as a network failure would (for tests and
        offline-period scenarios); the device reconnects if ``reconnect`` is on."""
        conn = self._conn
        if conn is not None:
            conn.writer.transport.abort()

    async def close(self) -> None:
        """Log out (token sessions), stop every task, fail every waiter with CLOSED.
        Messages still on the inbox can be received afterwards. Idempotent."""
        if self._closing:
            if self._supervisor is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._supervisor)
            return
        self._closing = True
        sup = self._supervisor
        conn = self._conn
        if sup is not None and conn is not None and not self.v1 and self._connected.is_set():
            # LOGOUT → OK ["LOGOUT", id], then the server closes: the session ends.
            if self._write(_LOGOUT_FRAME):
                with contextlib.suppress(Exception):
                    await asyncio.wait({sup}, timeout=self.logout_timeout)
        if sup is not None and not sup.done():
            sup.cancel()
        if sup is not None:
            with contextlib.suppress(BaseException):
                await sup
        conn = self._conn
        if conn is not None:
            self._conn = None
            await _close_writer(conn.writer, abort=True)
        self._connected.clear()
        self._stop(DeviceError(CLOSED, "the device is closed"), final=False)

    # -- sending -------------------------------------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        """Send a p2p message; return its id once the server accepted it.

        Sealed end to end when the device has its private key, under its pre-shared key
        for the gateway when it has one; ``e2e=False`` sends this one in plaintext over
        the connection (to a gateway-terminated device, which has no public key).

        Raises DeviceError with the server's code (UNKNOWN_DEVICE, QUEUE_FULL,
        DUPLICATE_ID, BAD_ARGS ...) or CLOSED. While disconnected it waits for the
        next session and the message is written then. v1 sessions: returns ``""`` as
        soon as the frame is written (v1 has no receipts)."""
        if self.v1:
            await self._write_when_ready(
                self._frame("SEND_MESSAGE_P2P", [to, text, self.device_id], "")
            )
            self.sent += 1
            return ""
        msg_id = self._check_id(id)
        if self.psk is not None:
            sealed, enc = self.psk.seal("p2p", to, msg_id, text)
            frame = self._frame("SEND_MESSAGE_P2P_E2E", [to, sealed, enc, msg_id], msg_id)
        elif self.crypto is not None and e2e:
            if to not in self.crypto.peers:
                await self.public_key(to)
            sealed, enc = self.crypto.seal_p2p(to, msg_id, text)
            frame = self._frame("SEND_MESSAGE_P2P_E2E", [to, sealed, enc, msg_id], msg_id)
        else:
            frame = self._frame("SEND_MESSAGE_P2P", [to, text, self.device_id, msg_id], msg_id)
        return await self._submit(msg_id, frame)

    async def publish(
        self, topic: str, text: str, *, id: str | None = None, e2e: bool = True
    ) -> str:
        """Send a message to a topic the device is a member of; return its id once
        every other member's copy is accepted. v1: returns ``""`` once written.
        ``e2e=False``: plaintext over the connection (a topic with gateway-terminated
        members, which hold no group key)."""
        if self.v1:
            await self._write_when_ready(self._frame("SEND_MESSAGE_TOPIC", [topic, text], ""))
            self.sent += 1
            return ""
        msg_id = self._check_id(id)
        if self.psk is not None:
            sealed, enc = self.psk.seal("topic", topic, msg_id, text)
            frame = self._frame("SEND_MESSAGE_TOPIC_E2E", [topic, sealed, enc, msg_id], msg_id)
        elif self.crypto is not None and e2e:
            try:
                sealed, enc = self.crypto.seal_topic(topic, msg_id, text)
            except CryptoError as exc:
                raise DeviceError(NO_KEY, str(exc), msg_id) from None
            frame = self._frame("SEND_MESSAGE_TOPIC_E2E", [topic, sealed, enc, msg_id], msg_id)
        else:
            frame = self._frame("SEND_MESSAGE_TOPIC", [topic, text, msg_id], msg_id)
        return await self._submit(msg_id, frame)

    # -- end-to-end keys -------------------------------------------------------
    async def public_key(self, device_id: str) -> bytes:
        """The registered X25519 public key of a device (``GET_PUBLIC_KEY``), cached.
        Raises DeviceError(UNKNOWN_DEVICE) or NO_KEY when it has none."""
        if self.crypto is not None and device_id in self.crypto.peers:
            return self.crypto.peers[device_id]
        frame = self._frame("GET_PUBLIC_KEY", [device_id], device_id)
        b64 = await self._request_reply("GET_PUBLIC_KEY", device_id, frame)
        if not b64:
            raise DeviceError(NO_KEY, f"device {device_id!r} has no public key", device_id)
        key = b64d(b64)
        if self.crypto is not None:
            self.crypto.add_peer(device_id, key)
        return key

    async def create_topic(self, name: str) -> None:
        """Create an open topic owned by this device (it becomes a member).
        Raises DeviceError(TOPIC_EXISTS / BAD_ARGS). v1: returns once written."""
        frame = self._frame("CREATE_TOPIC", [name], name)
        if self.v1:
            await self._write_when_ready(frame)
            return
        await self._request_reply("CREATE_TOPIC", name, frame)
        self._topic_owners[name] = self.device_id

    async def join_topic(self, name: str) -> str:
        """Join a topic; returns the msg_server address from LOCATE_TOPIC_MSG_ADDR.
        Raises DeviceError(UNKNOWN_TOPIC / FORBIDDEN), or TIMEOUT (a v1 session is
        told nothing when it is refused)."""
        frame = self._frame("JOIN_TOPIC", [name, self.device_id], name)
        return await self._request_reply("JOIN_TOPIC", name, frame)

    async def leave_topic(self, name: str) -> None:
        """Leave a topic. Raises DeviceError(NOT_A_MEMBER / UNKNOWN_TOPIC)."""
        if self.v1:
            raise DeviceError(NOT_SUPPORTED, "v1 sessions have no LEAVE_TOPIC", name)
        frame = self._frame("LEAVE_TOPIC", [name], name)
        await self._request_reply("LEAVE_TOPIC", name, frame)

    # -- receiving -----------------------------------------------------------
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
        self._write(encode_frame("P2P_ACK", [self.device_id, msg.id]))

    # -- internals: sending --------------------------------------------------
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

    async def _write_when_ready(self, frame: bytes) -> None:
        while True:
            await self._wait_ready()
            if self._write(frame):
                await self._drain()
                return
            await asyncio.sleep(0.01)  # the transport is closing: the session is ending

    async def _submit(self, msg_id: str, frame: bytes) -> str:
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
        out = _Outgoing(msg_id, frame, fut)
        self._outgoing[msg_id] = out
        self.sent += 1
        try:
            if self._connected.is_set() and self._write(frame):
                out.written = True
                await self._drain()
            return await fut
        finally:
            if self._outgoing.get(msg_id) is out:  # cancelled by the caller
                self._forget(out)

    def _forget(self, out: _Outgoing) -> None:
        del self._outgoing[out.id]
        if out.timer is not None:
            out.timer.cancel()
            out.timer = None
        if self._slots is not None:
            self._slots.release()

    def _retry_later(self, out: _Outgoing) -> None:
        out.retries += 1
        delay = min(self.backoff_min * 2 ** (out.retries - 1), self.backoff_max)
        delay *= random.uniform(0.5, 1.0)
        if out.timer is not None:
            out.timer.cancel()
        out.timer = asyncio.get_running_loop().call_later(delay, self._rewrite, out)

    def _rewrite(self, out: _Outgoing) -> None:
        out.timer = None
        if self._outgoing.get(out.id) is out and self._connected.is_set():
            if self._write(out.frame):
                self.resent += 1

    async def _request_reply(self, cmd: str, name: str, frame: bytes) -> str:
        self._check_open()
        assert self._request_lock is not None
        async with self._request_lock:
            self._check_open()
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            req = _Request(cmd, name, frame, fut)
            self._request = req
            try:
                if self._connected.is_set() and self._write(frame):
                    await self._drain()
                async with asyncio.timeout(self.request_timeout):
                    return await fut
            except TimeoutError:
                raise DeviceError(
                    TIMEOUT, f"no answer to {cmd} within {self.request_timeout:g}s", name
                ) from None
            finally:
                self._request = None

    # -- internals: sessions -------------------------------------------------
    async def _open_session(self) -> _Conn:
        """Gateway lookup + login, always raising DeviceError on failure."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._locate_and_login()
        except TimeoutError:
            raise DeviceError(
                TIMEOUT, f"no session within {self.connect_timeout:g}s (server too slow or stuck)"
            ) from None

    def _rotated(self, items: list[str]) -> list[str]:
        if not items:
            return []
        k = self._attempt % len(items)
        return items[k:] + items[:k]

    async def _locate_and_login(self) -> _Conn:
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

    def _install(self, conn: _Conn) -> None:
        """The session is up: write what waits for it, in order, then open the gate."""
        self._clear_held()
        self._conn = conn
        self.address = conn.address
        self._last_rx = asyncio.get_running_loop().time()
        req = self._request
        if req is not None and not req.future.done():
            self._write(req.frame)
        for out in self._outgoing.values():
            if out.timer is not None:
                out.timer.cancel()
                out.timer = None
            if self._write(out.frame):
                self.resent += out.written
                out.written = True
        self._connected.set()

    async def _supervise(self, conn: _Conn) -> None:
        while True:
            try:
                await self._serve(conn)
            except _Fatal as exc:
                log.warning("%s: stopped: %s", self.device_id, exc.error)
                self._stop(exc.error, final=True)
                return
            except (OSError, asyncio.IncompleteReadError) as exc:
                log.debug("%s: connection lost: %s", self.device_id, _describe(exc))
            except Exception:
                log.exception("%s: session failed; reconnecting", self.device_id)
            if self._closing:
                return
            if not self.reconnect:
                self._stop(DeviceError(CLOSED, "the connection was lost"), final=True)
                return
            next_conn = await self._reconnect()
            if next_conn is None:
                return
            conn = next_conn

    async def _reconnect(self) -> _Conn | None:
        delay = self.backoff_min
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                conn = await self._open_session()
            except DeviceError as exc:
                if exc.code in FATAL_CODES:
                    self._stop(exc, final=True)
                    return None
                log.debug("%s: reconnect failed: %s", self.device_id, exc)
                delay = min(delay * 2, self.backoff_max)
                continue
            if self._closing:
                await _close_writer(conn.writer, abort=True)
                return None
            self.reconnects += 1
            self._install(conn)
            return conn
        return None

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
            if n >= 5 and args[4] != "none":
                await self._deliver_sealed(msg, args[4])
            else:
                await self._deliver(msg)
        elif cmd == "RESP_MESSAGE_TOPIC" and n >= 3:
            # token: [topic, msg, from, id, ts_ms] [+ enc when sealed]; v1: [topic, msg, from]
            msg_id = args[3] if n >= 4 else ""
            ts = int(args[4]) if n >= 5 and args[4].isdigit() else _now_ms()
            msg = Message("topic", msg_id, args[2], args[1], args[0], ts)
            if n >= 6 and args[5] != "none":
                await self._deliver_sealed(msg, args[5])
            else:
                await self._deliver(msg)
        elif cmd == "TOPIC_OWNER" and n >= 2:
            await self._got_topic_owner(args[0], args[1])
        elif cmd == "PUBLIC_KEY" and n >= 2:
            await self._got_public_key(args[0], args[1])
            self._answer("GET_PUBLIC_KEY", args[0], args[1])
        elif cmd == "ACCEPTED" and n >= 1:
            out = self._outgoing.get(args[0])
            if out is not None:
                self._forget(out)
                self.accepted += 1
                if not out.future.done():
                    out.future.set_result(out.id)
        elif cmd == "ERROR":
            self._on_error(args)
        elif cmd == "PONG":
            pass
        elif cmd == "OK" and n >= 2:
            self._answer(args[0], args[1], args[1])
        elif cmd == "LOCATE_TOPIC_MSG_ADDR" and n >= 2:
            self._answer("JOIN_TOPIC", args[1], args[0])
        else:
            log.debug("%s: ignoring %s %s", self.device_id, cmd, args)

    def _answer(self, cmd: str, name: str, result: str) -> None:
        req = self._request
        if req is not None and req.cmd == cmd and req.name == name and not req.future.done():
            req.future.set_result(result)

    def _on_error(self, args: list[str]) -> None:
        code = args[0] if args else PROTOCOL
        text = args[1] if len(args) > 1 else ""
        ref = args[2] if len(args) > 2 else ""
        self.server_errors.append((code, text, ref))
        # The reference is a message id or a topic name; ERROR does not say which
        # command it answers, so look among the messages first (their ids are random),
        # then at the one control request in flight.
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
                    self._retry_later(out)
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
            log.info("%s: server error for %r: %s %s", self.device_id, ref, code, text)
            return
        log.info("%s: server error: %s %s", self.device_id, code, text)
        if code in FATAL_CODES:
            raise _Fatal(DeviceError(code, text))
        req = self._request
        if code in _REQUEST_ERRORS and req is not None and not req.future.done():
            req.future.set_exception(DeviceError(code, text, req.name))

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
