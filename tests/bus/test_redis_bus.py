"""What the Redis bus adds to the contract: durable inboxes across consumer restarts and
dead nodes, presence and liveness that expire, Redis outages and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from support.redis import RedisServer, unique_prefix

from fishchat_iot.bus.redis import BusUnavailable, RedisBus
from fishchat_iot.core.envelope import Envelope

from .test_bus_contract import Inbox, env, node

MakeRedisBus = Callable[..., Any]


@pytest.fixture
async def make_bus(redis_server: RedisServer) -> AsyncIterator[MakeRedisBus]:
    """Open RedisBus handles on one test's own redis-server (which it may restart)."""
    prefix = unique_prefix()
    opened: list[RedisBus] = []

    async def make(open_: bool = True, **options: Any) -> RedisBus:
        bus = RedisBus(redis_server.url, prefix=prefix, **options)
        if open_:
            await bus.open()
        opened.append(bus)
        return bus

    yield make
    for bus in opened:
        await bus.close()


async def _stream_len(url: str, key: str) -> int:
    r = Redis.from_url(url)
    try:
        return int(await r.xlen(key))
    finally:
        await r.aclose()


class StuckInbox:
    """A handler that takes envelopes and never returns: the node dies mid-delivery."""

    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self.entered = asyncio.Event()

    async def __call__(self, envelopes: Sequence[Envelope]) -> None:
        self.got.extend(envelopes)
        self.entered.set()
        await asyncio.Event().wait()


# -- inboxes --------------------------------------------------------------------------


async def test_delivered_entries_leave_the_inbox(
    make_bus: MakeRedisBus, redis_server: RedisServer
) -> None:
    bus = await make_bus()
    inbox = Inbox()
    await bus.attach_inbox("ms1", inbox)
    await bus.heartbeat(node("ms1"))
    for i in range(5):
        await bus.send_to_node("ms1", [env(f"m{i}"), env(f"n{i}")])
    await inbox.wait_for(10)
    await asyncio.sleep(0.1)  # the ack follows the handler's return
    assert await _stream_len(redis_server.url, bus._inbox_key("ms1")) == 0


async def test_unacked_entries_are_redelivered_after_a_consumer_restart(
    make_bus: MakeRedisBus,
) -> None:
    first = await make_bus()
    stuck = StuckInbox()
    await first.attach_inbox("ms1", stuck)
    await first.heartbeat(node("ms1"))
    await first.send_to_node("ms1", [env("m1"), env("m2")])
    await asyncio.wait_for(stuck.entered.wait(), 5)
    await first.close()  # the process dies with m1, m2 read but not acked

    sender = await make_bus()
    await sender.heartbeat(node("ms1"))  # (the new run of ms1 is alive again)
    await sender.send_to_node("ms1", [env("m3")])  # sent while nobody reads

    second = await make_bus()
    inbox = Inbox()
    await second.attach_inbox("ms1", inbox)  # same node id: its own pending first
    got = await inbox.wait_for(3)
    assert [e.id for e in got] == ["m1", "m2", "m3"]


async def test_a_failing_handler_gets_its_entries_again(make_bus: MakeRedisBus) -> None:
    bus = await make_bus(claim_idle=0.3)
    calls: list[list[str]] = []

    async def flaky(envelopes: Sequence[Envelope]) -> None:
        calls.append([e.id for e in envelopes])
        if len(calls) == 1:
            raise RuntimeError("disk full")

    await bus.attach_inbox("ms1", flaky)
    await bus.heartbeat(node("ms1"))
    await bus.send_to_node("ms1", [env("m1")])
    deadline = time.monotonic() + 5
    while len(calls) < 2:
        assert time.monotonic() < deadline, calls
        await asyncio.sleep(0.05)
    assert calls[:2] == [["m1"], ["m1"]]


async def test_a_dead_nodes_inbox_is_claimed_by_another(
    make_bus: MakeRedisBus, redis_server: RedisServer
) -> None:
    dead = await make_bus(node_ttl=0.3)
    stuck = StuckInbox()
    await dead.attach_inbox("ms1", stuck)
    await dead.heartbeat(node("ms1"))
    await dead.send_to_node("ms1", [env("m1")])
    await asyncio.wait_for(stuck.entered.wait(), 5)
    await dead.send_to_node("ms1", [env("m2"), env("m3")])  # queued behind the stuck one
    await dead.close()  # kill -9: no remove_node, its liveness key runs out

    survivor = await make_bus(node_ttl=5)
    await survivor.heartbeat(node("ms2"))
    adopted = Inbox()
    assert await survivor.claim_inbox("ms1", adopted) == 0  # still alive: hands off
    await asyncio.sleep(0.4)
    assert await survivor.dead_nodes("msg_server") == ["ms1"]
    with pytest.raises(LookupError):
        await survivor.send_to_node("ms1", [env("late")])
    assert await survivor.claim_inbox("ms1", adopted) == 3
    assert sorted(e.id for e in adopted.got) == ["m1", "m2", "m3"]
    # Emptied and forgotten: nothing more to claim, no registry entry left.
    assert await _stream_len(redis_server.url, survivor._inbox_key("ms1")) == 0
    assert await survivor.dead_nodes() == []
    assert await survivor.claim_inbox("ms1", adopted) == 0


