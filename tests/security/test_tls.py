"""TLS listeners (TCP and MQTT) and device certificates: a device with a certificate
from the project's CA logs in by it; self-signed, expired and not-registered ones are
refused; a plain client on the TLS port gets nothing."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import pytest
from support.raw_client import RawClient
from support.server import ServerProcess

from fishchat_iot import errors

from .conftest import (
    certs_dir,
    device_cert,
    mqtt_connect,
    rogue_cert,
    tls_connect,
)


async def _refused_tls(server: ServerProcess, cert: tuple[Path, Path], device_id: str) -> None:
    """No session: the handshake fails (now or at the first read) or the login is
    refused; never a LOGIN_OK."""
    try:
        client = await tls_connect(server, cert)
    except (ssl.SSLError, OSError):
        return
    try:
        await client.send("SEND_CLIENT_ID", device_id)
        frames = await client.expect_closed(5)
    except (ssl.SSLError, OSError):
        return
    finally:
        await client.close()
    assert all(f.cmd != "LOGIN_OK" for f in frames), frames


def test_certs_cli_files(tls_server: ServerProcess, uid: str) -> None:
    d = certs_dir(tls_server)
    for key in ("ca.key", "server.key"):
        assert (d / key).stat().st_mode & 0o777 == 0o600, key
    tls_server.register(uid)
    out = tls_server.cli("--json", "certs", "issue", "device", uid)
    doc = json.loads(out.stdout)
    assert doc["cn"] == uid and os.stat(doc["key"]).st_mode & 0o777 == 0o600
    # Only for registered devices; the CA is not replaced by accident.
    bad = tls_server.cli("certs", "issue", "device", f"{uid}-ghost", check=False)
    assert bad.returncode != 0 and "register it first" in bad.stderr
    again = tls_server.cli("certs", "init", check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    assert "msg_server_tls" in tls_server.ready and "mqtt_tls" in tls_server.ready


async def test_certificate_login_tcp(tls_server: ServerProcess, uid: str) -> None:
    a, b = f"{uid}-a", f"{uid}-b"
    tok = tls_server.register_many([a, b])
    cert = device_cert(tls_server, a)
    dev_a = await tls_connect(tls_server, cert)
    try:
        await dev_a.send("SEND_CLIENT_ID", a)
        assert await dev_a.expect("LOGIN_OK") == [a]
        dev_a.device_id = a
        # A token device without a certificate over TLS, too.
        dev_b = await tls_connect(tls_server, None)
        await dev_b.login(b, tok[b])
        await dev_a.send_p2p(b, "over tls", "m1")
        assert await dev_a.expect("ACCEPTED") == ["m1"]
        args = await dev_b.expect("RESP_MESSAGE_P2P")
        assert args[:3] == ["over tls", a, "m1"]
        await dev_b.close()
    finally:
        await dev_a.close()
    # A certificate for a but a login as b is a token-less (v1) login: refused.
    await _refused_tls(tls_server, cert, b)


async def test_bad_certificates_refused(
    tls_server: ServerProcess, uid: str, tmp_path: Path
) -> None:
    dev, ghost = f"{uid}-d", f"{uid}-ghost"
    tls_server.register(dev)
    mark = tls_server.log_mark()
    selfsigned = rogue_cert(tls_server, dev, tmp_path / "s", self_signed=True)
    expired = rogue_cert(tls_server, dev, tmp_path / "e", expired=True)
    unregistered = rogue_cert(tls_server, ghost, tmp_path / "g")
    await _refused_tls(tls_server, selfsigned, dev)
    await _refused_tls(tls_server, expired, dev)
    client = await tls_connect(tls_server, unregistered)
    await client.send("SEND_CLIENT_ID", ghost)
    await client.expect_error(errors.AUTH_FAILED)
    await client.close()
    # MQTT: the same certificates get no session.
    ca = certs_dir(tls_server) / "ca.pem"
    addr = tls_server.ready["mqtt_tls"]
    for cert, cid in ((selfsigned, dev), (expired, dev), (unregistered, ghost)):
        mc = await asyncio.to_thread(mqtt_connect, addr, cid, ca=ca, cert=cert, timeout=5)
        assert mc.disconnected.is_set() or (mc.reason is not None and mc.reason.is_failure), cid
        await asyncio.to_thread(mc.stop)
    assert tls_server.log_since(mark)  # refusals are logged
    tls_server.assert_healthy()


async def test_plain_client_on_tls_port_gets_nothing(tls_server: ServerProcess) -> None:
    client = await RawClient.connect(tls_server.ready["msg_server_tls"])
    await client.send("SEND_CLIENT_ID", "someone", "token")
    frames = await client.expect_closed(15)
    assert frames == [] and client.received == []
    await client.close()


async def test_certificate_login_mqtt(tls_server: ServerProcess, uid: str) -> None:
    a, b = f"{uid}-a", f"{uid}-b"
    tok = tls_server.register_many([a, b])
    cert = device_cert(tls_server, a)
    ca = certs_dir(tls_server) / "ca.pem"
    mc = await asyncio.to_thread(mqtt_connect, tls_server.ready["mqtt_tls"], a, ca=ca, cert=cert)
    try:
        assert mc.reason is not None and not mc.reason.is_failure, mc.reason
        # b, over plain TCP with its token, sends to a on MQTT over TLS.
        dev_b = await RawClient.connect(tls_server.msg_server)
        await dev_b.login(b, tok[b])
        for _ in range(50):  # the SUBSCRIBE is asynchronous
            if tls_server.log_since(0).count(f"device {a} connected over MQTT"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await dev_b.send_p2p(a, "to mqtt over tls", "m1")
        await dev_b.expect("ACCEPTED")
        for _ in range(100):
            if mc.messages:
                break
            await asyncio.sleep(0.05)
        assert mc.messages and b"to mqtt over tls" in mc.messages[0]
        await dev_b.close()
    finally:
        await asyncio.to_thread(mc.stop)


@pytest.mark.parametrize("missing", ["server.pem"])
def test_up_without_certificates_says_what_to_do(
    up_server_factory: object, tmp_path: Path, missing: str
) -> None:
    from .conftest import TLS_CONFIG

    server = up_server_factory(config=TLS_CONFIG, start=False)  # type: ignore[operator]
    with pytest.raises(Exception) as exc:
        server.start(timeout=15)
    assert "certs init" in str(exc.value)
