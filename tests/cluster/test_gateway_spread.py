"""The gateway of the distributed mode spreads devices over the live msg_servers by
load, and stops naming a msg_server within seconds of its death."""

from __future__ import annotations

import asyncio
import collections
import time

from support.cluster import Cluster
from support.raw_client import gateway_lookup

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
