"""What the MongoDB store adds to the contract suite: several nodes sharing one database
(the queue bound, registry-change polling), an unreachable server, the indexes, and the
self-healing queue counter."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from pymongo import AsyncMongoClient, MongoClient
from support.mongo import ENV_URL, fresh_database_name, start_mongoeco

from fishchat_iot.core.envelope import Envelope
from fishchat_iot.stores.base import DeviceRecord, Enqueued, StoreUnavailable, TopicRecord
from fishchat_iot.stores.mongo import MongoStore

STORED, FULL = Enqueued.STORED, Enqueued.FULL


def env(msg_id: str, to: str, okey: int, sender: str = "alice") -> Envelope:
    return Envelope(id=msg_id, sender=sender, to=to, body="hi", ts=1, okey=okey)


@pytest.fixture
def database(mongo_url: str) -> Iterator[str]:
    name = fresh_database_name()
    yield name
    with MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


@pytest.fixture
async def make_store(mongo_url: str, database: str) -> AsyncIterator[Callable[..., MongoStore]]:
    """Stores on one database: each one is a node of the cluster."""
    opened: list[MongoStore] = []

    def make(**options: object) -> MongoStore:
        store = MongoStore(mongo_url, database, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_queue_bound_holds_across_nodes(make_store: Callable[..., MongoStore]) -> None:
    nodes = [make_store(), make_store(), make_store()]
    for node in nodes:
        await node.open()
    # 3 nodes x 6 single-message calls race for 10 slots (plus one batch of 4 each).
    calls = [
        node.enqueue([env(f"n{n}-m{i}", "bob", n * 100 + i + 1)], max_len=10)
        for i in range(6)
        for n, node in enumerate(nodes)
    ]
    calls += [
        node.enqueue([env(f"n{n}-b{i}", "bob", n * 100 + 50 + i) for i in range(4)], max_len=10)
        for n, node in enumerate(nodes)
    ]
    results = [r for rs in await asyncio.gather(*calls) for r in rs]
    assert results.count(STORED) == 10
    assert results.count(FULL) == len(results) - 10
    assert await nodes[0].queue_depth("bob") == 10
    assert len(await nodes[1].pending("bob", 0, 100)) == 10


async def test_registry_changes_by_another_node_are_noticed(
    make_store: Callable[..., MongoStore],
) -> None:
    watcher = make_store(poll_interval_s=0.1)
    writer = make_store()
    await watcher.open()
    await writer.open()
    changed = asyncio.Event()
    watcher.on_registry_change(changed.set)

    await watcher.add_device(DeviceRecord(id="own", token_hash=b"\x01" * 32))
    await asyncio.sleep(0.4)
    assert not changed.is_set(), "the store's own write is not news to it"

    for change in (
        writer.add_device(DeviceRecord(id="d1", token_hash=b"\x01" * 32)),
        writer.revoke_device("d1", 5),
        writer.create_topic(TopicRecord(name="t", owner="d1")),
        writer.add_member("t", "d2"),
        writer.remove_member("t", "d2"),
    ):
        changed.clear()
        await change
        await asyncio.wait_for(changed.wait(), 3)


async def test_indexes_are_created_and_the_ttl_follows_the_age_bound(
    make_store: Callable[..., MongoStore], mongo_url: str, database: str
) -> None:
    await make_store(max_age_s=600, ttl_grace_s=60).open()
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        info = await client[database].offline.index_information()
        assert info["device_id"]["key"] == [("device", 1), ("id", 1)]
        assert info["device_id"]["unique"]
        assert info["device_okey"]["key"] == [("device", 1), ("okey", 1)]
        assert info["stored_ttl"]["expireAfterSeconds"] == 660
        # Another node started with another age bound moves the TTL index along.
        await make_store(max_age_s=1200, ttl_grace_s=0).open()
        info = await client[database].offline.index_information()
        assert info["stored_ttl"]["expireAfterSeconds"] == 1200
    finally:
        await client.close()


async def test_counter_drift_heals_when_nobody_writes(
    make_store: Callable[..., MongoStore], mongo_url: str, database: str
) -> None:
    store = make_store(heal_quiet_s=0.3)
    await store.open()
    assert (
        await store.enqueue([env(f"m{i}", "bob", i) for i in range(3)], max_len=3) == [STORED] * 3
    )
    # Messages vanish behind the counter's back, as the TTL monitor does.
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        await client[database].offline.delete_many({"device": "bob", "id": {"$in": ["m0", "m1"]}})
    finally:
        await client.close()
    # While writers may be in flight the counter is trusted: the queue looks full.
    assert await store.enqueue([env("x1", "bob", 10)], max_len=3) == [FULL]
    await asyncio.sleep(0.4)
    # The recount is rate-limited per device; a fresh node (or 5 s) recounts.
    other = make_store(heal_quiet_s=0.3)
    await other.open()
    assert await other.enqueue([env("x1", "bob", 10), env("x2", "bob", 11)], max_len=3) == [
        STORED,
        STORED,
    ]
    assert await other.enqueue([env("x3", "bob", 12)], max_len=3) == [FULL]
    assert await store.queue_depth("bob") == 3


async def test_calls_before_open_are_unavailable(make_store: Callable[..., MongoStore]) -> None:
    store = make_store()
    with pytest.raises(StoreUnavailable):
        await store.enqueue([env("m1", "bob", 1)], max_len=10)
    with pytest.raises(StoreUnavailable):
        await store.get_device("d1")


async def test_open_fails_clearly_when_nobody_listens() -> None:
    store = MongoStore("mongodb://127.0.0.1:1/?directConnection=true", "x", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert time.monotonic() - started < 5


@pytest.mark.skipif(bool(os.environ.get(ENV_URL)), reason="stops its own mongoeco server")
async def test_server_gone_means_errors_not_false_receipts(database: str) -> None:
    server = await asyncio.to_thread(start_mongoeco)
    store = MongoStore(server.url, database, timeout_s=0.5)
    try:
        await store.open()
        assert await store.enqueue([env("m1", "bob", 1)], max_len=10) == [STORED]
        await asyncio.to_thread(server.stop)
        for call in (
            lambda: store.enqueue([env("m2", "bob", 2)], max_len=10),
            lambda: store.pending("bob", 0, 10),
            lambda: store.ack("bob", ["m1"]),
            lambda: store.add_device(DeviceRecord(id="d1", token_hash=b"\x01" * 32)),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 5
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)
