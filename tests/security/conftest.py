"""A TLS-enabled ``up`` (CA, server certificate, device certificates made with the
``certs`` commands) and small TLS clients: raw TCP frames over TLS and paho MQTT."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from support.raw_client import RawClient, split_addr
from support.server import ServerProcess

from fishchat_iot import tls

TLS_CONFIG: dict[str, dict[str, Any]] = {"tls": {"enabled": True, "msg_port": 0, "mqtt_port": 0}}


def make_tls_server(root: Path, config: dict[str, dict[str, Any]] | None = None) -> ServerProcess:
    cfg = {**TLS_CONFIG, **(config or {})}
    server = ServerProcess(root, config=cfg)
    server.cli("certs", "init")
    server.cli("certs", "issue", "server", "--host", "127.0.0.1", "--host", "localhost")
    server.start()
    return server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = make_tls_server(tmp_path_factory.mktemp("tls"))
    yield server
    finish(server)


def finish(server: ServerProcess) -> None:
    """As the root conftest's teardown: healthy, and a graceful stop."""
    if not server.running:
        server.stop()
        return
    try:
        server.assert_healthy()
    finally:
        code = server.stop()
    assert code == 0, f"fishchat-iot up exited {code} on SIGTERM:\n{server.log_tail()}"


def certs_dir(server: ServerProcess) -> Path:
    return server.data_dir / "certs"


def device_cert(server: ServerProcess, device_id: str) -> tuple[Path, Path]:
    """Issue a device certificate with the CLI; returns (cert, key)."""
    server.cli("certs", "issue", "device", device_id)
    d = certs_dir(server) / "devices"
    return d / f"{device_id}.pem", d / f"{device_id}.key"


def rogue_cert(
    server: ServerProcess,
    cn: str,
    out: Path,
    *,
    self_signed: bool = False,
    expired: bool = False,
) -> tuple[Path, Path]:
    """A certificate the CLI would not issue: from another CA, expired, or for a CN
    that is not a registered device."""
    out.mkdir(parents=True, exist_ok=True)
    if self_signed:
        p = tls.paths(out / "otherca")
        tls.create_ca(p, "Not The FishChat CA")
    else:
        p = tls.paths(certs_dir(server))
    start = None
    days = 30
    if expired:
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=60)
    cert, key = tls.issue(p, cn, server=False, not_before=start, days=days)
    cert_path, key_path = out / f"{cn}.pem", out / f"{cn}.key"
    tls.write_pair(cert, key, cert_path, key_path)
    return cert_path, key_path


def client_context(server: ServerProcess, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs_dir(server) / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(cert[0], cert[1])
    return ctx


async def tls_connect(
    server: ServerProcess, cert: tuple[Path, Path] | None = None, timeout: float = 10.0
) -> RawClient:
    host, port = split_addr(server.ready["msg_server_tls"])
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=client_context(server, cert), server_hostname=host, limit=1 << 22
        ),
        timeout,
    )
    if writer.get_extra_info("sockname") is None:  # refused during the handshake
        writer.close()
        raise ConnectionResetError("TLS connection closed by the server during the handshake")
    client = RawClient(reader, writer)
    client.msg_server_addr = server.ready["msg_server_tls"]
    return client


@dataclass
class MqttClient:
    """A paho client in its own network thread, recording what happens to it."""

    client: paho.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason: Any = None
    disconnected_at: float = 0.0
    messages: list[bytes] = field(default_factory=list)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def mqtt_connect(
    addr: str,
    client_id: str,
    *,
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
    password: str | None = None,
    timeout: float = 10.0,
    bind: str = "",
) -> MqttClient:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    mc = MqttClient(c)
    if password is not None:
        c.username_pw_set(client_id, password)
    if ca is not None:
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            ctx.load_cert_chain(cert[0], cert[1])
        c.tls_set_context(ctx)

    def on_connect(cl: Any, ud: Any, flags: Any, reason: Any, props: Any = None) -> None:
        mc.reason = reason
        if not reason.is_failure:
            cl.subscribe(f"fc/{client_id}/in", qos=1)
        mc.connected.set()

    def on_disconnect(cl: Any, ud: Any, flags: Any, reason: Any, props: Any = None) -> None:
        mc.disconnected_at = time.monotonic()
        mc.disconnected.set()
        mc.connected.set()

    def on_message(cl: Any, ud: Any, msg: Any) -> None:
        mc.messages.append(msg.payload)

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_message = on_message
    host, port = split_addr(addr)
    c.reconnect_delay_set(60, 120)  # a cut session must stay cut for the test
    try:
        c.connect(host, port, keepalive=30, bind_address=bind)
    except (ssl.SSLError, OSError):
        mc.disconnected.set()
        mc.connected.set()
        return mc
    c.loop_start()
    mc.connected.wait(timeout)
    return mc
