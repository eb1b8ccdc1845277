"""``device revoke`` cuts the device's live sessions on every transport within 2 s (the
store's change polling tells the manager) and refuses its token and certificate after."""

from __future__ import annotations

import asyncio
import subprocess
import time

from support.raw_client import RawClient
from support.server import ServerProcess, cli_env

from fishchat_iot import errors

from .conftest import certs_dir, device_cert, mqtt_connect, tls_connect

LIMIT = 2.0


async def _revoke(server: ServerProcess, device_id: str) -> tuple[float, float]:
    """Run ``device revoke``; returns (monotonic before it started, after it returned)."""
    before = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *server.cli_argv("device", "revoke", device_id),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    return before, time.monotonic()


async def _closed_at(client: RawClient, timeout: float = 10.0) -> float:
    frames = await client.expect_closed(timeout)
    assert any(f.cmd == "ERROR" and f.args[0] == errors.REVOKED for f in frames), frames
    return time.monotonic()


async def test_revoke_cuts_tcp_and_mqtt_within_2s(tls_server: ServerProcess, uid: str) -> None:
    tcp_tok, tcp_cert, mq_tok, mq_cert = (f"{uid}-{x}" for x in ("tt", "tc", "mt", "mc"))
    tok = tls_server.register_many([tcp_tok, tcp_cert, mq_tok, mq_cert])
    certs = {d: device_cert(tls_server, d) for d in (tcp_cert, mq_cert)}
    ca = certs_dir(tls_server) / "ca.pem"
    plain = await RawClient.connect(tls_server.msg_server)
    await plain.login(tcp_tok, tok[tcp_tok])
    viacert = await tls_connect(tls_server, certs[tcp_cert])
    await viacert.send("SEND_CLIENT_ID", tcp_cert)
    await viacert.expect("LOGIN_OK")
    m_tok = await asyncio.to_thread(
        mqtt_connect, tls_server.ready["mqtt"], mq_tok, password=tok[mq_tok]
    )
    m_cert = await asyncio.to_thread(
        mqtt_connect, tls_server.ready["mqtt_tls"], mq_cert, ca=ca, cert=certs[mq_cert]
    )
    assert not m_tok.disconnected.is_set() and not m_cert.disconnected.is_set()
    latencies: dict[str, float] = {}  # from the CLI's return (the revocation committed)
    totals: dict[str, float] = {}  # from the CLI's start (includes its ~0.5 s start-up)
    try:
        for dev, client in ((tcp_tok, plain), (tcp_cert, viacert)):
            start, done = await _revoke(tls_server, dev)
            closed = await _closed_at(client)
            latencies[dev], totals[dev] = closed - done, closed - start
            assert latencies[dev] < LIMIT, (dev, latencies[dev], start)
        for dev, mc in ((mq_tok, m_tok), (mq_cert, m_cert)):
            start, done = await _revoke(tls_server, dev)
            assert await asyncio.to_thread(mc.disconnected.wait, 10), dev
            latencies[dev] = mc.disconnected_at - done
            totals[dev] = mc.disconnected_at - start
            assert latencies[dev] < LIMIT, (dev, latencies[dev])
    finally:
        for c in (m_tok, m_cert):
            await asyncio.to_thread(c.stop)
        await plain.close()
        await viacert.close()
    print("revocation latency (s) after the CLI returned:", latencies, "from its start:", totals)
    # The next logins are refused: token and certificate, TCP and MQTT.
    again = await RawClient.connect(tls_server.msg_server)
    await again.send("SEND_CLIENT_ID", tcp_tok, tok[tcp_tok])
    await again.expect_error(errors.REVOKED)
    await again.close()
    again = await tls_connect(tls_server, certs[tcp_cert])
    await again.send("SEND_CLIENT_ID", tcp_cert)
    await again.expect_error(errors.REVOKED)
    await again.close()
    m1 = await asyncio.to_thread(
        mqtt_connect, tls_server.ready["mqtt"], mq_tok, password=tok[mq_tok], timeout=5
    )
    m2 = await asyncio.to_thread(
        mqtt_connect, tls_server.ready["mqtt_tls"], mq_cert, ca=ca, cert=certs[mq_cert], timeout=5
    )
    for mc in (m1, m2):
        assert mc.disconnected.is_set() or (mc.reason is not None and mc.reason.is_failure)
        await asyncio.to_thread(mc.stop)
