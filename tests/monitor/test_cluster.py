"""The cluster monitor (``MonitorNode``, roles/monitor_cluster.py) on a real
``redis-server`` and a MongoDB-wire server: two msg_server nodes heartbeat through
their own RedisBus the way msg_server processes do (``MsgServer.node_info`` with the
stats ``attach_cluster_reporting`` adds), devices live in the MongoStore, presence is
set on the bus; the JSON API, /metrics and the operator actions are checked over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.mongo import fresh_database_name, mongo_url
from support.redis import RedisServer, shared_redis, unique_prefix

from fishchat_iot.auth import hash_token
from fishchat_iot.bus.redis import RedisBus
from fishchat_iot.config import Settings
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.roles.manager import Manager
from fishchat_iot.roles.monitor import hash_operator_token, operators_path, write_operators
from fishchat_iot.roles.monitor_cluster import (
    MonitorNode,
    attach_cluster_reporting,
    detach_cluster_reporting,
)
from fishchat_iot.roles.msg_server import MsgServer
from fishchat_iot.roles.router import Router
from fishchat_iot.stores.base import DeviceRecord, TopicRecord
from fishchat_iot.stores.mongo import MongoStore

from .conftest import Reply, http

__all__ = ["mongo_url", "shared_redis"]  # session fixtures, used here

NODE_TTL = 1.0  # seconds: a node whose heartbeats stop is down this soon
BEAT = 0.25  # seconds between the fake msg_servers' heartbeats
TOKEN = "cluster-operator-token"


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll an async ``check`` (HTTP runs in a thread: the monitor is on this loop)
    until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(0.05)


@dataclass
class FakeNode:
    """A msg_server object that is not serving: its counters and sessions are set by
    the test, its heartbeats go out through its own RedisBus like a real node's."""

    ms: MsgServer
    bus: RedisBus
    beating: bool = True
    events: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def beat_forever(self) -> None:
        while self.beating:
            await self.ms.heartbeat()
            await asyncio.sleep(BEAT)

    def add_session(self, device_id: str, transport: str = "tcp") -> None:
        self.ms.sessions[device_id] = SimpleNamespace(  # type: ignore[assignment]
            transport_name=transport, inflight={"m1": None}, device_id=device_id
        )


@dataclass
class Cluster:
    node: MonitorNode
    store: MongoStore
    a: FakeNode
    b: FakeNode
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://{self.node.address}"

    async def get(self, path: str, token: str | None = TOKEN) -> Reply:
        return await asyncio.to_thread(http, self.base + path, token)

    async def get_json(self, path: str) -> Any:
        reply = await self.get(path)
        assert reply.status == 200, (path, reply.status, reply.text)
        return reply.json()

    async def post(self, path: str) -> Reply:
        return await asyncio.to_thread(
            http, self.base + path, TOKEN, "POST", b"{}", {"Content-Type": "application/json"}
        )


