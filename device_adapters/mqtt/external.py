"""External-broker mode: devices connect to an existing MQTT broker (Mosquitto, EMQX ...)
and the gateway attaches to it as one paho-mqtt client (``docs/deploy-mosquitto.md``).

The broker authenticates devices and enforces the topic ACL (files exported by
``fishchat-iot mqtt export-mosquitto``), so a publish on ``fc/{id}/...`` is from device
``id``. The gateway subscribes to

- ``$share/{group}/fc/+/p2p/+`` and ``$share/{group}/fc/+/topic/+``: the uplink, split
  between the gateways sharing the group;
- ``fc/+/ctl`` and ``fc/+/ack``, unshared: every gateway sees every session start
  (``hello``, which carries the token), end (``bye``, also the will the broker publishes
  when a device vanishes) and ack, so each keeps a ``ExternalSession`` per device
  and can deliver to it live.

What the core emits for a device is published on ``fc/{id}/in``. paho's network loop
runs in its own thread; what it receives is handed to the event loop in batches through
a bounded buffer (a full buffer stops the network thread reading from the broker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_adapters.mqtt import codec
from device_adapters.mqtt.codec import Uplink
from device_adapters.mqtt.uplink import UplinkSession
from device_adapters.tcp.listener import ListenError
from fishchat_iot import errors
from fishchat_iot.config import Settings
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.core.session import Mode
from fishchat_iot.crypto.gateway import for_last_hop
from fishchat_iot.roles.manager import Manager
from fishchat_iot.roles.msg_server import MsgServer, valid_name

log = logging.getLogger("fishchat.mqtt")

SENDERS_MAX = 10000  # cached sessions of devices that publish without a hello here
HIGH_WATER = 20000  # publishes not yet confirmed by the broker: deliveries wait beyond it
LOW_WATER = HIGH_WATER // 2


class ExternalSession(UplinkSession):
    """A device on the external broker, as the core sees it: the session its ``hello``
    opened, or a stand-in to send as (a device without a hello here). Emits are queued
    in ``out`` as records (QoS byte, 4-byte length, payload) and published on
    ``fc/{id}/in``."""

    transport_name = "mqtt-external"

    def __init__(self, edge: ExternalMqtt, device_id: str, tag: str = "") -> None:
        super().__init__(device_id)
        self.edge = edge
        self.server = edge.server
        self.max_payload = edge.max_payload
        self.inbox = codec.inbox(device_id)
        self.tag = tag  # the session nonce of the device's hello (matched by its bye)
        self.idle_timeout = math.inf  # the broker enforces keepalive; its will ends us

    def control(self, up: Uplink) -> asyncio.Task[Any] | None:
        if up.op == "hello":
            return self.edge.spawn(
                self.edge.hello(self.device_id, up.token, up.session),
                f"mqtt-hello-{self.device_id}",
            )
        if up.op == "bye":
            self.edge.bye(self.device_id, up.session)
            return None
        return super().control(up)

    def _record(self, payload: bytes) -> None:
        out = self.out
        out.append(self.edge.qos)
        out += len(payload).to_bytes(4, "big")
        out += payload

    def emit_message(self, env: Envelope) -> None:
        self._record(codec.delivery(for_last_hop(self, env)))

    def emit_accepted(self, msg_id: str) -> None:
        self._record(codec.accepted(msg_id))

    def emit_error(self, code: str, text: str, ref: str = "") -> None:
        self._record(codec.error(code, text, ref))

    def emit_ok(self, command: str, name: str) -> None:
        self._record(codec.ok(command.lower(), name))

    def emit_located(self, address: str, topic: str) -> None:
        self._record(codec.ok("join_topic", topic, address=address))

    def emit_payload(self, payload: bytes) -> None:
        self._record(payload)

    def write_out(self) -> None:
        out, self.out = self.out, bytearray()
        view = memoryview(out)
        pos = 0
        while pos < len(view):
            qos = view[pos]
            size = int.from_bytes(view[pos + 1 : pos + 5], "big")
            self.edge.publish(self.inbox, bytes(view[pos + 5 : pos + 5 + size]), qos)
            pos += 5 + size

    def can_write(self) -> bool:
        return self.edge.writable

    def drop(self, code: str, text: str) -> None:
        """The session ends without a connection to close. The inbox reaches whatever
        connection the device has now, so a replaced session (the same device saying
        hello again) is not told; revocation and shutdown are."""
        if code != errors.SESSION_REPLACED:
            self._record(codec.error(code, text))
            self.write_out()


class ExternalMqtt:
    """The gateway's client of an external broker. ``await start()``, ``await stop()``."""

    def __init__(self, settings: Settings, server: MsgServer, manager: Manager) -> None:
        cfg = settings.mqtt
        self.settings = settings
        self.server = server
        self.manager = manager
        self.host = cfg.broker_host
        self.port = cfg.broker_port
        self.group = cfg.share_group
        self.qos = max(0, min(1, cfg.max_qos))
        self.max_payload = cfg.max_payload
        self.client_id = cfg.client_id or f"fishchat-gateway-{os.urandom(4).hex()}"
        self.writable = False  # connected, and the broker keeps up
        self.uplinks = 0  # uplink publishes handled here (the share of the split)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._slots = threading.BoundedSemaphore(max(1, cfg.uplink_max))
        self._closing = False
        self._unconfirmed = 0  # publishes not yet PUBACKed (QoS 1) or written (QoS 0)
        self._blocked = False
        self._connected = False
        self._attached_once = False
        self._ready: asyncio.Future[int] | None = None
        self._senders: OrderedDict[str, ExternalSession] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            reconnect_on_failure=True,
        )
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        self.client = c
        self.keepalive = cfg.broker_keepalive

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def subscriptions(self) -> list[tuple[str, int]]:
        share = f"$share/{self.group}/" if self.group else ""
        return [
            (f"{share}fc/+/p2p/+", 1),
            (f"{share}fc/+/topic/+", 1),
            ("fc/+/ctl", 1),
            ("fc/+/ack", 1),
        ]

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        hint = "(mqtt.broker_host, mqtt.broker_port, mqtt.username, mqtt.password)"
        try:
            await asyncio.to_thread(self.client.connect, self.host, self.port, self.keepalive)
        except OSError as exc:
            raise ListenError(
                f"cannot reach the MQTT broker at {self.address}: "
                f"{(exc.strerror or str(exc)).lower()}: is it running? {hint}"
            ) from None
        self.client.loop_start()
        try:
            async with asyncio.timeout(10):
                code = await self._ready
        except TimeoutError:
            code = -1
        if code != 0:
            await self.stop()
            what = {
                -1: "no answer in 10 s",
                4: "bad user name or password",
                5: "not authorized",
                0x86: "bad user name or password",
                0x87: "not authorized",
                0x80: "it refused the gateway's subscriptions: check its acl_file",
            }.get(code, f"code {code}")
            raise ListenError(
                f"the MQTT broker at {self.address} refused the gateway: {what} {hint}"
            )
        log.info(
            "MQTT edge attached to the broker at %s as %s (uplink shared as $share/%s)",
            self.address,
            self.client_id,
            self.group,
        )
        self.spawn(self._ask_for_hellos(), "mqtt-hellos")

    async def stop(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._attached_once:
            log.info("MQTT edge: %d uplink publishes were handled by this gateway", self.uplinks)
        for s in [s for s in self.server.sessions.values() if isinstance(s, ExternalSession)]:
            s.drop(errors.UNAVAILABLE, "gateway shutting down: say hello again later")
            self.server.session_closed(s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _ask_for_hellos(self) -> None:
        """Devices already on the broker do not know this gateway: ask each registered
        one to say hello (QoS 0: only the connected ones hear it)."""
        try:
            devices = await self.manager.store.list_devices()
        except Exception as exc:
            log.warning("cannot list devices to greet: %s", exc)
            return
        payload = orjson.dumps({"kind": "hello"})
        for i, rec in enumerate(devices):
            if not rec.revoked:
                self.client.publish(codec.inbox(rec.id), payload, qos=0)
            if i % 500 == 499:
                await asyncio.sleep(0)

    # -- network thread -------------------------------------------------------------------
    def _hand(self, kind: str, value: Any) -> None:
        with self._lock:
            self._events.append((kind, value))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._hand("connack", int(reason.value))
            return
        c.subscribe(self.subscriptions())

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = any(int(r.value) >= 0x80 for r in reasons)
        self._hand("connack", 0x80 if refused else 0)

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        while not self._slots.acquire(timeout=0.2):  # the event loop is behind: stop reading
            if self._closing:
                return
        self._hand("message", (msg.topic, msg.payload))

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        self._hand("confirmed", 1)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self._hand("lost", None)

    # -- event loop -----------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
            events = list(self._events)
            self._events.clear()
        confirmed = 0
        for kind, value in events:
            if kind == "message":
                try:
                    self._uplink(*value)
                except Exception:
                    log.exception("MQTT uplink %r failed", value[0][:150])
                finally:
                    self._slots.release()
            elif kind == "confirmed":
                confirmed += value
            elif kind == "connack":
                self._attached(value)
            elif kind == "lost":
                self._detached()
        if confirmed:
            self._unconfirmed -= confirmed
            if self._blocked and self._unconfirmed <= LOW_WATER:
                self._blocked = False
                self._set_writable()

    def _attached(self, code: int) -> None:
        starting = self._ready is not None and not self._ready.done()
        if starting and self._ready is not None:
            self._ready.set_result(code)
            if code:
                return  # start() reports it
        if code == 0:
            if self._connected:
                return
            self._connected = True
            if self._attached_once:
                log.info("MQTT broker %s: attached again", self.address)
            self._attached_once = True
            self._set_writable()
        else:
            log.error("the MQTT broker %s refused the gateway (code %#x)", self.address, code)

    def _detached(self) -> None:
        if self._connected:
            self._connected = False
            if not self._closing:
                log.warning("lost the MQTT broker %s: reconnecting", self.address)
        self.writable = False

    def _set_writable(self) -> None:
        self.writable = self._connected and not self._blocked
        if self.writable:
            for s in list(self.server.sessions.values()):
                if isinstance(s, ExternalSession) and s.mode is Mode.BACKLOG:
                    self.server.writable_again(s)

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.client.publish(topic, payload, qos=qos)
        self._unconfirmed += 1
        if not self._blocked and self._unconfirmed >= HIGH_WATER:
            self._blocked = True
            self.writable = False

    def _sender(self, device_id: str) -> ExternalSession:
        """The session to send as: the device's own if it said hello here, else a cached
        stand-in (its receipts still go to its inbox)."""
        s = self.server.sessions.get(device_id)
        if isinstance(s, ExternalSession):
            return s
        s = self._senders.get(device_id)
        if s is None:
            s = ExternalSession(self, device_id)
            s.device_id = device_id
            s.node = self.server
            s.mode = Mode.LIVE
            self._senders[device_id] = s
            if len(self._senders) > SENDERS_MAX:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(device_id)
        return s

    def _uplink(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/", 2)
        if len(parts) < 3 or parts[0] != codec.ROOT or not valid_name(parts[1]):
            log.warning("ignoring a publish on %r (not fc/ID/...)", topic[:150])
            return
        if parts[2].startswith(("p2p/", "topic/")):
            self.uplinks += 1
        self._sender(parts[1]).on_publish(topic, payload, 1)

    def bye(self, device_id: str, tag: str) -> None:
        s = self.server.sessions.get(device_id)
        if isinstance(s, ExternalSession) and (not tag or tag == s.tag):
            log.info("device %s left the MQTT broker", device_id)
            self.server.session_closed(s)

    async def hello(self, device_id: str, token: str, tag: str) -> None:
        old = self.server.sessions.get(device_id)
        if isinstance(old, ExternalSession) and tag and old.tag == tag:
            old.emit_ok("hello", "")  # asked again (a new gateway): nothing changed here
            old.mark_dirty()
            return
        s = ExternalSession(self, device_id, tag)
        failure = await self.server.login(s, device_id, token)
        if failure is not None:
            code, text = failure
            log.warning("MQTT hello of %s refused: %s: %s", device_id, code, text)
            s.emit_error(code, text)
            s.write_out()
            return
        self._senders.pop(device_id, None)
        log.info("device %s said hello on the MQTT broker", device_id)
        s.emit_ok("hello", "")
        s.mark_dirty()
