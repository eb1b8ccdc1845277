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
    assert "msg_server_tls" in bundle and "mqtt_tls" in bundle
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