@pytest.fixture
async def cluster(
    shared_redis: RedisServer, mongo_url: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    prefix = unique_prefix()
    settings = Settings()
    settings.node.data_dir = str(tmp_path / "monitor")
    settings.monitor.port = 0
    settings.monitor.metrics_port = 0
    settings.bus.backend = "redis"
    settings.bus.url = shared_redis.url
    settings.bus.prefix = prefix
    settings.bus.node_ttl = NODE_TTL
    settings.store.backend = "mongodb"
    settings.store.mongo_url = mongo_url
    settings.store.mongo_database = fresh_database_name("fcmon")
    write_operators(
        operators_path(settings.data_dir), {"ops": {"token_sha256": hash_operator_token(TOKEN)}}
    )
    store = MongoStore(mongo_url, settings.store.mongo_database, timeout_s=10.0)
    await store.open()
    for i, name in enumerate(("cm-lamp", "cm-door", "cm-fan")):
        await store.add_device(DeviceRecord(name, hash_token(name), created_ms=1000 + i))
    await store.create_topic(
        TopicRecord("cm-room", "cm-lamp", members=frozenset({"cm-lamp", "cm-door"}))
    )
    # Offline queues: 3 for cm-lamp (online on node a: its backlog), 2 for cm-fan.
    queued = [("cm-lamp", i) for i in range(3)] + [("cm-fan", i) for i in range(3, 5)]
    await store.enqueue(
        [Envelope(f"q{i}", "cm-door", to, "hi", 1_700_000_000_000, i + 1) for to, i in queued],
        max_len=100,
    )
    nodes = []
    for port in (19000, 19001):
        bus = RedisBus(shared_redis.url, prefix=prefix, node_ttl=NODE_TTL)
        await bus.open()
        ms = MsgServer(
            settings,
            bus,
            Manager(store),
            Router(bus, store, 100),
            f"msg_server@127.0.0.1:{port}",
            f"127.0.0.1:{port}",
        )
        attach_cluster_reporting(ms, bus)
        fake = FakeNode(ms, bus)
        bus.on_event(fake.events.append)
        nodes.append(fake)
    a, b = nodes
    a.add_session("cm-lamp")
    a.add_session("cm-x1", "mqtt")
    b.add_session("cm-y1")
    a.ms.msgs_in, a.ms.msgs_out, a.ms.dropped = 100, 90, {"QUEUE_FULL": 2}
    b.ms.msgs_in, b.ms.msgs_out = 7, 5
    a.ms.topic_msgs = {"cm-room": 4}
    b.ms.topic_msgs = {"cm-room": 1}
    a.ms.latency.observe(3)
    b.ms.latency.observe(40)
    await a.bus.set_presence("cm-lamp", a.ms.node_id)
    for n in nodes:
        n.task = asyncio.get_running_loop().create_task(n.beat_forever())
    node = MonitorNode(settings)
    await node.start()
    try:
        c = Cluster(node, store, a, b, settings.data_dir)

        # Pub/sub drops what is published before a subscriber is in: wait for everyone's.
        async def subscribed() -> bool:
            await a.bus.publish_event({"kind": "probe"})
            heard = (await c.get_json("/api/status"))["cluster"]["events"]
            return bool(heard and a.events and b.events)

        await eventually(subscribed, "every event subscription in place")
        yield c
    finally:
        await node.stop()
        for n in nodes:
            n.beating = False
            if n.task is not None:
                n.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await n.task
            detach_cluster_reporting(n.ms)
            with contextlib.suppress(Exception):
                await n.bus.remove_node(n.ms.node_id)
            await n.bus.close()
        await store.close()


def by_id(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in nodes}


async def test_nodes_rates_and_a_dead_node(cluster: Cluster) -> None:
    a_id, b_id = cluster.a.ms.node_id, cluster.b.ms.node_id

    async def both_seen() -> dict[str, dict[str, Any]] | None:
        nodes = by_id((await cluster.get_json("/api/nodes"))["nodes"])
        return nodes if a_id in nodes and b_id in nodes else None

    nodes = await eventually(both_seen, "both msg_servers in /api/nodes")
    a, b = nodes[a_id], nodes[b_id]
    # Offline queue per node: the queues of the devices it holds (cm-lamp on a).
    assert (a["queued"], b["queued"]) == (3, 0)
    assert (a["role"], a["address"], a["sessions"], a["msgs_in"], a["msgs_out"]) == (
        "msg_server",
        "127.0.0.1:19000",
        2,
        100,
        90,
    )
    assert (b["sessions"], b["msgs_in"], b["msgs_out"]) == (1, 7, 5)
    assert a["health"] == b["health"] == "ok"
    assert a["inflight"] == 2 and b["inflight"] == 1
    me = [n for n in nodes.values() if n["role"] == "monitor"]
    assert len(me) == 1 and me[0]["local"] is True and me[0]["address"] == cluster.node.address

    # msgs/s from successive heartbeats: node a takes 20 messages a beat, b none.
    async def pump() -> None:
        while True:
            cluster.a.ms.msgs_in += 20
            cluster.a.ms.msgs_out += 10
            await asyncio.sleep(BEAT)

    pumping = asyncio.get_running_loop().create_task(pump())
    try:

        async def rates() -> dict[str, Any] | None:
            n = by_id((await cluster.get_json("/api/nodes"))["nodes"])
            ra = n[a_id]["msgs_in_per_s"]
            return n if ra is not None and ra > 20 else None

        nodes = await eventually(rates, "node a's rate from its heartbeats")
    finally:
        pumping.cancel()
    a, b = nodes[a_id], nodes[b_id]
    # 20 per beat of 0.25 s is 80/s; beats drift, so only the order of magnitude.
    assert 20 < a["msgs_in_per_s"] < 200, a
    assert 10 < a["msgs_out_per_s"] < 100, a
    assert b["msgs_in_per_s"] == 0 and b["msgs_out_per_s"] == 0, b

    status = await cluster.get_json("/api/status")
    t = status["totals"]
    assert t["sessions"] == 3 and t["sessions_by_transport"] == {"tcp": 2, "mqtt": 1}
    live = [n for n in status["nodes"] if n["role"] == "msg_server"]
    assert t["msgs_in"] == sum(n["msgs_in"] for n in live) and t["msgs_in"] > 107 + 20, t
    assert t["msgs_out"] == sum(n["msgs_out"] for n in live) and t["msgs_out"] > 95 + 10, t
    assert t["dropped"] == {"QUEUE_FULL": 2}
    assert t["queued_now"] == 5 and status["registry"]["queued"] == 5
    assert status["registry"]["devices"] == 3
    assert {n["node_id"] for n in status["nodes"]} >= {a_id, b_id}

    # Node b stops heartbeating (a kill -9): it is marked down, a stays ok.
    cluster.b.beating = False

    async def b_down() -> dict[str, dict[str, Any]] | None:
        n = by_id((await cluster.get_json("/api/nodes"))["nodes"])
        return n if n.get(b_id, {}).get("health") == "down" else None

    nodes = await eventually(b_down, "node b marked down after its heartbeats stopped")
    assert nodes[b_id]["role"] == "msg_server" and nodes[b_id]["address"] == "127.0.0.1:19001"
    assert nodes[a_id]["health"] == "ok"
    status = await cluster.get_json("/api/status")
    assert status["totals"]["sessions"] == 2  # only live nodes' sessions count

    metrics = (await cluster.get("/metrics")).text
    assert f'fishchat_node_up{{node="{b_id}",role="msg_server"}} 0' in metrics
    assert f'fishchat_node_up{{node="{a_id}",role="msg_server"}} 1' in metrics


async def test_devices_online_where_and_topics(cluster: Cluster) -> None:
    a_id = cluster.a.ms.node_id

    async def listed() -> dict[str, Any] | None:
        doc = await cluster.get_json("/api/devices")
        return doc if doc["online"] == 3 else None  # both nodes' sessions are in

    doc = await eventually(listed, "the device list with both nodes' sessions")
    assert doc["total"] == doc["registered"] == 3
    devs = {d["id"]: d for d in doc["devices"]}
    assert devs["cm-lamp"]["state"] == "online"
    assert devs["cm-lamp"]["node"] == a_id
    assert devs["cm-lamp"]["address"] == "127.0.0.1:19000"
    assert devs["cm-door"]["state"] == devs["cm-fan"]["state"] == "offline"
    assert devs["cm-door"]["node"] is None
    assert (devs["cm-lamp"]["queued"], devs["cm-fan"]["queued"], devs["cm-door"]["queued"]) == (
        3,
        2,
        0,
    )

    online = await cluster.get_json("/api/devices?state=online")
    assert [d["id"] for d in online["devices"]] == ["cm-lamp"] and online["total"] == 1
    offline = await cluster.get_json("/api/devices?state=offline&q=DOOR")
    assert [d["id"] for d in offline["devices"]] == ["cm-door"]
    paged = await cluster.get_json("/api/devices?per_page=2&page=2")
    assert (paged["pages"], len(paged["devices"])) == (2, 1)

    # The device moves to node b: presence is what the page shows.
    await cluster.b.bus.set_presence("cm-lamp", cluster.b.ms.node_id)
    moved = await cluster.get_json("/api/devices?q=cm-lamp")
    assert moved["devices"][0]["node"] == cluster.b.ms.node_id
    assert moved["devices"][0]["address"] == "127.0.0.1:19001"

    topics = await cluster.get_json("/api/topics")
    (room,) = topics["topics"]
    # Traffic is the sum of both nodes' reports; one of two members is online.
    assert (room["name"], room["members"], room["members_online"]) == ("cm-room", 2, 1)
    assert room["messages"] == 5


async def test_revoke_and_kick_reach_the_bus_and_the_store(cluster: Cluster) -> None:
    await eventually(lambda: _has_node(cluster, cluster.a.ms.node_id), "node a in the registry")
    reply = await cluster.post("/api/devices/cm-door/revoke")
    assert reply.status == 200 and reply.json() == {"revoked": "cm-door"}
    record = await cluster.store.get_device("cm-door")
    assert record is not None and record.revoked

    def got(fake: Any, kind: str, device: str) -> Callable[[], Any]:
        async def check() -> bool:
            return {"kind": kind, "device": device} in fake.events

        return check

    # Every subscriber of the events hears it: both msg_servers.
    await eventually(got(cluster.a, "revoke", "cm-door"), "revoke event on node a")
    await eventually(got(cluster.b, "revoke", "cm-door"), "revoke event on node b")
    doc = await cluster.get_json("/api/devices?state=revoked")
    assert [d["id"] for d in doc["devices"]] == ["cm-door"]
    assert (await cluster.post("/api/devices/nobody/revoke")).status == 404

    reply = await cluster.post("/api/sessions/cm-lamp/kick")
    assert reply.status == 200, reply.text
    assert reply.json() == {"kicked": "cm-lamp", "node": cluster.a.ms.node_id}
    await eventually(got(cluster.a, "kick", "cm-lamp"), "kick event on node a")
    # An offline device has no session to close: nothing is published.
    assert (await cluster.post("/api/sessions/cm-fan/kick")).status == 404
    await asyncio.sleep(0.2)
    assert not [e for e in cluster.a.events if e.get("device") == "cm-fan"]

    events = await cluster.get_json("/api/events")
    assert [(e["action"], e["device_id"]) for e in events["actions"]] == [
        ("kick", "cm-lamp"),
        ("revoke", "cm-door"),
    ]


async def test_refused_logins_errors_and_metrics(cluster: Cluster) -> None:
    a_id, b_id = cluster.a.ms.node_id, cluster.b.ms.node_id
    session = SimpleNamespace(transport_name="mqtt")
    for callback in cluster.b.ms.on_login_refused:  # what MsgServer.login does
        callback(session, "cm-fan", "AUTH_FAILED", "wrong token")  # type: ignore[arg-type]
    logging.getLogger("fishchat.msg_server").warning("cm-test: disk nearly full")

    async def refused() -> list[dict[str, Any]] | None:
        doc = await cluster.get_json("/api/events")
        return doc["refused_logins"] or None

    (event,) = await eventually(refused, "the refused login published by node b")
    assert (event["device_id"], event["code"], event["transport"], event["node"]) == (
        "cm-fan",
        "AUTH_FAILED",
        "mqtt",
        b_id,
    )

    # Both nodes' reporters are in this process: each publishes the warning once.
    async def node_errors() -> list[dict[str, Any]] | None:
        doc = await cluster.get_json("/api/events")
        errs = [e for e in doc["errors"] if e.get("node") and "cm-test" in e["message"]]
        return errs if len(errs) >= 2 else None

    errs = await eventually(node_errors, "the warning published as error events")
    assert sorted(e["node"] for e in errs) == [a_id, b_id]
    assert {(e["level"], e["logger"]) for e in errs} == {("warning", "fishchat.msg_server")}

    async def metrics_in() -> str | None:
        text = (await cluster.get("/metrics")).text
        return text if f'node="{b_id}"' in text and f'node="{a_id}"' in text else None

    text = await eventually(metrics_in, "both nodes' samples in /metrics")
    assert f'fishchat_messages_accepted_total{{node="{a_id}"}} 100' in text
    assert f'fishchat_messages_accepted_total{{node="{b_id}"}} 7' in text
    assert f'fishchat_messages_delivered_total{{node="{a_id}"}} 90' in text
    assert f'fishchat_sessions{{node="{a_id}",transport="mqtt"}} 1' in text
    assert f'fishchat_sessions{{node="{b_id}",transport="tcp"}} 1' in text
    assert f'fishchat_messages_dropped_total{{node="{a_id}",reason="QUEUE_FULL"}} 2' in text
    assert re.search(r"^fishchat_offline_queue_messages 5$", text, re.M), text
    # The latency histograms of both nodes, merged: 3 ms and 40 ms.
    assert re.search(r"^fishchat_delivery_latency_seconds_count 2$", text, re.M), text
    assert 'fishchat_delivery_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'fishchat_delivery_latency_seconds_bucket{le="0.05"} 2' in text
    # The open metrics bind serves the same without a token; the main one wants one.
    open_text = await asyncio.to_thread(http, f"http://{cluster.node.metrics_address}/metrics")
    assert open_text.status == 200 and f'node="{a_id}"' in open_text.text
    assert (await cluster.get("/metrics", token=None)).status == 401
    assert (await cluster.get("/readyz", token=None)).status == 200


async def test_status_file_and_cli(cluster: Cluster, tmp_path: Path) -> None:
    """``fishchat-iot status`` finds the cluster monitor through status.json and shows
    the cluster's nodes and the registry counts the monitor read from MongoDB."""
    await eventually(lambda: _has_node(cluster, cluster.b.ms.node_id), "node b in the registry")
    status = json.loads((cluster.data_dir / "status.json").read_text())
    assert status["listeners"]["monitor"] == cluster.node.address
    config = tmp_path / "monitor.toml"
    s = cluster.node.settings
    config.write_text(
        f'[node]\ndata_dir = "{s.node.data_dir}"\n'
        f'[store]\nbackend = "mongodb"\nmongo_url = "{s.store.mongo_url}"\n'
        f'mongo_database = "{s.store.mongo_database}"\n'
    )

    async def cli() -> dict[str, Any] | None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fishchat_iot.cli.main",
            "--config",
            str(config),
            "status",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert out, err.decode()
        doc = json.loads(out)
        ids = {n["node_id"] for n in doc["nodes"]}
        return doc if {cluster.a.ms.node_id, cluster.b.ms.node_id} <= ids else None

    doc = await eventually(cli, "status --json with both msg_servers")
    assert doc["running"] is True and doc["source"] == "monitor"
    assert doc["sessions"] == 3
    assert doc["store"]["devices"] == 3 and doc["store"]["topics"] == 1


async def _has_node(cluster: Cluster, node_id: str) -> bool:
    nodes = (await cluster.get_json("/api/nodes"))["nodes"]
    return any(n["node_id"] == node_id and n["health"] == "ok" for n in nodes)


async def test_starts_before_redis_and_waits(
    mongo_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Roles start in any order: the monitor waits for Redis, then serves."""
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    settings = Settings()
    settings.node.data_dir = str(tmp_path / "monitor")
    settings.monitor.port = 0
    settings.bus.backend = "redis"
    settings.bus.url = redis.url  # nothing listens there yet
    settings.store.backend = "mongodb"
    settings.store.mongo_url = mongo_url
    settings.store.mongo_database = fresh_database_name("fcmon")
    node = MonitorNode(settings)
    starting = asyncio.get_running_loop().create_task(node.start())
    try:
        await asyncio.sleep(1.0)
        assert not starting.done()
        assert any("is not reachable" in r.getMessage() for r in caplog.records)
        await asyncio.to_thread(redis.start)
        await asyncio.wait_for(starting, 15)

        async def is_ready() -> bool:
            r = await asyncio.to_thread(http, f"http://{node.address}/readyz")
            return r.status == 200 and r.json() == {"status": "ready", "bus": True, "store": True}

        await eventually(is_ready, "/readyz once Redis and MongoDB answer")
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        else:
            await node.stop()
        await asyncio.to_thread(redis.stop)
