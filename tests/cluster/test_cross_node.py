"""Devices on different msg_servers of the distributed mode talk to each other: p2p both
ways, a topic with members on both nodes (fanned out by the router), a message to an
offline device delivered when it comes back on the other node."""

from __future__ import annotations

import asyncio

from support.cluster import Cluster, until
from support.redis import RedisServer, free_port

from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.tcp_device import TcpDevice
from tests.cluster.conftest import MakeCluster


async def _recv_texts(dev: TcpDevice, n: int, timeout: float = 15.0) -> list[str]:
    out = []
    for _ in range(n):
        msg = await dev.receive(timeout=timeout)
        out.append(msg.text)
    return out


def test_p2p_both_ways_and_a_topic_across_nodes(cluster: Cluster) -> None:
    ops = cluster.operator()
    # The router first: a msg_server hands topic members on other nodes to the routers
    # when it has seen one alive (checked at its start and every heartbeat), and routes
    # them itself otherwise; this test is about the router's path.
    cluster.start("router")
    until(lambda: "router" in cluster.nodes(), "the router is in the node registry")
    cluster.start("gateway", "msg_server.19000", "msg_server.19001", "manager", "monitor")
    tokens = cluster.register("a", "b", "c", "d")
    cluster.topic("room", "a", ["a", "b", "c"])
    m0, m1 = cluster.msg_server(0), cluster.msg_server(1)

    async def scenario() -> None:
        a = TcpDevice("a", tokens["a"], msg_server=m0)
        b = TcpDevice("b", tokens["b"], msg_server=m1)
        c = TcpDevice("c", tokens["c"], msg_server=m0)
        async with a, b, c:
            await asyncio.gather(a.connect(), b.connect(), c.connect())
            assert (a.address, b.address, c.address) == (m0, m1, m0)
            await a.send("b", "a->b")
            await b.send("a", "b->a")
            assert await _recv_texts(b, 1) == ["a->b"]
            assert await _recv_texts(a, 1) == ["b->a"]
            await a.publish("room", "from a")
            await b.publish("room", "from b")
            assert await _recv_texts(b, 1) == ["from a"]
            assert sorted(await _recv_texts(c, 2)) == ["from a", "from b"]
            assert await _recv_texts(a, 1) == ["from b"]
            # d is offline: queued in MongoDB, delivered when it logs in on the other node.
            await a.send("d", "while you were away")
            d = TcpDevice("d", tokens["d"], msg_server=m1)
            async with d:
                await d.connect()
                assert await _recv_texts(d, 1) == ["while you were away"]

    asyncio.run(scenario())
    # The members on the other node were the router's to reach (seen at its next
    # heartbeat).
    until(lambda: cluster.stats("router")["routed"] >= 2, "the router routed the topic")

    # One monitor shows every node of the cluster, with the messages each took in: a's
    # p2p to b and d and its topic message on one, b's p2p and topic on the other.
    def nodes() -> dict[str, dict[str, object]]:
        return {n["node_id"]: n for n in cluster.api("/api/nodes", ops)["nodes"]}

    def msgs_in() -> tuple[object, object]:
        # A node not sampled yet (the monitor samples the registry every second; the
        # scenario may be over sooner) is not there yet: wait for it.
        seen = nodes()
        return (
            seen.get("msg_server.19000", {}).get("msgs_in"),
            seen.get("msg_server.19001", {}).get("msgs_in"),
        )

    until(lambda: msgs_in() == (3, 2), "the monitor shows each msg_server's messages")
    seen = nodes()
    assert {"gateway", "msg_server.19000", "msg_server.19001", "router", "manager"} <= set(seen)
    assert all(n["health"] == "ok" for n in seen.values()), seen


def test_an_mqtt_device_on_one_node_and_a_tcp_device_on_the_other(
    cluster_on: MakeCluster, shared_redis: RedisServer, mongo_url: str
) -> None:
    """With an embedded broker on msg_server.19001 (docs/deploy-distributed.md, MQTT), an
    MQTT device there is a session of that node like a TCP device."""
    mqtt_port = free_port()
    cluster = cluster_on(shared_redis.url, mongo_url)
    cluster["msg_server.19001"].env.update(
        FISHCHAT_MQTT_MODE="embedded", FISHCHAT_MQTT_PORT=str(mqtt_port)
    )
    cluster.start("msg_server.19000", "msg_server.19001")
    tokens = cluster.register("sensor", "panel")

    async def scenario() -> None:
        sensor = MqttDevice("sensor", tokens["sensor"], f"127.0.0.1:{mqtt_port}")
        panel = TcpDevice("panel", tokens["panel"], msg_server=cluster.msg_server(0))
        async with sensor, panel:
            await asyncio.gather(sensor.connect(), panel.connect())
            await sensor.send("panel", "21.5 C")
            assert await _recv_texts(panel, 1) == ["21.5 C"]
            await panel.send("sensor", "set 20")
            assert (await sensor.receive(timeout=15)).text == "set 20"

    asyncio.run(scenario())
