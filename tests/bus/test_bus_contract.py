"""The contract every ``Bus`` backend passes: what the roles rely on. Each test works
on one backend through ``cluster`` (``make()`` gives one node's handle on it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from fishchat_iot.bus.base import NodeInfo
from fishchat_iot.core.envelope import KIND_TOPIC, Envelope

from .conftest import MakeBus


def node(node_id: str, role: str = "msg_server", sessions: int = 0) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        role=role,
        address=f"127.0.0.1:{19000 + len(node_id)}",
        started_ms=1_700_000_000_000,
        sessions=sessions,
    )


def env(msg_id: str, to: str = "bob", okey: int = 1) -> Envelope:
    return Envelope(id=msg_id, sender="alice", to=to, body="aGk=", ts=1, okey=okey)


class Inbox:
    """A handler that records what it was given."""

    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self.calls = 0
        self._changed = asyncio.Event()

    async def __call__(self, envelopes: Sequence[Envelope]) -> None:
        self.calls += 1
        self.got.extend(envelopes)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 5.0, unique: bool = False) -> list[Envelope]:
        """Wait until ``n`` envelopes (``n`` distinct ids if ``unique``) arrived."""
        deadline = time.monotonic() + timeout
        while (len({e.id for e in self.got}) if unique else len(self.got)) < n:
            self._changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"got {len(self.got)} of {n} envelopes"
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return self.got


# -- node registry ------------------------------------------------------------------


async def test_heartbeat_registers_with_load(cluster: MakeBus) -> None:
    bus = await cluster()
    before = int(time.time() * 1000)
    await bus.heartbeat(node("ms1", sessions=3))
    await bus.heartbeat(node("gw1", role="gateway"))
    live = await bus.live_nodes("msg_server")
    assert [(n.node_id, n.sessions, n.address) for n in live] == [("ms1", 3, "127.0.0.1:19003")]
    assert live[0].updated_ms >= before
    assert [n.node_id for n in await bus.live_nodes("gateway")] == ["gw1"]
    assert await bus.live_nodes("router") == []


async def test_heartbeat_refreshes_load(cluster: MakeBus) -> None:
    bus = await cluster()
    await bus.heartbeat(node("ms1", sessions=1))
    info = node("ms1", sessions=7)
    info.msgs_in, info.msgs_out = 100, 90
    await bus.heartbeat(info)
    (live,) = await bus.live_nodes("msg_server")
    assert (live.sessions, live.msgs_in, live.msgs_out) == (7, 100, 90)


async def test_nodes_are_seen_by_every_node(cluster: MakeBus) -> None:
    a, b = await cluster(), await cluster()
    await a.heartbeat(node("ms1"))
    await b.heartbeat(node("ms2"))
    for bus in (a, b):
        assert sorted(n.node_id for n in await bus.live_nodes("msg_server")) == ["ms1", "ms2"]


async def test_remove_node(cluster: MakeBus) -> None:
    bus = await cluster()
    await bus.heartbeat(node("ms1"))
    await bus.heartbeat(node("ms2"))
    await bus.remove_node("ms1")
    await bus.remove_node("never-there")
    assert [n.node_id for n in await bus.live_nodes("msg_server")] == ["ms2"]


async def test_a_node_without_heartbeats_stops_being_live(cluster: MakeBus) -> None:
    bus = await cluster(node_ttl=0.3)
    await bus.heartbeat(node("ms1"))
    await bus.heartbeat(node("ms2"))
    await asyncio.sleep(0.2)
    await bus.heartbeat(node("ms2"))
    await asyncio.sleep(0.2)
    assert [n.node_id for n in await bus.live_nodes("msg_server")] == ["ms2"]
    await asyncio.sleep(0.25)
    assert await bus.live_nodes("msg_server") == []


# -- presence -------------------------------------------------------------------------


async def test_presence_set_where_clear(cluster: MakeBus) -> None:
    a, b = await cluster(), await cluster()
    assert await a.where("bob") is None
    await a.set_presence("bob", "ms1")
    assert await b.where("bob") == "ms1"
    await b.clear_presence("bob", "ms1")
    assert await a.where("bob") is None
    await a.clear_presence("bob", "ms1")  # clearing twice is harmless


async def test_a_newer_login_elsewhere_wins(cluster: MakeBus) -> None:
    a, b = await cluster(), await cluster()
    await a.set_presence("bob", "ms1")
    await b.set_presence("bob", "ms2")
    # ms1 notices bob's old session ended after the new login: ms2 keeps him.
    await a.clear_presence("bob", "ms1")
    assert await a.where("bob") == "ms2"
    await b.clear_presence("bob", "ms2")
    assert await a.where("bob") is None


# -- node inboxes ---------------------------------------------------------------------


async def test_send_to_node_delivers_every_field(cluster: MakeBus) -> None:
    receiver, sender = await cluster(), await cluster()
    inbox = Inbox()
    await receiver.attach_inbox("ms1", inbox)
    await receiver.heartbeat(node("ms1"))
    sent = [
        Envelope(
            id="m1",
            sender="alice",
            to="bob",
            body="c2VhbGVk",
            ts=1_700_000_000_123,
            okey=42,
            kind=KIND_TOPIC,
            topic="kitchen",
            enc="x25519-chacha20poly1305:3",
        ),
        env("m2", to="carol", okey=43),
    ]
    await sender.send_to_node("ms1", sent)
    assert await inbox.wait_for(2) == sent


async def test_inbox_keeps_order_and_goes_only_to_its_node(cluster: MakeBus) -> None:
    a, b, sender = await cluster(), await cluster(), await cluster()
    inbox_a, inbox_b = Inbox(), Inbox()
    await a.attach_inbox("ms1", inbox_a)
    await a.heartbeat(node("ms1"))
    await b.attach_inbox("ms2", inbox_b)
    await b.heartbeat(node("ms2"))
    for i in range(20):
        await sender.send_to_node("ms1" if i % 2 == 0 else "ms2", [env(f"m{i}", okey=i)])
    await sender.send_to_node("ms1", [])  # nothing to send is fine
    got_a = await inbox_a.wait_for(10)
    got_b = await inbox_b.wait_for(10)
    assert [e.id for e in got_a] == [f"m{i}" for i in range(0, 20, 2)]
    assert [e.id for e in got_b] == [f"m{i}" for i in range(1, 20, 2)]


async def test_send_to_an_unknown_node_raises_lookup_error(cluster: MakeBus) -> None:
    bus = await cluster()
    try:
        await bus.send_to_node("nobody", [env("m1")])
    except LookupError:
        pass
    else:
        raise AssertionError("send_to_node to an unknown node must raise LookupError")
