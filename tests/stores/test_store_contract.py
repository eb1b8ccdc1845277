"""The contract every ``Store`` backend passes: what the core and the CLI rely on."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fishchat_iot.core.envelope import KIND_TOPIC, Envelope
from fishchat_iot.stores.base import (
    AlreadyExists,
    DeviceRecord,
    Enqueued,
    NotFound,
    Store,
    TopicRecord,
)

STORED, DUPLICATE, CONFLICT, FULL = (
    Enqueued.STORED,
    Enqueued.DUPLICATE,
    Enqueued.CONFLICT,
    Enqueued.FULL,
)


def device(device_id: str, **fields: Any) -> DeviceRecord:
    return DeviceRecord(id=device_id, token_hash=b"\x01" * 32, **fields)


def env(msg_id: str, to: str, okey: int, sender: str = "alice", body: str = "hi") -> Envelope:
    return Envelope(id=msg_id, sender=sender, to=to, body=body, ts=1_700_000_000_000, okey=okey)


def ids(envelopes: list[Envelope]) -> list[str]:
    return [e.id for e in envelopes]


# -- lifecycle ------------------------------------------------------------------------


async def test_open_is_idempotent(store: Store) -> None:
    await store.add_device(device("d1"))
    await store.open()
    assert [d.id for d in await store.list_devices()] == ["d1"]


# -- devices ----------------------------------------------------------------------------


async def test_device_round_trips_every_field(store: Store) -> None:
    record = DeviceRecord(
        id="sensor-1",
        token_hash=bytes(range(32)),
        v1=True,
        created_ms=1234,
        public_key="cHVibGljLWtleQ==",
        meta={"model": "esp32", "room": "kitchen"},
        psk="c2VhbGVkLXBzaw==",
    )
    await store.add_device(record)
    assert await store.get_device("sensor-1") == record
    assert await store.get_device("nobody") is None


async def test_add_device_twice_raises_and_keeps_the_first(store: Store) -> None:
    await store.add_device(device("d1", public_key="first"))
    with pytest.raises(AlreadyExists):
        await store.add_device(device("d1", public_key="second"))
    got = await store.get_device("d1")
    assert got is not None and got.public_key == "first"


async def test_list_devices_is_sorted_by_id(store: Store) -> None:
    for name in ["m", "b", "z", "a"]:
        await store.add_device(device(name))
    assert [d.id for d in await store.list_devices()] == ["a", "b", "m", "z"]


async def test_list_devices_empty(store: Store) -> None:
    assert await store.list_devices() == []


async def test_revoke_device(store: Store) -> None:
    await store.add_device(device("d1"))
    await store.add_device(device("d2"))
    await store.revoke_device("d1", at_ms=5000)
    d1, d2 = await store.get_device("d1"), await store.get_device("d2")
    assert d1 is not None and d1.revoked and d1.revoked_ms == 5000
    assert d2 is not None and not d2.revoked


async def test_revoking_twice_keeps_the_first_time(store: Store) -> None:
    await store.add_device(device("d1"))
    await store.revoke_device("d1", at_ms=5000)
    await store.revoke_device("d1", at_ms=9000)
    d1 = await store.get_device("d1")
    assert d1 is not None and d1.revoked_ms == 5000


async def test_revoke_unknown_device_raises(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.revoke_device("ghost", at_ms=1)


async def test_set_credentials_replaces_token_and_key(store: Store) -> None:
    await store.add_device(device("d1", public_key="old", meta={"k": "v"}))
    await store.set_credentials("d1", b"\x02" * 32, "new")
    d1 = await store.get_device("d1")
    assert d1 is not None
    assert (d1.token_hash, d1.public_key, d1.meta) == (b"\x02" * 32, "new", {"k": "v"})


async def test_set_credentials_keeps_or_replaces_the_psk(store: Store) -> None:
    await store.add_device(device("d1", psk="sealed-1"))
    await store.set_credentials("d1", b"\x02" * 32, "")
    d1 = await store.get_device("d1")
    assert d1 is not None and d1.psk == "sealed-1"  # None: unchanged
    await store.set_credentials("d1", b"\x03" * 32, "", psk="sealed-2")
    d1 = await store.get_device("d1")
    assert d1 is not None and (d1.token_hash, d1.psk) == (b"\x03" * 32, "sealed-2")


async def test_rotated_since_names_devices_whose_credentials_changed(store: Store) -> None:
    await store.add_device(device("d1"))
    await store.add_device(device("d2"))
    assert await store.rotated_since(0) == []  # never rotated
    before = int(time.time() * 1000)
    await store.set_credentials("d1", b"\x02" * 32, "k")
    after = int(time.time() * 1000)
    d1 = await store.get_device("d1")
    assert d1 is not None and before <= d1.rotated_ms <= after
    assert await store.rotated_since(before) == [("d1", d1.rotated_ms)]
    assert await store.rotated_since(after + 1) == []


async def test_set_credentials_unknown_device_raises(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.set_credentials("ghost", b"\x02" * 32, "")


async def test_revoked_since_includes_the_boundary(store: Store) -> None:
    for name in ["early", "edge", "late", "live"]:
        await store.add_device(device(name))
    await store.revoke_device("early", at_ms=100)
    await store.revoke_device("edge", at_ms=200)
    await store.revoke_device("late", at_ms=300)
    assert sorted(await store.revoked_since(200)) == ["edge", "late"]
    assert sorted(await store.revoked_since(0)) == ["early", "edge", "late"]
    assert await store.revoked_since(301) == []


# -- topics -----------------------------------------------------------------------------


async def test_create_topic_adds_owner_as_member(store: Store) -> None:
    await store.create_topic(
        TopicRecord(
            name="kitchen", owner="hub", open=False, created_ms=77, members=frozenset({"t1"})
        )
    )
    topic = await store.get_topic("kitchen")
    assert topic == TopicRecord(
        name="kitchen", owner="hub", open=False, created_ms=77, members=frozenset({"hub", "t1"})
    )


async def test_topic_without_owner_has_only_given_members(store: Store) -> None:
    await store.create_topic(TopicRecord(name="ops", owner="", members=frozenset({"a", "b"})))
    topic = await store.get_topic("ops")
    assert topic is not None and topic.members == frozenset({"a", "b"}) and topic.open


async def test_create_topic_twice_raises_and_keeps_the_first(store: Store) -> None:
    await store.create_topic(TopicRecord(name="t", owner="a"))
    with pytest.raises(AlreadyExists):
        await store.create_topic(TopicRecord(name="t", owner="b", members=frozenset({"c"})))
    topic = await store.get_topic("t")
    assert topic is not None and topic.owner == "a" and topic.members == frozenset({"a"})


async def test_get_unknown_topic_is_none(store: Store) -> None:
    assert await store.get_topic("nope") is None


async def test_list_topics_sorted_with_members(store: Store) -> None:
    await store.create_topic(TopicRecord(name="zeta", owner="z1"))
    await store.create_topic(TopicRecord(name="alpha", owner="", members=frozenset({"x", "y"})))
    await store.create_topic(TopicRecord(name="empty", owner=""))
    topics = await store.list_topics()
    assert [(t.name, t.members) for t in topics] == [
        ("alpha", frozenset({"x", "y"})),
        ("empty", frozenset()),
        ("zeta", frozenset({"z1"})),
    ]


async def test_add_and_remove_member(store: Store) -> None:
    await store.create_topic(TopicRecord(name="t", owner="a"))
    assert await store.add_member("t", "b") is True
    assert await store.add_member("t", "b") is False
    topic = await store.get_topic("t")
    assert topic is not None and topic.members == frozenset({"a", "b"})

    assert await store.remove_member("t", "a") is True
    assert await store.remove_member("t", "a") is False
    assert await store.remove_member("t", "never") is False
    topic = await store.get_topic("t")
    assert topic is not None and topic.members == frozenset({"b"})


async def test_member_changes_on_unknown_topic_raise(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.add_member("nope", "a")
    with pytest.raises(NotFound):
        await store.remove_member("nope", "a")
    assert await store.get_topic("nope") is None


# -- offline queues: enqueue ------------------------------------------------------------


async def test_enqueue_stores_and_pending_returns_every_field(store: Store) -> None:
    sent = Envelope(
        id="m1",
        sender="alice",
        to="bob",
        body="c2VhbGVk",
        ts=1_700_000_000_123,
        okey=42,
        kind=KIND_TOPIC,
        topic="kitchen",
        enc="x25519-chacha20poly1305:3",
    )
    assert await store.enqueue([sent], max_len=10) == [STORED]
    assert await store.pending("bob", after_okey=0, limit=10) == [sent]
    assert await store.pending("alice", after_okey=0, limit=10) == []


async def test_enqueue_returns_one_result_per_envelope_in_order(store: Store) -> None:
    await store.enqueue([env("m1", "bob", 1)], max_len=10)
    results = await store.enqueue(
        [
            env("m2", "bob", 2),  # new
            env("m1", "bob", 3),  # same sender, same id: a retry
            env("m1", "bob", 4, sender="mallory"),  # another sender reusing the id
            env("m1", "carol", 5),  # same id, other recipient: independent
        ],
        max_len=10,
    )
    assert results == [STORED, DUPLICATE, CONFLICT, STORED]
    assert ids(await store.pending("bob", 0, 10)) == ["m1", "m2"]
    assert (await store.pending("bob", 0, 10))[0].sender == "alice"
    assert ids(await store.pending("carol", 0, 10)) == ["m1"]


async def test_duplicate_within_one_batch(store: Store) -> None:
    results = await store.enqueue(
        [env("m1", "bob", 1), env("m1", "bob", 2), env("m1", "bob", 3, sender="eve")],
        max_len=10,
    )
    assert results == [STORED, DUPLICATE, CONFLICT]
    assert await store.queue_depth("bob") == 1


async def test_full_queue_takes_no_more(store: Store) -> None:
    results = await store.enqueue([env(f"m{i}", "bob", i) for i in range(1, 5)], max_len=3)
    assert results == [STORED, STORED, STORED, FULL]
    assert await store.enqueue([env("m9", "bob", 9)], max_len=3) == [FULL]
    # Other queues are not affected by bob's being full.
    assert await store.enqueue([env("m9", "carol", 9)], max_len=3) == [STORED]
    assert ids(await store.pending("bob", 0, 10)) == ["m1", "m2", "m3"]
    assert await store.queue_depth("bob") == 3


async def test_retry_into_a_full_queue_is_duplicate_not_full(store: Store) -> None:
    await store.enqueue([env("m1", "bob", 1), env("m2", "bob", 2)], max_len=2)
    assert await store.enqueue([env("m1", "bob", 1)], max_len=2) == [DUPLICATE]
    assert await store.enqueue([env("m1", "bob", 1, sender="eve")], max_len=2) == [CONFLICT]


async def test_ack_makes_room_in_a_full_queue(store: Store) -> None:
    await store.enqueue([env("m1", "bob", 1), env("m2", "bob", 2)], max_len=2)
    assert await store.enqueue([env("m3", "bob", 3)], max_len=2) == [FULL]
    assert await store.ack("bob", ["m1"]) == 1
    assert await store.enqueue([env("m3", "bob", 3)], max_len=2) == [STORED]
    assert ids(await store.pending("bob", 0, 10)) == ["m2", "m3"]


async def test_acked_id_can_be_queued_again(store: Store) -> None:
    await store.enqueue([env("m1", "bob", 1)], max_len=10)
    await store.ack("bob", ["m1"])
    assert await store.enqueue([env("m1", "bob", 2, sender="eve")], max_len=10) == [STORED]


async def test_enqueue_nothing(store: Store) -> None:
    assert await store.enqueue([], max_len=10) == []


async def test_one_failing_call_does_not_fail_concurrent_ones(store: Store) -> None:
    await store.add_device(device("taken"))
    results = await asyncio.gather(
        store.add_device(device("new-1")),
        store.add_device(device("taken")),
        store.enqueue([env("m1", "bob", 1)], max_len=10),
        store.add_device(device("new-2")),
        return_exceptions=True,
    )
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], AlreadyExists)
    assert results[2] == [STORED]
    assert [d.id for d in await store.list_devices()] == ["new-1", "new-2", "taken"]
    assert await store.queue_depth("bob") == 1


# -- offline queues: reading, acking, depths, purge -------------------------------------


async def test_pending_is_in_okey_order_and_pages_with_after_okey(store: Store) -> None:
    okeys = [50, 10, 40, 20, 30]
    await store.enqueue([env(f"m{k}", "bob", k) for k in okeys], max_len=100)
    await store.enqueue([env("other", "carol", 15)], max_len=100)

    page1 = await store.pending("bob", after_okey=0, limit=2)
    assert [e.okey for e in page1] == [10, 20]
    page2 = await store.pending("bob", after_okey=page1[-1].okey, limit=2)
    assert [e.okey for e in page2] == [30, 40]
    page3 = await store.pending("bob", after_okey=page2[-1].okey, limit=2)
    assert [e.okey for e in page3] == [50]
    assert await store.pending("bob", after_okey=50, limit=2) == []
    assert all(e.to == "bob" for e in page1 + page2 + page3)


async def test_pending_of_unknown_device_is_empty(store: Store) -> None:
    assert await store.pending("nobody", 0, 10) == []


async def test_ack_counts_what_went(store: Store) -> None:
    await store.enqueue([env(f"m{i}", "bob", i) for i in range(1, 6)], max_len=100)
    await store.enqueue([env("m1", "carol", 1)], max_len=100)
    assert await store.ack("bob", ["m1", "m3", "unknown"]) == 2
    assert await store.ack("bob", ["m1"]) == 0  # already gone
    assert await store.ack("bob", []) == 0
    assert ids(await store.pending("bob", 0, 10)) == ["m2", "m4", "m5"]
    # Acking is per device: carol's m1 is still there.
    assert ids(await store.pending("carol", 0, 10)) == ["m1"]


async def test_queue_depth_and_depths(store: Store) -> None:
    assert await store.queue_depth("bob") == 0
    assert await store.queue_depths() == {}
    await store.enqueue([env(f"b{i}", "bob", i) for i in range(3)], max_len=100)
    await store.enqueue([env("c1", "carol", 1)], max_len=100)
    assert await store.queue_depth("bob") == 3
    assert await store.queue_depths() == {"bob": 3, "carol": 1}

    await store.ack("carol", ["c1"])
    await store.ack("bob", ["b0"])
    assert await store.queue_depth("carol") == 0
    assert await store.queue_depths() == {"bob": 2}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _wait_past(ms: int) -> None:
    # The store stamps stored_ms with the wall clock; make sure it moved past ``ms``.
    await asyncio.sleep(max(0, ms - _now_ms() + 2) / 1000)
    assert _now_ms() > ms


async def test_purge_expired_drops_only_older_messages(store: Store) -> None:
    await store.enqueue([env("old1", "bob", 1), env("old2", "carol", 2)], max_len=2)
    cutoff = _now_ms() + 1
    await _wait_past(cutoff)
    await store.enqueue([env("new1", "bob", 3)], max_len=2)

    assert await store.purge_expired(0) == 0
    assert await store.purge_expired(cutoff) == 2
    assert await store.purge_expired(cutoff) == 0
    assert ids(await store.pending("bob", 0, 10)) == ["new1"]
    assert await store.queue_depth("bob") == 1
    assert await store.queue_depths() == {"bob": 1}
    # The freed room counts: bob holds one of two.
    assert await store.enqueue([env("n2", "bob", 4), env("n3", "bob", 5)], max_len=2) == [
        STORED,
        FULL,
    ]


async def test_purge_everything(store: Store) -> None:
    await store.enqueue([env(f"m{i}", f"dev{i % 3}", i) for i in range(9)], max_len=100)
    await _wait_past(_now_ms())
    assert await store.purge_expired(_now_ms()) == 9
    assert await store.queue_depths() == {}
    assert await store.queue_depth("dev0") == 0
