"""The embedded MQTT edge: an amqtt 0.12 broker in the gateway's process, on a listener
the gateway owns, with the registry auth and topic ACL plugins (``plugins.py``).

amqtt parses MQTT and runs CONNECT, SUBSCRIBE, PING and the QoS flows; the gateway
takes over at the point where amqtt would route a PUBLISH. Devices never talk to each
other through amqtt's routing: a publish under ``fc/{id}/`` goes to that device's
``MqttSession`` (and from there to ``MsgServer``), and everything for a device is
written by its session on ``fc/{id}/in``. Measured amqtt 0.12.1 defects and what is
done about each (DESIGN 3.2; the tests in ``tests/mqtt`` fail without them):

1. **PUBACK before routing.** amqtt PUBACKs a QoS 1 publish when it queues it and drops
   what is still queued when the client goes away. Devices therefore wait for the
   app-level ``accepted`` receipt (sent only once the message is live or stored), and
   ``_client_message_loop`` routes whatever amqtt already PUBACKed before the session
   closes.
2. **No keepalive enforcement.** amqtt's reader times out and carries on. The session
   sets ``idle_timeout`` to 1.5 x the CONNECT keepalive and the node's watchdog closes
   it after that much silence (every read marks it heard from): presence and offline
   queueing follow.
3. **QoS 0 upgraded to the subscription's QoS.** The gateway writes its own PUBLISH
   packets: a live delivery goes at min(sender's QoS, subscription's QoS, mqtt.max_qos).

Also, for throughput (DESIGN 9: batch the writes, no task per message):
``_handle_message_delivery`` handles every queued publish in one wake-up (amqtt runs a
task and an ``asyncio.wait`` per message); the publish ACL runs inline (amqtt runs each
plugin call as a task); amqtt's packets and the session's go through one buffer per
connection written once per event-loop turn (``ConnectionWriter``); amqtt is handed a
keepalive of 0 (it only turned the keepalive into a read timeout it then ignores, at a
task per packet) while the watchdog keeps the real one; and PUBACKs of the gateway's
own QoS 1 packets are absorbed without amqtt's "unknown packet id" warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session as AmqttSession

from device_adapters.mqtt import codec
from device_adapters.mqtt.plugins import RegistryAuthPlugin, TopicAclPlugin
from device_adapters.mqtt.session import (
    Connection,
    ConnectionReader,
    ConnectionWriter,
    MqttSession,
)
from device_adapters.tcp.listener import ListenError
from fishchat_iot import errors
from fishchat_iot.auth import token_matches
from fishchat_iot.config import Settings
from fishchat_iot.limits import limits_for
from fishchat_iot.roles.manager import Manager
from fishchat_iot.roles.msg_server import MsgServer, valid_name
from fishchat_iot.stores.base import StoreUnavailable

log = logging.getLogger("fishchat.mqtt")

LISTENER = "default"
KEEPALIVE = "fishchat.keepalive"  # the CONNECT's keepalive, kept in the amqtt session
SUBSCRIBE_REFUSED = 0x80
_AMQTT_LOGGERS = (
    "amqtt",
    "amqtt.broker",
    "amqtt.broker.plugins",
    "amqtt.mqtt.protocol.handler",
    "amqtt.mqtt.protocol.broker_handler",
    "amqtt.session",
    "transitions.core",
)


class _PubackWaiters(dict[int, Any]):
    """amqtt's table of PUBACK waiters, also answering for the gateway's own packet ids
    (whose PUBACKs need no action: delivery is confirmed by the app-level ack)."""

    class _Sink:
        def set_result(self, _: object) -> None:
            pass

    _SINK = _Sink()

    def __missing__(self, key: int) -> Any:
        return self._SINK


class _AmqttLevel(logging.Filter):
    """amqtt logs a client's failures (a CONNECT that never came ...) as ERROR; they are
    about one connection, not the server: WARNING at most."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class FishchatBroker(Broker):
    """amqtt's broker with the gateway's routing (see the module docstring)."""

    def __init__(self, config: dict[str, Any], edge: EmbeddedMqtt) -> None:
        super().__init__(config)
        self.edge = edge

    async def _client_message_loop(
        self, client_session: AmqttSession, handler: BrokerProtocolHandler
    ) -> None:
        reader = handler.reader
        if not isinstance(reader, ConnectionReader):  # not from our listener
            await super()._client_message_loop(client_session, handler)
            return
        s = await self.edge.open_session(reader.conn, client_session, handler)
        if s is None:
            return
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            # Defect 1: amqtt PUBACKed these already; route them before the session ends.
            queue = client_session.delivered_message_queue
            while not queue.empty():
                msg = queue.get_nowait()
                s.on_publish(msg.topic, msg.data, msg.qos or 0)
            log.info("device %s disconnected from MQTT", s.device_id)
            self.edge.server.session_closed(s)

    async def _handle_message_delivery(
        self,
        client_session: AmqttSession,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        reader = handler.reader
        s = reader.conn.session if isinstance(reader, ConnectionReader) else None
        if s is None:
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)
        msg = wait_deliver.result()
        if msg is not None:
            s.on_publish(msg.topic, msg.data, msg.qos or 0)
        queue = client_session.delivered_message_queue
        while not queue.empty():  # the whole batch in this wake-up
            msg = queue.get_nowait()
            s.on_publish(msg.topic, msg.data, msg.qos or 0)
        return True

    async def add_subscription(self, subscription: tuple[str, int], session: AmqttSession) -> int:
        granted = await super().add_subscription(subscription, session)
        self.edge.subscription_added(session.client_id or "", subscription[0], granted)
        return granted