async def test_remove_node_keeps_an_inbox_with_entries_claimable(make_bus: MakeRedisBus) -> None:
    bus = await make_bus()
    await bus.heartbeat(node("ms1"))
    await bus.send_to_node("ms1", [env("m1")])  # nobody ever read it
    await bus.remove_node("ms1")
    assert await bus.dead_nodes() == ["ms1"]
    inbox = Inbox()
    assert await bus.claim_inbox("ms1", inbox, consumer="ms2") == 1
    assert await bus.dead_nodes() == []


# -- presence and liveness ------------------------------------------------------------


async def test_presence_expires_unless_refreshed(make_bus: MakeRedisBus) -> None:
    holder = await make_bus(presence_ttl=0.3)
    other = await make_bus()
    await holder.set_presence("bob", "ms1")
    await asyncio.sleep(0.8)  # past two TTLs: the holder's refresher kept it
    assert await other.where("bob") == "ms1"
    await holder.close()  # the node dies: nobody refreshes
    await asyncio.sleep(0.4)
    assert await other.where("bob") is None


async def test_refresh_leaves_a_newer_login_alone(make_bus: MakeRedisBus) -> None:
    a = await make_bus(presence_ttl=5)
    b = await make_bus(presence_ttl=5)
    await a.set_presence("bob", "ms1")
    await b.set_presence("bob", "ms2")
    assert await a.refresh_presence() == 0  # not ms1's any more: dropped from its set
    assert await b.refresh_presence() == 1
    assert await a.where("bob") == "ms2"


async def test_liveness_comes_from_the_expiring_key(
    make_bus: MakeRedisBus, redis_server: RedisServer
) -> None:
    bus = await make_bus(node_ttl=5)
    await bus.heartbeat(node("ms1"))
    r = Redis.from_url(redis_server.url)
    try:
        await r.delete(bus._alive_key("ms1"))
    finally:
        await r.aclose()
    assert await bus.live_nodes("msg_server") == []
    assert await bus.dead_nodes("msg_server") == ["ms1"]


# -- events ---------------------------------------------------------------------------


async def test_registry_events_reach_every_node(make_bus: MakeRedisBus) -> None:
    a, b = await make_bus(), await make_bus()
    got: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        got.append(event)
        arrived.set()

    b.on_event(on_event)
    deadline = time.monotonic() + 5
    while not arrived.is_set():  # the subscription starts in the background
        assert time.monotonic() < deadline
        await a.publish_event({"kind": "revoke", "device": "d1"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 0.1)
    assert got[0] == {"kind": "revoke", "device": "d1"}


# -- outages --------------------------------------------------------------------------


async def test_operations_fail_clearly_while_redis_is_down(
    make_bus: MakeRedisBus, redis_server: RedisServer
) -> None:
    bus = await make_bus(timeout=0.5)
    await bus.heartbeat(node("ms1"))
    redis_server.stop()
    for call in (
        lambda: bus.send_to_node("ms1", [env("m1")]),
        lambda: bus.where("bob"),
        lambda: bus.set_presence("bob", "ms1"),
        lambda: bus.heartbeat(node("ms1")),
        lambda: bus.live_nodes("msg_server"),
    ):
        started = time.monotonic()
        with pytest.raises(BusUnavailable):
            await call()
        assert time.monotonic() - started < 3
    closed = await make_bus(open_=False)
    with pytest.raises(BusUnavailable):
        await closed.open()


@pytest.mark.parametrize("kill", [False, True], ids=["restart", "kill-9"])
async def test_bus_recovers_from_a_redis_restart_mid_stream(
    make_bus: MakeRedisBus,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    kill: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="fishchat_iot.bus.redis")
    receiver = await make_bus(timeout=1.0, block=0.2, backoff_max=0.3)
    sender = await make_bus(timeout=1.0)
    inbox = Inbox()
    await receiver.attach_inbox("ms1", inbox)
    await receiver.heartbeat(node("ms1"))
    accepted: list[str] = []
    failures = 0

    async def send(i: int) -> None:
        # What a router does: retry until the hand-off is accepted.
        nonlocal failures
        while True:
            try:
                await sender.send_to_node("ms1", [env(f"m{i}", okey=i)])
            except BusUnavailable:
                failures += 1
                await asyncio.sleep(0.05)
                continue
            accepted.append(f"m{i}")
            return

    for i in range(40):
        await send(i)
    restart = asyncio.create_task(asyncio.to_thread(redis_server.restart, kill=kill, down_for=0.5))
    for i in range(40, 80):
        await send(i)
        await asyncio.sleep(0.01)
    await restart
    for i in range(80, 100):
        await send(i)
    got = await inbox.wait_for(100, timeout=15, unique=True)
    assert sorted({e.id for e in got}) == sorted(accepted)  # nothing accepted is lost
    assert failures > 0, "the restart was not noticed mid-stream"
    outage_logs = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("inbox of ms1")
    ]
    assert any("unreachable" in m for m in outage_logs[:1]), outage_logs
    assert sum("unreachable" in m for m in outage_logs) == 1, "one warning per outage"
    assert any("reachable again" in m for m in outage_logs), outage_logs
    # Everything else works again too.
    await receiver.set_presence("bob", "ms1")
    assert await sender.where("bob") == "ms1"
