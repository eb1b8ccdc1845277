"""A msg_server killed with SIGKILL in the middle of a stream loses no accepted message:
what it had accepted is in its inbox (taken over by the router) or was never
ACCEPTED (the sender resends after logging in again through the gateway), and the
devices' dedupe absorbs what arrives twice."""

from __future__ import annotations

import asyncio
import collections

from support.cluster import Cluster, Key, collect, delivered_once, stream

from firmware_sim.tcp_device import TcpDevice

PER_PAIR = 300


def test_kill9_a_msg_server_mid_stream(cluster: Cluster) -> None:
    cluster.expect_errors = True  # a node is killed
    cluster.start()
    names = ["s0", "s1", "r0", "r1"]
    tokens = cluster.register(*names)

    async def scenario() -> None:
        devs = {
            n: TcpDevice(n, tokens[n], gateway=cluster.gateway, max_inflight=50, backoff_max=1.0)
            for n in names
        }
        got: collections.Counter[Key] = collections.Counter()
        readers = []
        try:
            for n in names:  # one at a time: the gateway alternates the two nodes
                await devs[n].connect()
            placed = collections.Counter(d.address for d in devs.values())
            assert sorted(placed.values()) == [2, 2], placed
            readers = [asyncio.create_task(collect(devs[r], got)) for r in ("r0", "r1")]
            pairs = [(s, r) for s in ("s0", "s1") for r in ("r0", "r1")]
            streams = asyncio.create_task(stream(devs, pairs, PER_PAIR, 0.004))
            await asyncio.sleep(0.5)
            cluster["msg_server.19001"].kill9()
            accepted = await asyncio.wait_for(streams, 90)
            assert len(accepted) == 4 * PER_PAIR
            await delivered_once(accepted, got)
            m0 = cluster.msg_server(0)
            assert all(d.address == m0 for d in devs.values())
            assert sum(d.reconnects for d in devs.values()) >= 2
        finally:
            for t in readers:
                t.cancel()
            await asyncio.gather(*(d.close() for d in devs.values()))

    asyncio.run(scenario())