class EmbeddedMqtt:
    """The embedded broker and its listener. ``await start()``, ``await stop()``."""

    def __init__(self, settings: Settings, server: MsgServer, manager: Manager) -> None:
        self.settings = settings
        cfg = settings.mqtt
        self.server = server
        self.manager = manager
        self.host = cfg.host
        self.port = cfg.port
        self.keepalive_factor = cfg.keepalive_factor
        self.max_qos = max(0, min(1, cfg.max_qos))
        self.max_payload = cfg.max_payload
        self.max_packet = cfg.max_packet
        self.connect_timeout = cfg.connect_timeout
        # QoS of the publish being handled (its live deliveries keep it); 2 = none.
        self.uplink_qos = 2
        self.broker: FishchatBroker | None = None
        self._server: asyncio.Server | None = None
        # TLS (tls.enabled): a second listener; its connections by peer address, so the
        # auth plugin finds the client certificate of a CONNECT.
        self.tls_port = settings.tls.mqtt_port
        self._tls_server: asyncio.Server | None = None
        self._tls_conns: dict[tuple[str, int], Connection] = {}
        self._conns: dict[asyncio.Task[Any], Connection] = {}
        self.limits = limits_for(server)
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"{self.settings.node.advertise_host}:{self.port}"

    @property
    def tls_address(self) -> str:
        if self._tls_server is None:
            return ""
        return f"{self.settings.node.advertise_host}:{self.tls_port}"

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        _quiet_amqtt(self.settings.node.log_level)
        try:
            self._server = await asyncio.start_server(
                self._on_connection, self.host, self.port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"MQTT port {self.port} on {self.host} is already in use: stop what uses "
                    "it (another broker?) or pick another port with --mqtt-port (mqtt.port; "
                    '0 = any free), or turn the MQTT edge off with mqtt.mode = "off"'
                ) from None
            raise ListenError(
                f"cannot listen for MQTT on {self.host}:{self.port}: {exc.strerror} "
                "(mqtt.host, --mqtt-port)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        if self.settings.tls.enabled:
            await self._start_tls()
        config = {
            "listeners": {
                LISTENER: {"type": "external", "bind": f"{self.host}:{self.port}"},
            },
            "plugins": {
                f"{RegistryAuthPlugin.__module__}.RegistryAuthPlugin": {},
                f"{TopicAclPlugin.__module__}.TopicAclPlugin": {},
            },
        }
        self.broker = FishchatBroker(config, self)
        for plugin in self.broker.plugins_manager.plugins:
            if isinstance(plugin, RegistryAuthPlugin | TopicAclPlugin):
                plugin.edge = self
        await self.broker.start()
        log.info("MQTT edge (embedded amqtt) listening on %s:%d", self.host, self.port)

    async def _start_tls(self) -> None:
        from fishchat_iot import tls as tlsmod

        t = self.settings.tls
        ctx = tlsmod.server_context(
            tlsmod.paths(self.settings.data_dir / "certs", t.cert, t.key, t.ca)
        )
        try:
            self._tls_server = await asyncio.start_server(
                self._on_tls_connection,
                self.host,
                self.tls_port,
                reuse_address=True,
                backlog=1024,
                ssl=ctx,
                ssl_handshake_timeout=self.connect_timeout,
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen for MQTT over TLS on {self.host}:{self.tls_port}: "
                f"{exc.strerror} (tls.mqtt_port; 0 = any free)"
            ) from None
        self.tls_port = self._tls_server.sockets[0].getsockname()[1]
        log.info("MQTT edge TLS listener on %s:%d", self.host, self.tls_port)

    async def _on_tls_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from fishchat_iot.tls import peer_cn

        peer = writer.get_extra_info("peername")
        key = (peer[0], peer[1]) if peer else ("?", 0)
        cert_id = peer_cn(writer.get_extra_info("peercert"))
        try:
            await self._on_connection(reader, writer, cert_id=cert_id, tls_key=key)
        finally:
            self._tls_conns.pop(key, None)

    async def stop(self) -> None:
        if self._tls_server is not None:
            self._tls_server.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            if conn.session is not None:
                conn.session.drop(errors.UNAVAILABLE, "server shutting down")
            else:
                conn.transport.abort()
        if self._conns:
            _, pending = await asyncio.wait(list(self._conns), timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.shutdown()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._tls_server is not None:
            with contextlib.suppress(Exception):
                await self._tls_server.wait_closed()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connections --------------------------------------------------------------------
    async def _on_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cert_id: str | None = None,
        tls_key: tuple[str, int] | None = None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None and self.broker is not None
        conn = Connection(writer)
        peer = writer.get_extra_info("peername")
        if peer and not self.limits.connection_allowed(str(peer[0]), "mqtt"):
            conn.transport.abort()  # over limits.conn_rate
            return
        conn.cert_id = cert_id
        if tls_key is not None:
            self._tls_conns[tls_key] = conn
        self._conns[task] = conn
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.connect_timer = asyncio.get_running_loop().call_later(
            self.connect_timeout, self._connect_timed_out, conn
        )
        try:
            await self.broker.external_connected(
                ConnectionReader(reader, conn, self.max_packet),
                ConnectionWriter(writer, conn),
                LISTENER,
            )
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.warning("MQTT connection from %s failed: %r", conn.peer, exc)
        finally:
            del self._conns[task]
            if conn.connect_timer is not None:
                conn.connect_timer.cancel()
            if not conn.transport.is_closing():
                conn.transport.abort()
            if conn.session is not None:
                self.server.session_closed(conn.session)

    def _connect_timed_out(self, conn: Connection) -> None:
        conn.connect_timer = None
        if conn.session is None and not conn.transport.is_closing():
            log.warning(
                "MQTT connection from %s: no session within %gs (mqtt.connect_timeout): closing",
                conn.peer,
                self.connect_timeout,
            )
            conn.transport.abort()

    async def authenticate(self, amqtt_session: AmqttSession) -> bool:
        """The auth plugin's check: client id = username = a registered device that is
        not revoked, password = its token."""
        cid = amqtt_session.client_id or ""
        user = amqtt_session.username
        where = f"{amqtt_session.remote_address}:{amqtt_session.remote_port}"
        # A verified client certificate whose CN is the client id stands for user name
        # and password (TLS listener; docs/security.md).
        by_cert = not amqtt_session.password and self._cert_id(amqtt_session) == cid
        if not valid_name(cid) or len(cid) > 64 or (user != cid and not (by_cert and not user)):
            log.warning(
                "MQTT CONNECT from %s refused: client id %r and username %r must both be "
                "the device id",
                where,
                cid[:70],
                (user or "")[:70],
            )
            return False
        addr = str(amqtt_session.remote_address)
        if self.limits.login_blocked(addr, cid) is not None:
            return False  # failed-login throttling (logged by Limits, not too often)
        try:
            rec = await self.manager.device(cid)
        except StoreUnavailable:
            log.warning("MQTT CONNECT of %s refused: registry unavailable", cid)
            return False
        password = amqtt_session.password
        if by_cert and rec is not None:
            pass  # the client certificate's CN is the device id
        elif rec is None or not password or not token_matches(password, rec.token_hash):
            self.limits.login_failed(addr, cid)
            log.warning(
                "MQTT CONNECT of %r from %s refused: unknown device or wrong token", cid, where
            )
            return False
        if rec.revoked:
            log.warning("MQTT CONNECT of %r from %s refused: the device is revoked", cid, where)
            return False
        # amqtt only uses the keepalive as a read timeout it then ignores (defect 2),
        # at the cost of a task per packet read: the session's watchdog uses it instead.
        amqtt_session.attributes[KEEPALIVE] = amqtt_session.keep_alive
        amqtt_session.keep_alive = 0
        return True

    async def open_session(
        self, conn: Connection, amqtt_session: AmqttSession, handler: BrokerProtocolHandler
    ) -> MqttSession | None:
        """After CONNACK: the device's session with the core (a second login checks
        the token again, against a registry that may have changed meanwhile)."""
        device_id = amqtt_session.client_id or ""
        keepalive = int(amqtt_session.attributes.get(KEEPALIVE, amqtt_session.keep_alive))
        s = MqttSession(self, conn, device_id, keepalive)
        password = amqtt_session.password or ""
        cert = not password and conn.cert_id is not None and conn.cert_id == device_id
        failure = await self.server.login(s, device_id, password, cert=cert)
        if failure is not None:
            log.warning("MQTT session of %s refused: %s: %s", device_id, *failure)
            conn.transport.close()
            return None
        if conn.transport.is_closing():
            self.server.session_closed(s)
            return None
        conn.session = s
        if conn.connect_timer is not None:
            conn.connect_timer.cancel()
            conn.connect_timer = None
        handler._puback_waiters = _PubackWaiters(handler._puback_waiters)
        assert self.broker is not None
        for sub_session, qos in self.broker.subscriptions.get(codec.inbox(device_id), ()):
            if sub_session.client_id == device_id:  # a persistent session kept it
                s.subscribed(qos)
        log.info(
            "device %s connected over MQTT from %s (keepalive %ss)",
            device_id,
            conn.peer,
            keepalive,
        )
        return s

    def _cert_id(self, amqtt_session: AmqttSession) -> str | None:
        """The client certificate CN of a CONNECT that came over TLS, else None."""
        key = (str(amqtt_session.remote_address), int(amqtt_session.remote_port or 0))
        conn = self._tls_conns.get(key)
        return conn.cert_id if conn is not None else None

    def subscription_added(self, client_id: str, topic_filter: str, granted: int) -> None:
        if granted == SUBSCRIBE_REFUSED:
            log.warning(
                "MQTT SUBSCRIBE of %s to %r refused: devices subscribe to %s only",
                client_id,
                topic_filter[:150],
                codec.inbox(client_id),
            )
            return
        s = self.server.sessions.get(client_id)
        if isinstance(s, MqttSession) and topic_filter == codec.inbox(client_id):
            s.subscribed(granted)

    def unsubscribed(self, client_id: str, topic_filter: str) -> None:
        s = self.server.sessions.get(client_id)
        if isinstance(s, MqttSession) and topic_filter == codec.inbox(client_id):
            s.unsubscribed()


def _quiet_amqtt(level: str) -> None:
    """amqtt logs every connection at INFO: keep it to warnings unless debugging."""
    for name in _AMQTT_LOGGERS:
        logger = logging.getLogger(name)
        if level != "debug":
            logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _AmqttLevel) for f in logger.filters):
            logger.addFilter(_AmqttLevel())
