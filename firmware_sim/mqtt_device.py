"""An asyncio device SDK for FishChat over MQTT (``docs/protocol.md``, MQTT section), with
the surface of ``TcpDevice``::

    async with MqttDevice("alice", token, broker="127.0.0.1:1883") as dev:
        msg_id = await dev.send("bob", "hello")       # returns after the "accepted" receipt
        async for msg in dev.messages():               # Message(kind, id, sender, ...)
            print(msg.sender, msg.text)

The same device works against the embedded broker of ``fishchat-iot up`` and against an
external broker (Mosquitto) the gateway is attached to.

* **Connecting**: MQTT CONNECT with client id = username = the device id and password =
  its token, a will on ``fc/{id}/ctl`` (``bye``), SUBSCRIBE to ``fc/{id}/in``, then a
  ``hello`` on ``fc/{id}/ctl`` answered by the gateway: ``connect()`` returns when the
  gateway knows the session. A refused CONNECT is ``AUTH_FAILED`` (final).
* **Sending** is at least once, on the app-level receipt, never on PUBACK (amqtt
  PUBACKs before routing): ``send`` returns when ``{"kind": "accepted"}`` arrives, raises
  ``DeviceError`` for ``{"kind": "error"}``. A message without a receipt is published
  again (same id) after a reconnect, or after ``receipt_timeout`` seconds; the gateway
  keeps one copy per id. ``pubacked`` counts the broker's PUBACKs, for comparison.
* **Receiving**: deliveries go to a bounded inbox; with ``auto_ack`` the ids of one
  batch are acked in one publish on ``fc/{id}/ack``; redeliveries of a (sender, id)
  already seen are acked again, counted in ``duplicates`` and dropped. A full inbox
  stops the network thread reading (TCP backpressure), not memory.
* **Threads**: paho-mqtt runs its network loop in its own thread; everything it receives
  is handed to the event loop in batches (``call_soon_threadsafe``) through a bounded
  buffer. Connecting and stopping the thread run in worker threads: nothing blocks the
  event loop. Every task the device starts is cancelled by ``close()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.bundle import Bundle, load_bundle, parse_bundle
from firmware_sim.tcp_device import (
    _E2E,
    CLOSED,
    CONNECT_FAILED,
    FATAL_CODES,
    MAX_ID_LEN,
    NO_KEY,
    PROTOCOL,
    TIMEOUT,
    DeviceError,
    Message,
    _as_list,
    _Inbox,
    parse_address,
)
from fishchat_iot import errors
from fishchat_iot.crypto.seal import CryptoError, b64d
from fishchat_iot.ids import IdGenerator

log = logging.getLogger("firmware_sim.mqtt")

ACK_BATCH = 256  # ids per ack publish (the gateway takes up to 1000)
RX_MAX = 4096  # messages the network thread may hand over before the loop took them


class _Outgoing:
    __slots__ = ("future", "id", "payload", "pubacked", "retries", "timer", "topic", "written")

    def __init__(self, msg_id: str, topic: str, payload: bytes, fut: asyncio.Future[str]) -> None:
        self.id = msg_id
        self.topic = topic
        self.payload = payload
        self.future = fut
        self.written = False
        self.pubacked = False
        self.retries = 0
        self.timer: asyncio.TimerHandle | None = None


class _Request:
    __slots__ = ("future", "name", "op")

    def __init__(self, op: str, name: str, fut: asyncio.Future[str]) -> None:
        self.op = op
        self.name = name
        self.future = fut


class _Link:
    """One MQTT connection: a paho client and its network thread. Callbacks run on that
    thread and only queue what they got; ``wake`` hands the queue to the event loop."""

    def __init__(self, dev: MqttDevice, address: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dev = dev
        self.address = address
        self.loop = loop
        self.session = os.urandom(6).hex()
        self.lost = asyncio.Event()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.suback: asyncio.Future[int] = loop.create_future()
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._slots = threading.BoundedSemaphore(RX_MAX)
        self.closing = False  # stop handing messages over (the network thread may be blocked)
        self.mids: dict[int, _Outgoing] = {}
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev.device_id,
            clean_session=True,
            reconnect_on_failure=False,
        )
        c.username_pw_set(dev.device_id, dev.token)
        c.will_set(
            f"fc/{dev.device_id}/ctl",
            orjson.dumps({"op": "bye", "session": self.session}),
            qos=1,
        )
        c.max_inflight_messages_set(max(20, dev.max_inflight))
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        self.client = c

    # -- network thread ----------------------------------------------------------------
    def _hand(self, kind: str, value: Any) -> None:
        with self._lock:
            self._events.append((kind, value))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(self.dev._wake, self)

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self._hand("connack", int(reason.value))

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: Any, props: Any) -> None:
        self._hand("suback", int(reasons[0].value) if reasons else 0x80)

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        while not self._slots.acquire(timeout=0.2):  # the loop is behind: stop reading
            if self.closing:
                return
        self._hand("message", msg.payload)

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        self._hand("puback", mid)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self._hand("lost", None)

    # -- event loop ----------------------------------------------------------------------
    def take(self) -> list[tuple[str, Any]]:
        with self._lock:
            self._scheduled = False
            events = list(self._events)
            self._events.clear()
        return events

    def release(self) -> None:
        self._slots.release()

    def publish(self, topic: str, payload: bytes, qos: int) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        return int(info.mid)

    def abort(self) -> None:
        """Cut the TCP connection as a network failure would (no DISCONNECT, so the
        broker publishes the will)."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def stop(self) -> None:
        self.closing = True
        await asyncio.to_thread(self.client.loop_stop)
        with contextlib.suppress(Exception):
            sock = self.client.socket()
            if isinstance(sock, socket.socket):
                sock.close()


