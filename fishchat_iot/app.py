"""The embedded deployment: every role in one asyncio process (``fishchat-iot up``) —
gateway and msg_server TCP listeners, the MQTT edge (embedded broker or external-broker
client), router, manager, the in-process bus and the SQLite store — plus the status file
that ``fishchat-iot status`` reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from device_adapters.tcp.gateway import GatewayConnection
from device_adapters.tcp.listener import TcpListener
from device_adapters.tcp.session import TcpSession
from fishchat_iot import __version__
from fishchat_iot.bus.local import LocalBus
from fishchat_iot.config import Settings
from fishchat_iot.roles.gateway import Gateway
from fishchat_iot.roles.manager import Manager, now_ms
from fishchat_iot.roles.msg_server import MsgServer
from fishchat_iot.roles.router import Router
from fishchat_iot.stores.sqlite import SqliteStore

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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SqliteStore(settings.sqlite_path, settings.store.queue_max)
        self.bus = LocalBus()
        self.manager = Manager(self.store, settings.delivery.offline_max_age)
        self.router = Router(self.bus, self.store, settings.delivery.offline_max)
        self.gateway = Gateway(self.bus)
        tcp = settings.tcp
        self.msg_listener = TcpListener(
            "msg_server", "--msg-port", self._msg_session, tcp.host, tcp.msg_port
        )
        self.gateway_listener = TcpListener(
            "gateway",
            "--gateway-port",
            lambda lst: GatewayConnection(lst, self.gateway, tcp.login_timeout),
            tcp.host,
            tcp.gateway_port,
        )
        self.msg_server: MsgServer | None = None
        self.mqtt: MqttEdge | None = None  # mqtt.mode "embedded" or "external"
        self.serial: Any = None  # the serial adapter, when [serial] lists ports
        self._status_task: asyncio.Task[None] | None = None
        self.started_ms = now_ms()

    def _msg_session(self, listener: TcpListener) -> TcpSession:
        assert self.msg_server is not None
        return TcpSession(listener, self.msg_server)

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        try:
            await self.bus.open()
            await self.manager.start()
            # Bind first, so a port of 0 is known before the node announces itself.
            await self.msg_listener.start()
            address = f"{self.settings.node.advertise_host}:{self.msg_listener.port}"
            node_id = self.settings.node.id or f"msg_server@{address}"
            self.msg_server = MsgServer(
                self.settings, self.bus, self.manager, self.router, node_id, address
            )
            await self.msg_server.start()
            await self.gateway_listener.start()
            await self._start_mqtt(self.msg_server)
            await self._start_serial()
        except BaseException:
            await self.stop()
            raise
        self._status_task = asyncio.get_running_loop().create_task(self._write_status_forever())

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

    def listeners(self) -> dict[str, str]:
        host = self.settings.node.advertise_host
        addrs = {
            "gateway": f"{host}:{self.gateway_listener.port}",
            "msg_server": f"{host}:{self.msg_listener.port}",
        }
        if self.mqtt is not None:
            addrs["mqtt"] = self.mqtt.address
        return addrs

    async def stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        if self.serial is not None:
            await self.serial.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await self.gateway_listener.stop()
        await self.msg_listener.stop()
        if self.msg_server is not None:
            await self.msg_server.stop()
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
                await asyncio.to_thread(_write_atomic, path, json.dumps(self.status()))
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
            await asyncio.sleep(STATUS_PERIOD)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
