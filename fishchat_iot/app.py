"""The embedded deployment: every role in one asyncio process (``fishchat-iot up``) —
gateway and msg_server TCP listeners, the MQTT edge (embedded broker or external-broker
client), router, manager, the in-process bus and the SQLite store — plus the status file
that ``fishchat-iot status`` reads.

The same class is the msg_server process of the distributed mode (``fishchat-iot run
msg-server``): the bus and store from ``[bus]``/``[store]`` (Redis, MongoDB), no gateway
listener (``gateway=False``), the monitor off, and the node acting on the cluster's
revoke and kick events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from typing import Any, Protocol

from device_adapters.tcp.gateway import GatewayConnection
from device_adapters.tcp.listener import TcpListener
from device_adapters.tcp.session import TcpSession
from fishchat_iot import __version__
from fishchat_iot.backends import (
    describe_bus,
    describe_store,
    make_bus,
    make_store,
    open_with_retry,
)
from fishchat_iot.config import Settings
from fishchat_iot.crypto.atrest import AtRest, SealedStore, load_server_key
from fishchat_iot.files import PUBLIC, write_atomic
from fishchat_iot.roles.gateway import Gateway
from fishchat_iot.roles.manager import Manager, now_ms
from fishchat_iot.roles.msg_server import MsgServer
from fishchat_iot.roles.router import Router

log = logging.getLogger("fishchat.app")

STATUS_FILE = "status.json"
STATUS_PERIOD = 2.0


class MqttEdge(Protocol):
    """The MQTT adapter in either mode (device_adapters/mqtt)."""

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class EmbeddedApp:
    """Start with ``await app.start()``, stop with ``await app.stop()``."""

    def __init__(self, settings: Settings, gateway: bool = True) -> None:
        self.settings = settings
        self.store = make_store(settings)
        # Queued bodies not sealed end to end are sealed at rest under the server key
        # (fishchat_iot/crypto/atrest.py); live deliveries never go through it.
        self.sealed = SealedStore(self.store)
        queues = self.sealed.as_store()
        self.bus = make_bus(settings)
        self.manager = Manager(
            queues, settings.delivery.offline_max_age, purge=settings.store.backend == "sqlite"
        )
        self.router = Router(self.bus, queues, settings.delivery.offline_max)
        self.gateway = Gateway(self.bus)
        tcp = settings.tcp
        self.msg_listener = TcpListener(
            "msg_server", "--msg-port", self._msg_session, tcp.host, tcp.msg_port
        )
        self.gateway_listener: TcpListener | None = None
        if gateway:
            self.gateway_listener = TcpListener(
                "gateway",
                "--gateway-port",
                lambda lst: GatewayConnection(lst, self.gateway, tcp.login_timeout),
                tcp.host,
                tcp.gateway_port,
            )
        # TLS (docs/security.md): the msg_server listener again, with TLS; MQTT's is the
        # embedded broker's (device_adapters/mqtt/broker.py). Built in start().
        self.tls_context: ssl.SSLContext | None = None
        self.tls_listener: TcpListener | None = None
        self.msg_server: MsgServer | None = None
        self.mqtt: MqttEdge | None = None  # mqtt.mode "embedded" or "external"
        self.serial: Any = None  # the serial adapter, when [serial] lists ports
        self.monitor: Any = None  # roles/monitor.py, when [monitor] enabled (and it bound)
        self._status_task: asyncio.Task[None] | None = None
        self.started_ms = now_ms()

    def _msg_session(self, listener: TcpListener) -> TcpSession:
        assert self.msg_server is not None
        return TcpSession(listener, self.msg_server)

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.sealed.atrest = AtRest(load_server_key(self.settings.server_key_path))
        await open_with_retry(self.store.open, describe_store(self.settings))
        try:
            await open_with_retry(self.bus.open, describe_bus(self.settings))
            await self.manager.start()
            # Bind first, so a port of 0 is known before the node announces itself.
            await self.msg_listener.start()
            address = f"{self.settings.node.advertise_host}:{self.msg_listener.port}"
            node_id = self.settings.node.id or f"msg_server@{address}"
            self.msg_server = MsgServer(
                self.settings, self.bus, self.manager, self.router, node_id, address
            )
            if self.settings.bus.backend != "local":
                from fishchat_iot.roles.monitor_cluster import attach_cluster_reporting

                attach_cluster_reporting(self.msg_server, self.bus)
            await self.msg_server.start()
            self.bus.on_event(self.msg_server.on_event)
            await self._start_tls()
            if self.gateway_listener is not None:
                await self.gateway_listener.start()
            await self._start_mqtt(self.msg_server)
            await self._start_serial()
            await self._start_monitor()
        except BaseException:
            await self.stop()
            raise
        self._status_task = asyncio.get_running_loop().create_task(self._write_status_forever())
        # Once everything is up (a failed start says only what failed, in one line).
        plain = [f"msg_server {self.msg_listener.address}"]
        if self.settings.mqtt.mode == "embedded":
            plain.append(f"MQTT {self.settings.mqtt.host}:{getattr(self.mqtt, 'port', '?')}")
        log.warning(
            "plain listeners (unencrypted TCP, for development): %s; devices on a network "
            "should use TLS (tls.enabled, docs/security.md)",
            ", ".join(plain),
        )

    async def _start_tls(self) -> None:
        """The TLS msg_server listener (tls.enabled); TlsError if its files are wrong."""
        t = self.settings.tls
        if not t.enabled:
            return
        from fishchat_iot import tls as tlsmod

        self.tls_context = tlsmod.server_context(
            tlsmod.paths(self.settings.data_dir / "certs", t.cert, t.key, t.ca)
        )
        self.tls_listener = TcpListener(
            "msg_server TLS",
            "tls.msg_port",
            self._msg_session,
            self.settings.tcp.host,
            t.msg_port,
            tls=self.tls_context,
            handshake_timeout=self.settings.tcp.login_timeout,
        )
        await self.tls_listener.start()
        assert self.msg_server is not None
        host = self.settings.node.advertise_host
        self.msg_server.tls_address = f"{host}:{self.tls_listener.port}"
        await self.msg_server.heartbeat()  # the gateway names it to TLS askers from now on
        log.info("msg_server TLS listener on %s", self.tls_listener.address)

    async def _start_mqtt(self, msg_server: MsgServer) -> None:
        # Imported here: amqtt and paho are heavy, and not needed with mqtt.mode = "off".
        mode = self.settings.mqtt.mode
        if mode == "embedded":
            from device_adapters.mqtt.broker import EmbeddedMqtt

            self.mqtt = EmbeddedMqtt(self.settings, msg_server, self.manager)
        elif mode == "external":
            from device_adapters.mqtt.external import ExternalMqtt

            self.mqtt = ExternalMqtt(self.settings, msg_server, self.manager)
        else:
            return
        await self.mqtt.start()

    async def _start_serial(self) -> None:
        """The serial adapter in this process, for the ports of [serial] (docs/serial.md);
        ports that name no upstream use this msg_server. ConfigError if a port is wrong."""
        if not self.settings.serial.ports:
            return
        from device_adapters.serial.adapter import SerialAdapter

        host = self.settings.tcp.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        self.serial = SerialAdapter(self.settings.serial, f"{host}:{self.msg_listener.port}")
        await self.serial.start()

    async def _start_monitor(self) -> None:
        """The dashboard, API and /metrics (docs/monitor.md). A port that cannot be bound
        is a warning, not a failure: messaging does not stop for its observer."""
        if not self.settings.monitor.enabled:
            return
        from fishchat_iot.roles.monitor import Monitor

        monitor = Monitor(self)
        try:
            await monitor.start()
        except OSError as exc:
            m = self.settings.monitor
            log.warning(
                "monitor not started: cannot listen on %s:%s (%s); set [monitor] port "
                "(or up --monitor-port, 0 = any free port)",
                m.host,
                m.port,
                exc.strerror or exc,
            )
            return
        self.monitor = monitor

    def listeners(self) -> dict[str, str]:
        host = self.settings.node.advertise_host
        addrs = {}
        if self.gateway_listener is not None:
            addrs["gateway"] = f"{host}:{self.gateway_listener.port}"
        addrs["msg_server"] = f"{host}:{self.msg_listener.port}"
        if self.tls_listener is not None:
            addrs["msg_server_tls"] = f"{host}:{self.tls_listener.port}"
        if self.mqtt is not None:
            addrs["mqtt"] = self.mqtt.address
            tls_address = getattr(self.mqtt, "tls_address", None)
            if tls_address:
                addrs["mqtt_tls"] = tls_address
        if self.monitor is not None:
            addrs["monitor"] = self.monitor.address
            if self.monitor.metrics_address:
                addrs["metrics"] = self.monitor.metrics_address
        return addrs

    async def stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        if self.serial is not None:
            await self.serial.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.gateway_listener is not None:
            await self.gateway_listener.stop()
        if self.tls_listener is not None:
            await self.tls_listener.stop()
        await self.msg_listener.stop()
        if self.msg_server is not None:
            await self.msg_server.stop()
            from fishchat_iot.roles.monitor_cluster import detach_cluster_reporting

            detach_cluster_reporting(self.msg_server)
        await self.manager.stop()
        await self.bus.close()
        await self.store.close()
        with contextlib.suppress(OSError):
            (self.settings.data_dir / STATUS_FILE).unlink()

    def status(self) -> dict[str, Any]:
        nodes = []
        if self.msg_server is not None:
            info = self.msg_server.node_info()
            nodes.append(
                {
                    "node_id": info.node_id,
                    "role": info.role,
                    "address": info.address,
                    "sessions": info.sessions,
                    "msgs_in": info.msgs_in,
                    "msgs_out": info.msgs_out,
                }
            )
        return {
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "updated_ms": now_ms(),
            "version": __version__,
            "listeners": self.listeners(),
            "nodes": nodes,
        }

    async def _write_status_forever(self) -> None:
        path = self.settings.data_dir / STATUS_FILE
        while True:
            try:
                await asyncio.to_thread(write_atomic, path, json.dumps(self.status()), PUBLIC)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
            await asyncio.sleep(STATUS_PERIOD)