class MqttDevice(_E2E):
    """One simulated device over MQTT. See the module docstring. ``broker`` is one
    ``"host:port"`` or several, tried in turn. Not thread-safe: use it from one event
    loop."""

    def __init__(
        self,
        device_id: str,
        token: str,
        broker: str | Sequence[str],
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
        receipt_timeout: float = 30.0,
        logout_timeout: float = 2.0,
        qos: int = 1,
        id_prefix: str | None = None,
        private_key: str | bytes | None = None,
        key_wait: float = 10.0,
        psk: str | bytes | None = None,
    ) -> None:
        if not device_id:
            raise ValueError("device_id must not be empty")
        if not token:
            raise ValueError("a token is needed: it is the MQTT password")
        self.device_id = device_id
        self.token = token
        self._brokers = _as_list(broker)
        if not self._brokers:
            raise ValueError("give the MQTT broker's address ('host:port')")
        for addr in self._brokers:
            parse_address(addr)
        self.keepalive = max(1, round(keepalive))
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.retry_unavailable = retry_unavailable
        self.receipt_timeout = receipt_timeout
        self.logout_timeout = logout_timeout
        self.qos = qos
        self._dedupe_max = dedupe_max
        self._ids = IdGenerator(id_prefix)
        self._inbox = _Inbox(inbox_max)
        self._seen: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        self._acks: list[str] = []
        self._outgoing: dict[str, _Outgoing] = {}
        self._slots: asyncio.Semaphore | None = None
        self._request: _Request | None = None
        self._request_lock: asyncio.Lock | None = None
        self._link: _Link | None = None
        self._rx: collections.deque[bytes] = collections.deque()
        self._rx_ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._done = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._final: DeviceError | None = None
        self._attempt = 0
        self.address = ""
        self.prefix = f"fc/{device_id}/"
        self.inbox_topic = f"fc/{device_id}/in"
        # Counters, for tests, the simulator and the benchmark.
        self.sent = 0
        self.accepted = 0
        self.rejected = 0
        self.received = 0
        self.duplicates = 0
        self.resent = 0
        self.reconnects = 0
        self.pubacked = 0  # PUBACKs from the broker for our messages (not receipts!)
        self.server_errors: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=100)
        # End-to-end encryption (docs/crypto.md): on when the device has its private key.
        self._init_e2e(private_key, key_wait, psk)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | Mapping[str, Any] | str | Path,
        *,
        broker: str | Sequence[str] | None = None,
        e2e: bool = False,
        **kwargs: Any,
    ) -> MqttDevice:
        """A device from its provisioning bundle; ``broker`` overrides the bundle's
        ``mqtt`` addresses. ``e2e=True`` seals and opens with the bundle's private key."""
        if isinstance(bundle, str | Path):
            bundle = load_bundle(bundle)
        elif not isinstance(bundle, Bundle):
            bundle = parse_bundle(bundle)
        if bundle.raw.get("psk") and "psk" not in kwargs:
            kwargs["psk"] = bundle.raw["psk"]  # gateway-terminated: always sealed
        if e2e and not bundle.raw.get("psk"):
            key = bundle.raw.get("private_key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"bundle of {bundle.id!r} has no private_key: register again")
            kwargs["private_key"] = key
        if broker is None:
            raw = bundle.raw.get("mqtt")
            broker = [raw] if isinstance(raw, str) else list(raw or [])
        return cls(bundle.id, bundle.token, broker, **kwargs)

    # -- state ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    @property
    def final_error(self) -> DeviceError | None:
        return self._final

    @property
    def brokers(self) -> tuple[str, ...]:
        return tuple(self._brokers)

    @property
    def inflight(self) -> int:
        """Messages waiting for their receipt."""
        return len(self._outgoing)

    @property
    def inbox_size(self) -> int:
        return len(self._inbox)

    def next_id(self) -> str:
        return self._ids.next()

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> MqttDevice:
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
        """Connect, subscribe and say hello; raises DeviceError (AUTH_FAILED,
        CONNECT_FAILED, TIMEOUT ...). Afterwards lost connections are re-established in
        the background (with ``reconnect``)."""
        if self._done.is_set() or self._closing:
            raise DeviceError(CLOSED, "the device is closed")
        if self._supervisor is not None:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
            self._request_lock = asyncio.Lock()
            self._pump = asyncio.create_task(self._pump_rx(), name=f"fishchat-rx-{self.device_id}")
        link = await self._open()
        if self._closing:
            await link.stop()
            raise DeviceError(CLOSED, "the device was closed while connecting")
        self._supervisor = asyncio.create_task(
            self._supervise(link), name=f"fishchat-mqtt-{self.device_id}"
        )

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self._wait_ready()

    def drop(self, disconnect: bool = False) -> None:
        """End the current connection: abruptly as a network failure would (default),
        or with an MQTT DISCONNECT right away (``disconnect=True``, no ``bye``). The
        device reconnects if ``reconnect`` is on."""
        link = self._link
        if link is None:
            return
        if disconnect:
            link.client.disconnect()
        else:
            link.abort()

    async def close(self) -> None:
        """Say bye, disconnect, stop every task, fail every waiter with CLOSED.
        Idempotent; messages still on the inbox can be received afterwards."""
        if self._closing:
            if self._supervisor is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._supervisor)
            return
        self._closing = True
        link = self._link
        if link is not None and self._connected.is_set():
            self._flush_acks()
            with contextlib.suppress(Exception):
                link.publish(
                    f"{self.prefix}ctl",
                    orjson.dumps({"op": "bye", "session": link.session}),
                    self.qos,
                )
                link.client.disconnect()
                await asyncio.wait_for(link.lost.wait(), self.logout_timeout)
        for task in (self._supervisor, self._pump):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._supervisor, self._pump):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        link = self._link
        self._link = None
        if link is not None:
            await link.stop()
        self._connected.clear()
        self._stop(DeviceError(CLOSED, "the device is closed"), final=False)

    # -- sending -------------------------------------------------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        """A p2p message; returns its id once the gateway accepted it. Sealed as
        ``TcpDevice.send`` seals (end to end, or under the pre-shared key)."""
        msg_id = self._check_id(id)
        if self.psk is not None:
            sealed, enc = self.psk.seal("p2p", to, msg_id, text)
            payload = orjson.dumps({"id": msg_id, "body": sealed, "enc": enc, "ts": _now_ms()})
        elif self.crypto is not None and e2e:
            if to not in self.crypto.peers:
                await self.public_key(to)
            sealed, enc = self.crypto.seal_p2p(to, msg_id, text)
            payload = orjson.dumps({"id": msg_id, "body": sealed, "enc": enc, "ts": _now_ms()})
        else:
            payload = orjson.dumps({"id": msg_id, "body": text, "ts": _now_ms()})
        return await self._submit(msg_id, f"{self.prefix}p2p/{to}", payload)

    async def publish(
        self, topic: str, text: str, *, id: str | None = None, e2e: bool = True
    ) -> str:
        """A message to a topic the device is a member of; returns its id once every
        other member's copy is accepted."""
        msg_id = self._check_id(id)
        if self.psk is not None:
            sealed, enc = self.psk.seal("topic", topic, msg_id, text)
            payload = orjson.dumps({"id": msg_id, "body": sealed, "enc": enc, "ts": _now_ms()})
        elif self.crypto is not None and e2e:
            try:
                sealed, enc = self.crypto.seal_topic(topic, msg_id, text)
            except CryptoError as exc:
                raise DeviceError(NO_KEY, str(exc), msg_id) from None
            payload = orjson.dumps({"id": msg_id, "body": sealed, "enc": enc, "ts": _now_ms()})
        else:
            payload = orjson.dumps({"id": msg_id, "body": text, "ts": _now_ms()})
        return await self._submit(msg_id, f"{self.prefix}topic/{topic}", payload)

    async def public_key(self, device_id: str) -> bytes:
        """The registered X25519 public key of a device (ctl ``public_key``), cached."""
        if self.crypto is not None and device_id in self.crypto.peers:
            return self.crypto.peers[device_id]
        b64 = await self._request_reply("public_key", device_id)
        if not b64:
            raise DeviceError(NO_KEY, f"device {device_id!r} has no public key", device_id)
        key = b64d(b64)
        if self.crypto is not None:
            self.crypto.add_peer(device_id, key)
        return key

    def _ask_public_key(self, device_id: str) -> None:
        link = self._link
        if link is not None:
            payload = orjson.dumps({"op": "public_key", "device": device_id})
            link.publish(f"{self.prefix}ctl", payload, self.qos)

    def _ask_topic_owner(self, topic: str) -> bool:
        link = self._link
        if link is None:
            return False  # not connected: the key stays unacked and comes again
        payload = orjson.dumps({"op": "topic_owner", "topic": topic})
        link.publish(f"{self.prefix}ctl", payload, self.qos)
        return True

    async def create_topic(self, name: str) -> None:
        await self._request_reply("create_topic", name)
        self._topic_owners[name] = self.device_id  # topic keys come from the owner only

    async def join_topic(self, name: str) -> str:
        """Join a topic; returns the address the gateway names (its msg_server)."""
        return await self._request_reply("join_topic", name)

    async def leave_topic(self, name: str) -> None:
        await self._request_reply("leave_topic", name)

    # -- receiving -----------------------------------------------------------------------
    async def receive(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        if timeout is None:
            return await self._inbox.get()
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                msg = await self._inbox.get()
            except DeviceError as exc:
                if exc.code == CLOSED:
                    return
                raise
            yield msg

    def ack(self, msg: Message) -> None:
        """Ack a message (with ``auto_ack=False``)."""
        if not msg.id:
            return
        key = (msg.sender, msg.id)
        if key in self._seen:
            self._seen[key] = True
        self._acks.append(msg.id)
        self._flush_acks()

    # -- internals: connections ------------------------------------------------------------
    async def _open(self) -> _Link:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._open_any()
        except TimeoutError:
            raise DeviceError(
                TIMEOUT, f"no MQTT session within {self.connect_timeout:g}s"
            ) from None

    async def _open_any(self) -> _Link:
        self._attempt += 1
        k = self._attempt % len(self._brokers)
        problems = []
        for addr in self._brokers[k:] + self._brokers[:k]:
            try:
                return await self._open_link(addr)
            except DeviceError as exc:
                if exc.code in FATAL_CODES:
                    raise
                problems.append(f"{addr}: {exc.text}")
        raise DeviceError(CONNECT_FAILED, "; ".join(problems))

    async def _open_link(self, addr: str) -> _Link:
        host, port = parse_address(addr)
        link = _Link(self, addr, asyncio.get_running_loop())
        self._link = link
        try:
            try:
                await asyncio.to_thread(link.client.connect, host, port, self.keepalive)
            except OSError as exc:
                raise DeviceError(CONNECT_FAILED, exc.strerror or str(exc)) from None
            link.client.loop_start()
            code = await link.connack
            if code != 0:
                if code in (0x04, 0x05, 0x86, 0x87):  # bad credentials / not authorized
                    raise DeviceError(
                        errors.AUTH_FAILED,
                        f"the broker refused the CONNECT (code {code}): unknown device, wrong "
                        "token or revoked",
                    )
                raise DeviceError(CONNECT_FAILED, f"the broker refused the CONNECT (code {code})")
            link.client.subscribe(self.inbox_topic, qos=self.qos)
            granted = await link.suback
            if granted >= 0x80:
                raise DeviceError(
                    PROTOCOL, f"the broker refused the subscription to {self.inbox_topic}"
                )
            await self._hello(link)
        except BaseException:
            if self._link is link:
                self._link = None
            await link.stop()
            raise
        return link

    async def _hello(self, link: _Link) -> None:
        """Tell the gateway the session is up (needed with an external broker, where the
        gateway cannot see connections; answered by the embedded one too)."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        req = _Request("hello", "", fut)
        prev, self._request = self._request, req
        try:
            link.publish(
                f"{self.prefix}ctl",
                orjson.dumps({"op": "hello", "token": self.token, "session": link.session}),
                self.qos,
            )
            await fut
        finally:
            self._request = prev

    def _install(self, link: _Link) -> None:
        self._clear_held()  # held sealed deliveries were not acked: they come again
        self.address = link.address
        for out in self._outgoing.values():
            self._write(out, link)
        self._connected.set()

    async def _supervise(self, link: _Link) -> None:
        self._install(link)
        while True:
            await link.lost.wait()
            self._connected.clear()
            if self._link is link:
                self._link = None
            await link.stop()
            for out in self._outgoing.values():
                if out.timer is not None:
                    out.timer.cancel()
                    out.timer = None
            if self._closing:
                return
            if not self.reconnect:
                self._stop(DeviceError(CLOSED, "the connection was lost"), final=True)
                return
            next_link = await self._reconnect()
            if next_link is None:
                return
            link = next_link
            self.reconnects += 1
            self._install(link)

    async def _reconnect(self) -> _Link | None:
        delay = self.backoff_min
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                return await self._open()
            except DeviceError as exc:
                if exc.code in FATAL_CODES:
                    self._stop(exc, final=True)
                    return None
                log.debug("%s: reconnect failed: %s", self.device_id, exc)
                delay = min(delay * 2, self.backoff_max)
        return None

    # -- internals: what the network thread hands over -------------------------------------
    def _wake(self, link: _Link) -> None:
        for kind, value in link.take():
            if kind == "message":
                self._rx.append(value)
                self._rx_ready.set()
                link.release()
            elif kind == "puback":
                out = link.mids.pop(value, None)
                if out is not None and not out.pubacked:
                    out.pubacked = True
                    self.pubacked += 1
            elif kind == "connack" and not link.connack.done():
                link.connack.set_result(value)
            elif kind == "suback" and not link.suback.done():
                link.suback.set_result(value)
            elif kind == "lost":
                link.lost.set()
                lost = DeviceError(CONNECT_FAILED, "the broker closed the connection")
                for fut in (link.connack, link.suback):
                    if not fut.done():
                        fut.set_exception(lost)
                        fut.exception()  # seen: whoever awaits it gets it; nobody else logs it
                req = self._request
                if req is not None and req.op == "hello" and not req.future.done():
                    req.future.set_exception(lost)

    async def _pump_rx(self) -> None:
        """Every payload from the inbox topic, in order; acks flushed per batch."""
        while True:
            await self._rx_ready.wait()
            self._rx_ready.clear()
            while self._rx:
                await self._dispatch(self._rx.popleft())
            self._flush_acks()

    async def _dispatch(self, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
            kind = doc["kind"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning(
                "%s: unreadable message on %s: %r", self.device_id, self.inbox_topic, payload[:100]
            )
            return
        if kind in ("p2p", "topic"):
            try:
                msg = Message(
                    kind,
                    str(doc["id"]),
                    str(doc["from"]),
                    str(doc["body"]),
                    str(doc.get("topic", "")),
                    int(doc.get("ts", 0)) or _now_ms(),
                )
            except (KeyError, TypeError, ValueError):
                log.warning("%s: malformed delivery %r", self.device_id, payload[:100])
                return
            enc = doc.get("enc", "none")
            if enc != "none" and isinstance(enc, str):
                await self._deliver_sealed(msg, enc)
            else:
                await self._deliver(msg)
        elif kind == "accepted":
            out = self._outgoing.get(str(doc.get("id")))
            if out is not None:
                self._forget(out)
                self.accepted += 1
                if not out.future.done():
                    out.future.set_result(out.id)
        elif kind == "error":
            self._on_error(
                str(doc.get("code", PROTOCOL)), str(doc.get("text", "")), str(doc.get("ref", ""))
            )
        elif kind == "hello":  # a gateway that does not know this session yet asks
            link = self._link
            if link is not None and self._connected.is_set():
                link.publish(
                    f"{self.prefix}ctl",
                    orjson.dumps({"op": "hello", "token": self.token, "session": link.session}),
                    self.qos,
                )
        elif kind == "ok" and doc.get("op") == "public_key":
            device, key = str(doc.get("device", "")), str(doc.get("key", ""))
            await self._got_public_key(device, key)
            req = self._request
            if req is not None and req.op == "public_key" and req.name == device:
                if not req.future.done():
                    req.future.set_result(key)
        elif kind == "ok" and doc.get("op") == "topic_owner":
            await self._got_topic_owner(str(doc.get("topic", "")), str(doc.get("owner", "")))
        elif kind == "ok":
            req = self._request
            op = str(doc.get("op", ""))
            if req is not None and req.op == op and req.name == str(doc.get("topic", "")):
                if not req.future.done():
                    req.future.set_result(str(doc.get("address", req.name)))
        else:
            log.debug("%s: ignoring %r", self.device_id, payload[:100])

    def _on_error(self, code: str, text: str, ref: str) -> None:
        self.server_errors.append((code, text, ref))
        if ref:
            out = self._outgoing.get(ref)
            if out is not None:
                if code == errors.UNAVAILABLE and self.retry_unavailable and not self._closing:
                    self._retry_later(out, min(self.backoff_min * 2**out.retries, self.backoff_max))
                    return
                self._forget(out)
                self.rejected += 1
                if not out.future.done():
                    out.future.set_exception(DeviceError(code, text, ref))
                return
        req = self._request
        if req is not None and (req.name == ref or not ref) and not req.future.done():
            req.future.set_exception(DeviceError(code, text, ref))
            return
        log.info("%s: server error: %s %s (%s)", self.device_id, code, text, ref)
        if code in FATAL_CODES:
            self._stop(DeviceError(code, text), final=True)

    async def _deliver(self, msg: Message) -> None:
        if self._closing:
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
            self._flush_acks()
        if not await self._inbox.put(msg):
            return
        self.received += 1
        self._seen[key] = self.auto_ack
        if len(self._seen) > self._dedupe_max:
            self._seen.popitem(last=False)
        if self.auto_ack:
            self._acks.append(msg.id)

    def _flush_acks(self) -> None:
        acks = self._acks
        link = self._link
        if not acks or link is None or not self._connected.is_set():
            return  # not acked: delivered again later, then acked as a duplicate
        self._acks = []
        for i in range(0, len(acks), ACK_BATCH):
            link.publish(
                f"{self.prefix}ack", orjson.dumps({"ids": acks[i : i + ACK_BATCH]}), self.qos
            )

    # -- internals: sending ----------------------------------------------------------------
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

    def _write(self, out: _Outgoing, link: _Link | None = None) -> bool:
        link = link or self._link
        if link is None:
            return False
        mid = link.publish(out.topic, out.payload, self.qos)
        link.mids[mid] = out
        self.resent += out.written
        out.written = True
        self._retry_later(out, self.receipt_timeout)
        return True

    def _retry_later(self, out: _Outgoing, delay: float) -> None:
        if out.timer is not None:
            out.timer.cancel()
        out.retries += 1
        out.timer = asyncio.get_running_loop().call_later(delay, self._rewrite, out)

    def _rewrite(self, out: _Outgoing) -> None:
        out.timer = None
        if self._outgoing.get(out.id) is out and self._connected.is_set():
            self._write(out)

    async def _submit(self, msg_id: str, topic: str, payload: bytes) -> str:
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
        out = _Outgoing(msg_id, topic, payload, fut)
        self._outgoing[msg_id] = out
        self.sent += 1
        try:
            if self._connected.is_set():
                self._write(out)
            return await fut
        finally:
            if self._outgoing.get(msg_id) is out:
                self._forget(out)

    def _forget(self, out: _Outgoing) -> None:
        del self._outgoing[out.id]
        if out.timer is not None:
            out.timer.cancel()
            out.timer = None
        if self._slots is not None:
            self._slots.release()

    async def _request_reply(self, op: str, name: str) -> str:
        self._check_open()
        assert self._request_lock is not None
        async with self._request_lock:
            await self._wait_ready()
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._request = _Request(op, name, fut)
            try:
                link = self._link
                if link is not None:
                    what = "device" if op == "public_key" else "topic"
                    link.publish(
                        f"{self.prefix}ctl", orjson.dumps({"op": op, what: name}), self.qos
                    )
                async with asyncio.timeout(self.request_timeout):
                    return await fut
            except TimeoutError:
                raise DeviceError(
                    TIMEOUT, f"no answer to {op} within {self.request_timeout:g}s", name
                ) from None
            finally:
                self._request = None

    def _stop(self, error: DeviceError, *, final: bool) -> None:
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
        if final and self._link is not None:
            self._link.client.disconnect()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
