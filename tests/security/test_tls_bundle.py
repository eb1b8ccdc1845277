"""With TLS set up, bundles carry the CA certificate and the TLS addresses, and the
gateway answers a device that asks for TLS (``REQ_MSG_SERVER ["tls"]``) with the TLS
msg_server; v1's ``REQ_MSG_SERVER []`` is answered as before."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

from support.raw_client import RawClient, gateway_lookup, split_addr
from support.server import ServerProcess

from fishchat_iot import errors

from .conftest import certs_dir


def read_text(path: str | Path) -> str:
    return Path(path).read_text()


async def test_bundle_has_the_ca_and_the_gateway_names_the_tls_msg_server(
    tls_server: ServerProcess, uid: str
) -> None:
    out = json.loads(tls_server.cli("device", "register", f"{uid}-d", "--json").stdout)
    bundle: dict[str, Any] = json.loads(await asyncio.to_thread(read_text, out["bundle"]))
    ca = await asyncio.to_thread(read_text, certs_dir(tls_server) / "ca.pem")
    assert bundle["ca"] == ca and "BEGIN CERTIFICATE" in ca
    # this server's TLS ports are 0 (picked at start): no address to write down
    assert "msg_server_tls" not in bundle and "mqtt_tls" not in bundle
    # the gateway: ["tls"] -> the TLS listener, [] -> the plain one (v1)
    async with await RawClient.connect(tls_server.gateway, "gateway") as gw:
        await gw.send("REQ_MSG_SERVER", "tls")
        (addr,) = await gw.expect("SELECT_MSG_SERVER_FOR_CLIENT")
        assert await gw.expect_closed() == []
    assert addr == tls_server.ready["msg_server_tls"]
    assert await gateway_lookup(tls_server.gateway) == tls_server.msg_server
    # a device that trusts only the bundle's CA logs in there
    host, port = split_addr(addr)
    ctx = ssl.create_default_context(cadata=bundle["ca"])
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    async with RawClient(reader, writer) as c:
        await c.login(bundle["id"], bundle["token"])


async def test_without_tls_the_gateway_does_not_downgrade(up_server_factory: Any, uid: str) -> None:
    server: ServerProcess = up_server_factory()
    out = json.loads(server.cli("device", "register", f"{uid}-d", "--json").stdout)
    bundle: dict[str, Any] = json.loads(await asyncio.to_thread(read_text, out["bundle"]))
    assert "ca" not in bundle and "msg_server_tls" not in bundle
    async with await RawClient.connect(server.gateway, "gateway") as gw:
        await gw.send("REQ_MSG_SERVER", "tls")
        await gw.expect_error(errors.UNAVAILABLE)
    assert await gateway_lookup(server.gateway) == server.msg_server


async def test_sdk_device_uses_tls_from_its_bundle(tls_server: ServerProcess, uid: str) -> None:
    from firmware_sim.tcp_device import CONNECT_FAILED, DeviceError, TcpDevice

    bundles = []
    for n in "ab":
        out = json.loads(tls_server.cli("device", "register", f"{uid}-{n}", "--json").stdout)
        bundles.append(json.loads(await asyncio.to_thread(read_text, out["bundle"])))
    ba, bb = bundles
    # over the gateway: it names the TLS listener, the device checks it against the CA
    a = TcpDevice.from_bundle(ba, gateway=tls_server.gateway, tls=True)
    b = TcpDevice.from_bundle(
        bb, gateway=[], msg_server=tls_server.ready["msg_server_tls"], tls=True
    )
    async with a, b:
        assert a.address == b.address == tls_server.ready["msg_server_tls"]
        await a.send(bb["id"], "over TLS")
        msg = await b.receive(timeout=10)
        assert (msg.sender, msg.text) == (ba["id"], "over TLS")
    # a CA that did not sign the server's certificate: no session
    other = dict(ba, ca=_another_ca())
    dev = TcpDevice.from_bundle(
        other, gateway=[], msg_server=tls_server.ready["msg_server_tls"], tls=True, reconnect=False
    )
    try:
        await dev.connect()
        raise AssertionError("connected with a CA that did not sign the server certificate")
    except DeviceError as exc:
        assert exc.code == CONNECT_FAILED and "certificate verify failed" in exc.text, exc
    finally:
        await dev.close()


def test_bundle_tls_entries_with_fixed_ports(tmp_path: Path) -> None:
    from fishchat_iot import tls as tlsmod
    from fishchat_iot.bundle import new_bundle
    from fishchat_iot.config import load_settings

    settings = load_settings(
        overrides={"node.data_dir": str(tmp_path), "tls.enabled": True, "tls.msg_port": 19443}
    )
    b = new_bundle("d", "tok", settings, v1=False, created_ms=1)
    assert "ca" not in b  # no CA yet
    assert b["msg_server_tls"] == ["127.0.0.1:19443"] and b["mqtt_tls"] == ["127.0.0.1:8883"]
    tlsmod.create_ca(tlsmod.paths(tmp_path / "certs"))
    b = new_bundle("d", "tok", settings, v1=False, created_ms=1)
    assert b["ca"] == (tmp_path / "certs" / "ca.pem").read_text()
    off = load_settings(overrides={"node.data_dir": str(tmp_path)})
    assert not {"ca", "msg_server_tls", "mqtt_tls"} & set(
        new_bundle("d", "t", off, v1=False, created_ms=1)
    )


def _another_ca() -> str:
    import tempfile

    from fishchat_iot import tls as tlsmod

    with tempfile.TemporaryDirectory() as d:
        p = tlsmod.paths(Path(d))
        tlsmod.create_ca(p, name="Not FishChat")
        return p.ca_cert.read_text()
