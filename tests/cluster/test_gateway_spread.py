"""The gateway of the distributed mode spreads devices over the live msg_servers by
load, and stops naming a msg_server within seconds of its death."""

from __future__ import annotations

import asyncio
import collections
import time

from support.cluster import Cluster
from support.raw_client import RawClient, gateway_lookup
from support.redis import free_port

from firmware_sim.tcp_device import TcpDevice


def test_spreads_100_devices_and_forgets_a_dead_node(cluster: Cluster) -> None:
    cluster.expect_errors = True  # a node is killed
    cluster.start()
    ids = [f"dev{i:03d}" for i in range(100)]
    tokens = cluster.register(*ids)
    m0, m1 = cluster.msg_server(0), cluster.msg_server(1)

    async def scenario() -> None:
        devices = [TcpDevice(d, tokens[d], gateway=cluster.gateway) for d in ids]
        try:
            # Ten waves of ten logins: the gateway sees the load it created in between.
            for start in range(0, 100, 10):
                await asyncio.gather(*(d.connect() for d in devices[start : start + 10]))
            spread = collections.Counter(d.address for d in devices)
            assert set(spread) == {m0, m1}, spread
            assert 40 <= spread[m0] <= 60, spread

            cluster["msg_server.19001"].kill9()
            killed = time.monotonic()
            # Until its heartbeat expires (bus.node_ttl: 3 s here) the gateway may still
            # name it; then only the live one.
            while True:
                answers = {await gateway_lookup(cluster.gateway) for _ in range(6)}
                if answers == {m0}:
                    break
                assert time.monotonic() - killed < 10, answers
                await asyncio.sleep(0.2)
            # The devices of the dead node log in again through the gateway, on m0.
            deadline = time.monotonic() + 30
            while not all(d.connected and d.address == m0 for d in devices):
                assert time.monotonic() < deadline, collections.Counter(
                    d.address for d in devices if d.connected
                )
                await asyncio.sleep(0.2)
        finally:
            await asyncio.gather(*(d.close() for d in devices))

    asyncio.run(scenario())


def test_tls_askers_get_a_msg_server_that_listens_with_tls(cluster: Cluster) -> None:
    """Only msg_server.19001 has TLS on: the gateway names it to every device asking for
    TLS (REQ_MSG_SERVER ["tls"]), with its TLS listener; plain askers a plain one."""
    node = "msg_server.19001"
    cluster.cli("certs", "init", role=node)
    cluster.cli("certs", "issue", "server", role=node)
    tls_port = free_port()
    cluster[node].env.update(FISHCHAT_TLS_ENABLED="true", FISHCHAT_TLS_MSG_PORT=str(tls_port))
    cluster.start("gateway", "msg_server.19000", node)
    assert cluster[node].ready["msg_server_tls"] == f"127.0.0.1:{tls_port}"

    async def ask(tls: bool) -> str:
        async with await RawClient.connect(cluster.gateway) as gw:
            if tls:
                await gw.send("REQ_MSG_SERVER", "tls")
            else:
                await gw.send("REQ_MSG_SERVER", newline=False)
            [addr] = await gw.expect("SELECT_MSG_SERVER_FOR_CLIENT")
            return addr

    async def scenario() -> None:
        assert {await ask(True) for _ in range(6)} == {f"127.0.0.1:{tls_port}"}
        # Plain askers get plain listeners (which one is the load's business).
        plain = {await ask(False) for _ in range(6)}
        assert plain and plain <= {cluster.msg_server(0), cluster.msg_server(1)}

    asyncio.run(scenario())
