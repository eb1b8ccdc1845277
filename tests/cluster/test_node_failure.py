"""A msg_server killed with SIGKILL in the middle of a stream loses no accepted message:
what it had accepted is in its inbox (taken over by the router) or was never
ACCEPTED (the sender resends after logging in again through the gateway), and the
devices' dedupe absorbs what arrives twice."""

from __future__ import annotations

import asyncio
import collections
import time

from support.cluster import Cluster

from firmware_sim.tcp_device import Message, TcpDevice

PER_PAIR = 300


async def _collect(dev: TcpDevice, got: collections.Counter[tuple[str, str]]) -> None:
    while True:
        msg: Message = await dev.receive()
        got[(msg.sender, msg.id)] += 1


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
        got: collections.Counter[tuple[str, str]] = collections.Counter()
        readers = []
        try:
            for n in names:  # one at a time: the gateway alternates the two nodes
                await devs[n].connect()
            placed = collections.Counter(d.address for d in devs.values())
            assert sorted(placed.values()) == [2, 2], placed
            readers = [asyncio.create_task(_collect(devs[r], got)) for r in ("r0", "r1")]

            async def stream(sender: str, to: str) -> list[str]:
                tasks = []
                for i in range(PER_PAIR):
                    tasks.append(asyncio.create_task(devs[sender].send(to, f"{sender}>{to} {i}")))
                    await asyncio.sleep(0.004)
                return list(await asyncio.gather(*tasks))

            streams = asyncio.gather(*(stream(s, r) for s in ("s0", "s1") for r in ("r0", "r1")))
            await asyncio.sleep(0.5)
            victim = "msg_server.19001"
            cluster[victim].kill9()
            pairs = [(s, r) for s in ("s0", "s1") for r in ("r0", "r1")]
            results = await asyncio.wait_for(streams, 90)
            text = {
                (s, mid): f"{s}>{r} {i}"
                for (s, r), ids in zip(pairs, results, strict=True)
                for i, mid in enumerate(ids)
            }
            accepted = set(text)
            assert len(accepted) == 4 * PER_PAIR
            deadline = time.monotonic() + 60
            while not accepted <= set(got):
                missing = sorted(text[k] for k in accepted - set(got))
                assert time.monotonic() < deadline, f"{len(missing)} not delivered: {missing}"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # anything delivered twice would show by now
            assert set(got) == accepted
            assert max(got.values()) == 1, [k for k, v in got.items() if v > 1][:5]
            m0 = cluster.msg_server(0)
            assert all(d.address == m0 for d in devs.values())
            assert sum(d.reconnects for d in devs.values()) >= 2
        finally:
            for t in readers:
                t.cancel()
            await asyncio.gather(*(d.close() for d in devs.values()))

    asyncio.run(scenario())
