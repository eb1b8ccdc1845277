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

The device-side logic (ids, receipts, resends, dedupe, acks, the inbox, sealing) is
:class:`~firmware_sim.device_base.DeviceBase`, shared with ``TcpDevice``; this module is
the MQTT transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.bundle import Bundle
from firmware_sim.device_base import (
    DeviceBase,
    DeviceOptions,
    _Outgoing,
    _Request,
)
from firmware_sim.device_types import (
    CONNECT_FAILED,
    FATAL_CODES,
    PROTOCOL,
    DeviceError,
    Message,
    _as_list,
    _now_ms,
    parse_address,
)
from fishchat_iot import errors

log = logging.getLogger("firmware_sim.mqtt")

ACK_BATCH = 256  # ids per ack publish (the gateway takes up to 1000)
RX_MAX = 4096  # messages the network thread may hand over before the loop took them


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


class MqttDevice(DeviceBase[_Link]):
    """One simulated device over MQTT. See the module docstring. ``broker`` is one
    ``"host:port"`` or several, tried in turn; the other keyword arguments are
    :class:`~firmware_sim.device_base.DeviceOptions`. Not thread-safe: use it from one
    event loop."""

    _log = log
    _task_name = "fishchat-mqtt"

    def __init__(
        self,
        device_id: str,
        token: str,
        broker: str | Sequence[str],
        *,
        receipt_timeout: float = 30.0,
        qos: int = 1,
        **options: Unpack[DeviceOptions],
    ) -> None:
        if not device_id:
            raise ValueError("device_id must not be empty")
        if not token:
            raise ValueError("a token is needed: it is the MQTT password")
        super().__init__(device_id, token, **options)
        self.keepalive = max(1, round(self.keepalive))
        self._brokers = _as_list(broker)
        if not self._brokers:
            raise ValueError("give the MQTT broker's address ('host:port')")
        for addr in self._brokers:
            parse_address(addr)
        self.receipt_timeout = receipt_timeout
        self.qos = qos
        self._link: _Link | None = None
        self._rx: collections.deque[bytes] = collections.deque()
        self._rx_ready = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self.prefix = f"fc/{device_id}/"
        self.inbox_topic = f"fc/{device_id}/in"
        self.pubacked = 0  # PUBACKs from the broker for our messages (not receipts!)

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
        bundle = cls._read_bundle(bundle, e2e, kwargs)
        if broker is None:
            raw = bundle.raw.get("mqtt")
            broker = [raw] if isinstance(raw, str) else list(raw or [])
        return cls(bundle.id, bundle.token, broker, **kwargs)

    # -- state ---------------------------------------------------------------------------
    @property
    def brokers(self) -> tuple[str, ...]:
        return tuple(self._brokers)

    # -- lifecycle -----------------------------------------------------------------------
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

    # -- internals: writing ----------------------------------------------------------------
    def _publish_ctl(self, link: _Link, doc: dict[str, Any]) -> None:
        link.publish(f"{self.prefix}ctl", orjson.dumps(doc), self.qos)

    def _message(
        self, kind: str, to: str, msg_id: str, text: str, sealed: tuple[str, str] | None
    ) -> tuple[bytes, str]:
        if sealed is not None:
            doc = {"id": msg_id, "body": sealed[0], "enc": sealed[1], "ts": _now_ms()}
        else:
            doc = {"id": msg_id, "body": text, "ts": _now_ms()}
        return orjson.dumps(doc), f"{self.prefix}{kind}/{to}"

    def _control_frame(self, op: str, name: str) -> tuple[str, bytes]:
        what = "device" if op == "public_key" else "topic"
        return op, orjson.dumps({"op": op, what: name})

    def _write_out(self, out: _Outgoing) -> bool:
        link = self._link
        if link is None:
            return False
        link.mids[link.publish(out.topic, out.frame, self.qos)] = out
        self._retry_later(out, self.receipt_timeout)
        return True

    def _write_control(self, frame: bytes) -> bool:
        link = self._link
        if link is None:
            return False
        link.publish(f"{self.prefix}ctl", frame, self.qos)
        return True

    def _write_ack(self, msg_id: str) -> None:
        self._acks.append(msg_id)
        self._flush_acks()

    def _ask_public_key(self, device_id: str) -> None:
        link = self._link
        if link is not None:
            self._publish_ctl(link, {"op": "public_key", "device": device_id})

    def _ask_topic_owner(self, topic: str) -> bool:
        link = self._link
        if link is None:
            return False  # not connected: the key stays unacked and comes again
        self._publish_ctl(link, {"op": "topic_owner", "topic": topic})
        return True

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

    async def _request_ready(self) -> None:
        await self._wait_ready()  # a request is published on a live session only

    # -- internals: connections ------------------------------------------------------------
    def _start(self) -> None:
        self._pump = asyncio.create_task(self._pump_rx(), name=f"fishchat-rx-{self.device_id}")

    def _own_tasks(self) -> list[asyncio.Task[None] | None]:
        return [self._supervisor, self._pump]

    async def _open_any(self) -> _Link:
        self._attempt += 1
        problems = []
        for addr in self._rotated(self._brokers):
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
                await asyncio.to_thread(link.client.connect, host, port, int(self.keepalive))
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
        req = _Request("hello", "", b"", fut)
        prev, self._request = self._request, req
        try:
            self._publish_ctl(link, {"op": "hello", "token": self.token, "session": link.session})
            await fut
        finally:
            self._request = prev

    async def _discard(self, session: _Link) -> None:
        if self._link is session:
            self._link = None
        await session.stop()

    def _attach(self, session: _Link) -> None:
        self.address = session.address

    async def _serve(self, session: _Link) -> None:
        await session.lost.wait()
        self._connected.clear()
        if self._link is session:
            self._link = None
        await session.stop()
        for out in self._outgoing.values():
            if out.timer is not None:
                out.timer.cancel()
                out.timer = None

    async def _goodbye(self) -> None:
        link = self._link
        if link is None:
            return
        self._flush_acks()
        with contextlib.suppress(Exception):
            self._publish_ctl(link, {"op": "bye", "session": link.session})
            link.client.disconnect()
            await asyncio.wait_for(link.lost.wait(), self.logout_timeout)

    async def _close_session(self) -> None:
        link = self._link
        self._link = None
        if link is not None:
            await link.stop()

    def _stop(self, error: DeviceError, *, final: bool) -> None:
        super()._stop(error, final=final)
        if final and self._link is not None:
            self._link.client.disconnect()

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
                if req is not None and req.cmd == "hello" and not req.future.done():
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
            await self._take(msg, enc if isinstance(enc, str) else "none")
        elif kind == "accepted":
            self._accepted(str(doc.get("id")))
        elif kind == "error":
            self._on_error(
                str(doc.get("code", PROTOCOL)), str(doc.get("text", "")), str(doc.get("ref", ""))
            )
        elif kind == "hello":  # a gateway that does not know this session yet asks
            link = self._link
            if link is not None and self._connected.is_set():
                self._publish_ctl(
                    link, {"op": "hello", "token": self.token, "session": link.session}
                )
        elif kind == "ok" and doc.get("op") == "public_key":
            device, key = str(doc.get("device", "")), str(doc.get("key", ""))
            await self._got_public_key(device, key)
            self._answer("public_key", device, key)
        elif kind == "ok" and doc.get("op") == "topic_owner":
            await self._got_topic_owner(str(doc.get("topic", "")), str(doc.get("owner", "")))
        elif kind == "ok":
            topic = str(doc.get("topic", ""))
            self._answer(str(doc.get("op", "")), topic, str(doc.get("address", topic)))
        else:
            log.debug("%s: ignoring %r", self.device_id, payload[:100])

    def _unmatched_error(self, code: str, text: str, ref: str) -> None:
        req = self._request
        if req is not None and not ref and not req.future.done():
            req.future.set_exception(DeviceError(code, text, ref))
            return
        log.info("%s: server error: %s %s (%s)", self.device_id, code, text, ref)
        if code in FATAL_CODES:
            self._stop(DeviceError(code, text), final=True)
