"""One device on the embedded broker: its TCP connection (``Connection``, with the reader
that amqtt parses packets from) and its core session (``MqttSession``), which turns the
device's publishes under ``fc/{id}/`` into ``MsgServer`` calls and writes what the core
emits as PUBLISH packets on ``fc/{id}/in``.

Written the way the TCP adapter is: every emit appends a packet to ``self.out``, and the
node writes each session once per event-loop turn. The gateway writes these packets on
the socket itself rather than through amqtt (see ``broker.py`` for why).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any, cast

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter

from device_adapters.mqtt import codec
from device_adapters.mqtt.codec import Uplink
from device_adapters.mqtt.packets import append_publish
from device_adapters.mqtt.uplink import UplinkSession
from fishchat_iot import errors
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.core.session import Mode
from fishchat_iot.crypto.gateway import for_last_hop
from fishchat_iot.limits import DeviceRate, host_of

if TYPE_CHECKING:
    from device_adapters.mqtt.broker import EmbeddedMqtt

log = logging.getLogger("fishchat.mqtt")


class Connection:
    """A device's TCP connection to the embedded broker, from accept to close.

    Everything written to it — amqtt's CONNACK, PUBACKs, SUBACKs, PINGRESPs and the
    session's PUBLISHes — is gathered in ``pending`` and written once per event-loop
    turn: on this kind of host a send costs far more than the bytes in it."""

    __slots__ = (
        "cert_id",
        "connect_timer",
        "dead",
        "flush_handle",
        "high_water",
        "peer",
        "pending",
        "session",
        "transport",
        "writer",
    )

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending = bytearray()
        self.flush_handle: asyncio.Handle | None = None
        # uvloop's transports do not subclass asyncio.Transport: cast, no isinstance.
        self.transport = cast(asyncio.Transport, writer.transport)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.session: MqttSession | None = None
        self.dead = False  # refused (oversize packet): reads return EOF from now on
        self.connect_timer: asyncio.TimerHandle | None = None
        self.cert_id: str | None = None  # CN of a verified client certificate (TLS)
        # The protocol pauses writing above this: then the session is fed from its queue.
        self.high_water = writer.transport.get_write_buffer_limits()[1]

    def send(self, data: bytes | bytearray) -> None:
        """Write at the end of this event-loop turn, with whatever else comes."""
        self.pending += data
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if self.pending:
            data, self.pending = self.pending, bytearray()
            if not self.transport.is_closing():
                self.transport.write(data)


class ConnectionWriter(StreamWriterAdapter):
    """What amqtt writes packets through: into the connection's per-turn buffer.
    ``drain`` waits only while the socket is backed up (amqtt drains after every
    packet; flushing there would cost a send per packet)."""

    def __init__(self, writer: asyncio.StreamWriter, conn: Connection) -> None:
        super().__init__(writer)
        self.conn = conn

    def write(self, data: bytes) -> None:
        if not self.is_closed:
            self.conn.send(data)

    async def drain(self) -> None:
        if self.conn.transport.get_write_buffer_size() > self.conn.high_water:
            await super().drain()

    async def close(self) -> None:
        self.conn.flush()
        await super().close()


class ConnectionReader(ReaderAdapter):
    """What amqtt reads packets through: marks the session as heard from on every read
    (the keepalive watchdog's clock) and refuses packets above ``max_packet`` before
    amqtt buffers them."""

    def __init__(self, reader: asyncio.StreamReader, conn: Connection, max_packet: int) -> None:
        self._reader = reader
        self.conn = conn
        self._max = max_packet

    async def read(self, n: int = -1) -> bytes:
        conn = self.conn
        if conn.dead:
            return b""
        if n > self._max:
            conn.dead = True
            who = conn.session.device_id if conn.session is not None else conn.peer
            log.warning(
                "closing the MQTT connection of %s: a packet of %d bytes is above "
                "mqtt.max_packet (%d)",
                who,
                n,
                self._max,
            )
            conn.transport.abort()
            return b""
        data = await (self._reader.read(n) if n < 0 else self._reader.readexactly(n))
        s = conn.session
        if s is not None:
            s.last_seen = time.monotonic()
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class MqttSession(UplinkSession):
    transport_name = "mqtt"

    def __init__(self, edge: EmbeddedMqtt, conn: Connection, device_id: str, keepalive: int):
        super().__init__(device_id)
        self.edge = edge
        self.server = edge.server
        self.max_payload = edge.max_payload
        self.conn = conn
        self.inbox_topic = codec.inbox(device_id).encode()
        # MQTT 3.1.2.10: silent for 1.5 x the keepalive means gone; 0 means "no limit".
        self.idle_timeout = keepalive * edge.keepalive_factor if keepalive > 0 else math.inf
        self.sub_qos = -1  # QoS granted on fc/{id}/in; -1 until the device subscribes
        self._packet_id = 0
        self._write_blocked = False
        self._read_pauses = 0
        self.rate: DeviceRate | None = None  # limits.py, from the first publish
        self.no_rate = False  # no limits for it (limits.exempt, or rates off)

    # -- from the device (UplinkSession.on_publish) ------------------------------------
    def _within_rate(self, up: Uplink) -> bool:
        """limits.msg_rate and byte_rate (bytes of the body here): over them the device
        is told RATE_LIMITED on its inbox and the message is not accepted."""
        if self.rate is None:
            if self.no_rate:
                return True
            self.rate = self.edge.limits.device_rate(self.device_id, host_of(self.conn.peer))
            if self.rate is None:
                self.no_rate = True
                return True
        self.rate.refill(time.monotonic())
        if self.rate.take_msg() and self.rate.take_bytes(len(up.body), force=False):
            return True
        lim = self.server.settings.limits
        self.emit_error(
            errors.RATE_LIMITED,
            f"over {lim.msg_rate:g} messages/s or {lim.byte_rate:g} bytes/s (limits.msg_rate, "
            "limits.byte_rate): not accepted, send it again later",
            up.id,
        )
        self.mark_dirty()
        return False

    def send_p2p(self, up: Uplink, qos: int) -> None:
        if not self._within_rate(up):
            return
        # Live deliveries of this message keep its QoS (MQTT: min(publish, subscription)).
        self.edge.uplink_qos = qos
        try:
            self.server.send_p2p(self, up.target, up.body, up.id, up.enc)
        finally:
            self.edge.uplink_qos = 2

    def send_topic(self, up: Uplink, qos: int) -> asyncio.Task[Any] | None:
        if not self._within_rate(up):
            return None
        self.edge.uplink_qos = qos
        try:
            return self.server.send_topic(self, up.target, up.body, up.id, up.enc)
        finally:
            self.edge.uplink_qos = 2

    def subscribed(self, qos: int) -> None:
        """The device subscribed to its inbox: deliveries may start."""
        self.sub_qos = min(qos, 1)
        if self.mode is Mode.BACKLOG:
            self.server.writable_again(self)

    def unsubscribed(self) -> None:
        self.sub_qos = -1

    # -- Session: what the core emits ---------------------------------------------------
    def _qos(self) -> int:
        return min(self.sub_qos, self.edge.max_qos)

    def _append(self, payload: bytes, qos: int) -> None:
        if self.sub_qos < 0:
            return  # not subscribed (mosquitto_pub): nowhere to put receipts
        pid = 0
        if qos:
            pid = self._packet_id % 65535 + 1
            self._packet_id = pid
        append_publish(self.out, self.inbox_topic, payload, qos, pid)

    def emit_message(self, env: Envelope) -> None:
        env = for_last_hop(self, env)
        self._append(codec.delivery(env), min(self._qos(), self.edge.uplink_qos))

    def emit_accepted(self, msg_id: str) -> None:
        self._append(codec.accepted(msg_id), self._qos())

    def emit_error(self, code: str, text: str, ref: str = "") -> None:
        self._append(codec.error(code, text, ref), self._qos())

    def emit_ok(self, command: str, name: str) -> None:
        self._append(codec.ok(command.lower(), name), self._qos())

    def emit_located(self, address: str, topic: str) -> None:
        self._append(codec.ok("join_topic", topic, address=address), self._qos())

    def emit_payload(self, payload: bytes) -> None:
        self._append(payload, self._qos())

    def write_out(self) -> None:
        out = self.out
        if not out:
            return
        self.out = bytearray()
        conn = self.conn
        transport = conn.transport
        if transport.is_closing():
            return
        conn.send(out)
        conn.flush()  # the core already gathered this turn's writes
        if not self._write_blocked and transport.get_write_buffer_size() > self.conn.high_water:
            # A slow reader: feed it from its durable queue until the socket drains.
            self._write_blocked = True
            self.edge.spawn(self._wait_writable(), f"mqtt-drain-{self.device_id}")

    async def _wait_writable(self) -> None:
        try:
            await self.conn.writer.drain()
        except (ConnectionError, RuntimeError):
            return
        finally:
            self._write_blocked = False
        if self.mode is not Mode.CLOSED:
            self.server.writable_again(self)

    def can_write(self) -> bool:
        return self.sub_qos >= 0 and not self._write_blocked and not self.conn.dead

    def drop(self, code: str, text: str) -> None:
        transport = self.conn.transport
        if transport.is_closing():
            return
        self._append(codec.error(code, text), self._qos())
        self.write_out()
        if code == errors.KEEPALIVE_TIMEOUT:
            transport.abort()  # half-open: nothing would flush
        else:
            transport.close()

    def pause_input(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and not self.conn.transport.is_closing():
            self.conn.transport.pause_reading()

    def resume_input(self) -> None:
        self._read_pauses -= 1
        if self._read_pauses == 0 and not self.conn.transport.is_closing():
            self.conn.transport.resume_reading()
