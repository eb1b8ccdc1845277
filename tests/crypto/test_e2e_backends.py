"""The distributed backends never hold a plaintext body either: a sealed message on the
Redis bus (a node inbox) and in the MongoDB store, and a v1 body sealed at rest in the
MongoDB store — the marker is nowhere in Redis (keys and append-only file) or MongoDB
(every document), and the receiver still opens what it gets back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pymongo import MongoClient
from support.mongo import fresh_database_name, mongo_url
from support.redis import RedisServer, redis_server, unique_prefix

from fishchat_iot.bus.base import NodeInfo
from fishchat_iot.bus.redis import RedisBus
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.crypto import generate_keypair
from fishchat_iot.crypto.atrest import AtRest, SealedStore
from fishchat_iot.crypto.device import DeviceCrypto
from fishchat_iot.stores.mongo import MongoStore

__all__ = ["mongo_url", "redis_server"]  # fixtures


@pytest.fixture
def pair() -> tuple[DeviceCrypto, DeviceCrypto]:
    ka, kb = generate_keypair(), generate_keypair()
    a, b = DeviceCrypto("alice", ka.private), DeviceCrypto("bob", kb.private)
    a.add_peer("bob", kb.public)
    b.add_peer("alice", ka.public)
    return a, b


def sealed_env(a: DeviceCrypto, text: str, mid: str, okey: int) -> Envelope:
    body, enc = a.seal_p2p("bob", mid, text)
    return Envelope(mid, "alice", "bob", body, 1_700_000_000_000, okey, enc=enc)


@pytest.fixture
def database(mongo_url: str) -> Iterator[str]:
    name = fresh_database_name()
    yield name
    with MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


def files_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in Path(root).rglob("*") if p.is_file())


def mongo_bytes(url: str, database: str) -> bytes:
    from bson import encode

    out = b""
    with MongoClient(url, serverSelectionTimeoutMS=5000) as client:
        db = client[database]
        for name in db.list_collection_names():
            for doc in db[name].find():
                out += encode(doc)
    return out


async def test_mongodb_holds_ciphertext_only(
    mongo_url: str, database: str, pair: tuple[DeviceCrypto, DeviceCrypto]
) -> None:
    a, b = pair
    marker = f"MONGO-{os.urandom(6).hex()}"
    inner = MongoStore(mongo_url, database, timeout_s=10.0)
    store = SealedStore(inner, AtRest(os.urandom(32))).as_store()
    await store.open()
    try:
        v1 = Envelope("v-1", "legacy", "bob", f"{marker} v1 body", 1_700_000_000_000, 1)
        await store.enqueue([sealed_env(a, f"{marker} e2e", "e-1", 2), v1], 100)
        assert marker.encode() not in mongo_bytes(mongo_url, database)
        got = await store.pending("bob", 0, 10)
        assert [e.id for e in got] == ["v-1", "e-1"]  # okey order
        plain, e2e = got
        assert b.open(sender="alice", msg_id="e-1", body=e2e.body, enc=e2e.enc).text == (
            f"{marker} e2e"
        )
        assert (plain.body, plain.enc) == (f"{marker} v1 body", "none")
    finally:
        await store.close()


async def test_redis_bus_holds_ciphertext_only(
    redis_server: RedisServer, pair: tuple[DeviceCrypto, DeviceCrypto]
) -> None:
    import redis.asyncio as aioredis

    a, b = pair
    marker = f"REDIS-{os.urandom(6).hex()}"
    prefix = unique_prefix()
    sender = RedisBus(redis_server.url, prefix=prefix)
    receiver = RedisBus(redis_server.url, prefix=prefix)
    await sender.open()
    await receiver.open()
    got: list[Envelope] = []
    arrived = asyncio.Event()

    async def handler(envs: Sequence[Envelope]) -> None:
        got.extend(envs)
        arrived.set()

    try:
        await receiver.heartbeat(NodeInfo("node-b", "msg_server", "127.0.0.1:1", 1))
        await sender.send_to_node("node-b", [sealed_env(a, f"{marker} via redis", "r-1", 1)])
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            dumped = b""
            async for key in client.scan_iter(match=f"{prefix}*"):
                dumped += key + (await client.dump(key) or b"")
        finally:
            await client.aclose()
        assert dumped, "nothing in Redis: the scan looked at the wrong keys"
        assert marker.encode() not in dumped
        assert marker.encode() not in files_bytes(redis_server.data_dir)
        await receiver.attach_inbox("node-b", handler)
        async with asyncio.timeout(10):
            await arrived.wait()
        env = got[0]
        assert b.open(sender="alice", msg_id=env.id, body=env.body, enc=env.enc).text == (
            f"{marker} via redis"
        )
    finally:
        await sender.close()
        await receiver.close()
