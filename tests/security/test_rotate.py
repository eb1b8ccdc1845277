"""``device rotate`` cuts the device's live sessions (TCP and MQTT) like ``device revoke``
does, within 2 s, so the old token stops working at once; the new bundle logs in, and
an SDK device that has it reconnects by itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from support.raw_client import RawClient
from support.server import ServerProcess, cli_env
from support.waiting import eventually

from firmware_sim.tcp_device import TcpDevice
from fishchat_iot import errors

from .conftest import mqtt_connect

LIMIT = 2.0


async def _rotate(server: ServerProcess, device_id: str) -> tuple[float, dict[str, Any]]:
    """Run ``device rotate --json``; returns (monotonic when it returned, its output)."""
    proc = await asyncio.create_subprocess_exec(
        *server.cli_argv("device", "rotate", device_id, "--json"),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return time.monotonic(), json.loads(out)


async def test_rotate_cuts_tcp_and_mqtt_sessions_and_voids_the_old_token(
    up_server_factory: Any, uid: str
) -> None:
    server: ServerProcess = up_server_factory()
    tcp, mqtt, other = f"{uid}-t", f"{uid}-m", f"{uid}-o"
    tok = server.register_many([tcp, mqtt, other])
    plain = await RawClient.connect(server.msg_server)
    await plain.login(tcp, tok[tcp])
    bystander = await RawClient.connect(server.msg_server)
    await bystander.login(other, tok[other])
    mc = await asyncio.to_thread(mqtt_connect, server.ready["mqtt"], mqtt, password=tok[mqtt])
    assert mc.reason is not None and not mc.reason.is_failure
    try:
        done, new_tcp = await _rotate(server, tcp)
        frames = await plain.expect_closed(10)
        latency = time.monotonic() - done
        assert any(f.cmd == "ERROR" and f.args[0] == errors.CREDENTIALS_CHANGED for f in frames), (
            frames
        )
        assert latency < LIMIT, latency
        done, new_mqtt = await _rotate(server, mqtt)
        assert await asyncio.to_thread(mc.disconnected.wait, 10)
        assert mc.disconnected_at - done < LIMIT, mc.disconnected_at - done
        # another device's session is left alone
        await bystander.ping()
    finally:
        await asyncio.to_thread(mc.stop)
        await plain.close()
        await bystander.close()
    # The old tokens are refused, the new ones work (TCP and MQTT).
    again = await RawClient.connect(server.msg_server)
    await again.send("SEND_CLIENT_ID", tcp, tok[tcp])
    await again.expect_error(errors.AUTH_FAILED)
    await again.close()
    m_old = await asyncio.to_thread(
        mqtt_connect, server.ready["mqtt"], mqtt, password=tok[mqtt], timeout=5
    )
    assert m_old.disconnected.is_set() or (m_old.reason is not None and m_old.reason.is_failure)
    await asyncio.to_thread(m_old.stop)
    fresh = await RawClient.connect(server.msg_server)
    await fresh.login(tcp, new_tcp["token"])
    await fresh.ping()
    await asyncio.sleep(2.5)  # past the look-back of the next checks: still not cut
    await fresh.ping()
    await fresh.close()
    m_new = await asyncio.to_thread(
        mqtt_connect, server.ready["mqtt"], mqtt, password=new_mqtt["token"]
    )
    assert m_new.reason is not None and not m_new.reason.is_failure
    assert not m_new.disconnected.is_set()
    await asyncio.to_thread(m_new.stop)


async def test_an_sdk_device_with_the_old_bundle_stops_with_auth_failed(
    up_server_factory: Any, uid: str
) -> None:
    server: ServerProcess = up_server_factory()
    out = json.loads(server.cli("device", "register", f"{uid}-d", "--json").stdout)
    bundle = await asyncio.to_thread(lambda: json.loads(Path(out["bundle"]).read_text()))
    dev = TcpDevice.from_bundle(
        bundle, gateway=server.gateway, msg_server=server.msg_server, backoff_max=0.3
    )
    async with dev:
        await _rotate(server, bundle["id"])
        await eventually(lambda: dev.final_error is not None, "the device stopped", 10)
        assert dev.final_error is not None and dev.final_error.code == errors.AUTH_FAILED
