"""The distributed store: registry and offline queues in MongoDB (pymongo's async client).

Collections (all created, with their indexes, by ``open()``):

``devices``
    One document per device, ``_id`` = device id. Index ``(revoked, revoked_ms)`` for
    ``revoked_since``.
``topics``
    One document per topic, ``_id`` = name, with its members in the document as an
    array. Membership changes are then single-document atomic updates (``$addToSet`` /
    ``$pull``, whose ``modifiedCount`` is exactly the "was it a member" answer), a topic
    is read with its members in one round trip (the router's fan-out reads whole
    member lists), and deleting a topic can never leave orphan members. The cost is the
    16 MiB document limit: some 400k members of 32-byte ids, far beyond an IoT topic
    (a household, a room, a fleet segment). A topic that may outgrow that wants a
    ``members`` collection keyed ``(topic, device)`` instead.
``offline``
    One document per queued message. Unique index ``(device, id)``: duplicate detection
    on enqueue and deletion on ack. Index ``(device, okey)``: a device's queue read in
    order. TTL index on ``stored`` (a BSON date): a safety net that drops messages
    ``max_age_s + ttl_grace_s`` old even when nobody calls ``purge_expired`` (the
    primary path, which keeps the queue counters exact).
``queues``
    One counter document per device that ever had a queue: ``{_id: device, n, v, t}``,
    ``n`` the number of queued messages, ``v`` a version bumped by every change, ``t``
    the last time (ms) a writer started changing the device's queue.
``meta``
    ``{_id: "registry", v}``: a version bumped by every registry write, polled by
    ``on_registry_change`` listeners (change streams need a replica set).

The per-device bound under concurrency (several msg_servers enqueueing for one device)
is a reservation on the counter document before any insert: one atomic
``update_one({_id: device, n: {$lte: max_len - k}}, {$inc: {n: k}})``. The filter and
the increment are one document write, so two nodes can never both take the last slot:
the counter never exceeds the bound, and neither does the queue. (Counting the queue
and then inserting is racy: both nodes count 9,999 and both insert.) Reserved slots
that end up unused (duplicates) are given back. Every other change to a queue
decrements by what it really removed (``deleted_count``).

Without multi-document transactions (a standalone server has none) a failure between
the counter write and the queue write can leave the counter too high, never too low:
an insert whose reply was lost, a delete whose decrement failed, or the TTL monitor
deleting behind the counter's back. Such drift only makes a queue look fuller than it
is, so the bound still holds; it is healed when a reservation finds the queue "full":
if no writer has touched the device for ``heal_quiet_s`` (longer than any operation
can take, so no reservation or delete is still in flight), the counter is set to the
real count, guarded by its version.

Enqueue is not atomic across a batch (no transactions): each envelope is stored or not
on its own, and a batch that fails part way raises StoreUnavailable. The sender then
retries with the same ids, the stored ones answer DUPLICATE, and nothing is lost or
doubled.

Sharding (docs/scaling.md): ``offline`` and ``queues`` on a hashed ``device`` /
``_id`` key (every per-device operation then hits one shard), ``devices`` on hashed
``_id``; ``topics`` and ``meta`` are small and stay unsharded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from fishchat_iot.core.envelope import Envelope
from fishchat_iot.core.tasks import cancel_and_wait
from fishchat_iot.stores.base import (
    NO_META,
    AlreadyExists,
    DeviceRecord,
    Enqueued,
    NotFound,
    Store,
    StoreUnavailable,
    TopicRecord,
)

__all__ = ["MongoStore"]

log = logging.getLogger(__name__)

Doc = dict[str, Any]

_DUPLICATE_KEY = 11000
_INDEX_OPTIONS_CONFLICT = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
_REGISTRY_ID = "registry"
# Largest value a BSON int64 holds: the counter arithmetic must stay within it.
_INT64_MAX = 2**63 - 1
_PURGE_PARALLEL = 16
_ID_CHUNK = 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _date(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


class MongoStore(Store):
    """``Store`` on a MongoDB database.

    ``max_age_s`` is the offline age bound (the TTL index is set to it plus
    ``ttl_grace_s``); ``timeout_s`` bounds every operation (pymongo's ``timeoutMS``):
    past it the call raises StoreUnavailable. ``poll_interval_s`` is how often
    registry-change listeners look at the registry version.
    """

    def __init__(
        self,
        url: str,
        database: str = "fishchat",
        *,
        max_age_s: float = 7 * 86400,
        ttl_grace_s: float = 3600,
        timeout_s: float = 10.0,
        poll_interval_s: float = 0.5,
        heal_quiet_s: float | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._url = url
        self._database = database
        self._ttl_s = max(1, int(max_age_s + ttl_grace_s))
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        # Longer than any operation can be in flight (timeoutMS), with room for clocks.
        self._heal_quiet_ms = int(
            1000 * (heal_quiet_s if heal_quiet_s is not None else 3 * timeout_s + 5)
        )
        self._client_options = dict(client_options or {})
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._open_lock = asyncio.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._poll_task: asyncio.Task[None] | None = None
        self._known_version = 0
        # Per device: when this process last recounted its queue (monotonic seconds).
        self._heal_checked: dict[str, float] = {}

    @property
    def database(self) -> str:
        return self._database

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        """Connect and create the indexes. Idempotent; raises StoreUnavailable when the
        server cannot be reached."""
        async with self._open_lock:
            if self._client is not None:
                return
            options: dict[str, Any] = {
                "timeoutMS": int(self._timeout_s * 1000),
                "serverSelectionTimeoutMS": int(self._timeout_s * 1000),
                "appname": "fishchat-iot",
            }
            options.update(self._client_options)
            client: AsyncMongoClient[Doc] = AsyncMongoClient(self._url, **options)
            db = client[self._database]
            try:
                await self._create_indexes(db)
                doc = await db.meta.find_one({"_id": _REGISTRY_ID})
            except PyMongoError as exc:
                await client.close()
                raise self._unavailable("open", exc) from exc
            self._known_version = int(doc["v"]) if doc else 0
            self._client, self._db = client, db
            if self._callbacks:
                self._start_polling()

    async def close(self) -> None:
        async with self._open_lock:
            task, self._poll_task = self._poll_task, None
            if task is not None:  # cancelled until it ends (a driver call may swallow one)
                await cancel_and_wait([task], log, "MongoDB store")
            client, self._client, self._db = self._client, None, None
            if client is not None:
                await client.close()

    async def _create_indexes(self, db: AsyncDatabase[Doc]) -> None:
        await db.offline.create_index(
            [("device", ASCENDING), ("id", ASCENDING)], unique=True, name="device_id"
        )
        # Not unique: order keys are unique per accepting node, not across nodes.
        await db.offline.create_index(
            [("device", ASCENDING), ("okey", ASCENDING)], name="device_okey"
        )
        await self._ttl_index(db)
        await db.devices.create_index(
            [("revoked", ASCENDING), ("revoked_ms", ASCENDING)], name="revoked_ms"
        )

    async def _ttl_index(self, db: AsyncDatabase[Doc]) -> None:
        """The TTL index with this store's age; an existing one with another age (the
        setting changed) is altered with collMod, or rebuilt where that is missing."""
        spec = [("stored", ASCENDING)]
        try:
            await db.offline.create_index(spec, name="stored_ttl", expireAfterSeconds=self._ttl_s)
            return
        except OperationFailure as exc:
            if exc.code not in _INDEX_OPTIONS_CONFLICT:
                raise
        log.info("offline TTL index: changing its age to %d s", self._ttl_s)
        try:
            await db.command(
                "collMod",
                "offline",
                index={"name": "stored_ttl", "expireAfterSeconds": self._ttl_s},
            )
        except OperationFailure:
            await db.offline.drop_index("stored_ttl")
            await db.offline.create_index(spec, name="stored_ttl", expireAfterSeconds=self._ttl_s)

    def on_registry_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop when another process changed devices,
        topics or members: the registry version is polled every ``poll_interval_s``.
        This store's own writes do not trigger it."""
        self._callbacks.append(callback)
        if self._db is not None:
            self._start_polling()

    def _start_polling(self) -> None:
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.get_running_loop().create_task(
                self._poll_registry(), name="mongo-registry-poll"
            )

    async def _poll_registry(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._poll_interval_s)
            db = self._db
            if db is None:
                return
            try:
                doc = await db.meta.find_one({"_id": _REGISTRY_ID})
            except PyMongoError as exc:
                if not failing:
                    log.warning("MongoDB store: cannot poll the registry version: %s", exc)
                    failing = True
                continue
            if failing:
                log.info("MongoDB store: registry polling works again")
                failing = False
            version = int(doc["v"]) if doc else 0
            if version != self._known_version:
                self._known_version = version
                for callback in list(self._callbacks):
                    try:
                        callback()
                    except Exception:
                        log.exception("registry-change callback %r failed", callback)

    # -- helpers ---------------------------------------------------------------
    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        error = StoreUnavailable(f"MongoDB store ({what}): {exc}")
        error.__cause__ = exc
        return error

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[AsyncDatabase[Doc]]:
        """The database, with every driver error turned into StoreUnavailable."""
        db = self._db
        if db is None:
            raise StoreUnavailable("MongoDB store is not open")
        try:
            yield db
        except PyMongoError as exc:
            raise self._unavailable(what, exc) from exc

    async def _bump_registry(self, db: AsyncDatabase[Doc]) -> None:
        """Tell other processes the registry changed (after the change is written)."""
        doc = await db.meta.find_one_and_update(
            {"_id": _REGISTRY_ID},
            {"$inc": {"v": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        version = int(doc["v"]) if doc else 0
        # Only our own write since we last looked: nothing for listeners to reload.
        if version == self._known_version + 1:
            self._known_version = version

    # -- devices ---------------------------------------------------------------
    async def add_device(self, device: DeviceRecord) -> None:
        with self._guard("add_device") as db:
            try:
                await db.devices.insert_one(_device_doc(device))
            except DuplicateKeyError as exc:
                raise AlreadyExists(f"device {device.id!r} exists") from exc
            await self._bump_registry(db)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._guard("get_device") as db:
            doc = await db.devices.find_one({"_id": device_id})
        return None if doc is None else _device_from_doc(doc)

    async def list_devices(self) -> list[DeviceRecord]:
        with self._guard("list_devices") as db:
            docs = await db.devices.find({}).sort("_id", ASCENDING).to_list()
        return [_device_from_doc(doc) for doc in docs]

    async def revoke_device(self, device_id: str, at_ms: int) -> None:
        with self._guard("revoke_device") as db:
            # Only a live device changes, so a second revoke keeps the first time.
            result = await db.devices.update_one(
                {"_id": device_id, "revoked": False},
                {"$set": {"revoked": True, "revoked_ms": at_ms}},
            )
            if result.matched_count == 0:
                if await db.devices.count_documents({"_id": device_id}, limit=1) == 0:
                    raise NotFound(f"no device {device_id!r}")
                return
            await self._bump_registry(db)

    async def set_credentials(
        self, device_id: str, token_hash: bytes, public_key: str, psk: str | None = None
    ) -> None:
        with self._guard("set_credentials") as db:
            fields: Doc = {
                "token_hash": bytes(token_hash),
                "public_key": public_key,
                "rotated_ms": time.time_ns() // 1_000_000,
            }
            if psk is not None:
                fields["psk"] = psk
            result = await db.devices.update_one({"_id": device_id}, {"$set": fields})
            if result.matched_count == 0:
                raise NotFound(f"no device {device_id!r}")
            await self._bump_registry(db)

    async def revoked_since(self, since_ms: int) -> list[str]:
        with self._guard("revoked_since") as db:
            docs = await (
                db.devices.find({"revoked": True, "revoked_ms": {"$gte": since_ms}}, {"_id": 1})
                .sort("_id", ASCENDING)
                .to_list()
            )
        return [doc["_id"] for doc in docs]

    async def rotated_since(self, since_ms: int) -> list[tuple[str, int]]:
        with self._guard("rotated_since") as db:
            docs = await (
                db.devices.find(
                    {"rotated_ms": {"$gte": max(since_ms, 1)}}, {"_id": 1, "rotated_ms": 1}
                )
                .sort("_id", ASCENDING)
                .to_list()
            )
        return [(doc["_id"], int(doc["rotated_ms"])) for doc in docs]

    # -- topics ----------------------------------------------------------------
    async def create_topic(self, topic: TopicRecord) -> None:
        members = set(topic.members)
        if topic.owner:
            members.add(topic.owner)
        doc = {
            "_id": topic.name,
            "owner": topic.owner,
            "open": topic.open,
            "created_ms": topic.created_ms,
            "members": sorted(members),
        }
        with self._guard("create_topic") as db:
            try:
                await db.topics.insert_one(doc)
            except DuplicateKeyError as exc:
                raise AlreadyExists(f"topic {topic.name!r} exists") from exc
            await self._bump_registry(db)

    async def get_topic(self, name: str) -> TopicRecord | None:
        with self._guard("get_topic") as db:
            doc = await db.topics.find_one({"_id": name})
        return None if doc is None else _topic_from_doc(doc)

    async def list_topics(self) -> list[TopicRecord]:
        with self._guard("list_topics") as db:
            docs = await db.topics.find({}).sort("_id", ASCENDING).to_list()
        return [_topic_from_doc(doc) for doc in docs]

    async def add_member(self, name: str, device_id: str) -> bool:
        return await self._change_member(name, {"$addToSet": {"members": device_id}})

    async def remove_member(self, name: str, device_id: str) -> bool:
        return await self._change_member(name, {"$pull": {"members": device_id}})

    async def _change_member(self, name: str, update: Doc) -> bool:
        with self._guard("member change") as db:
            result = await db.topics.update_one({"_id": name}, update)
            if result.matched_count == 0:
                raise NotFound(f"no topic {name!r}")
            if result.modified_count == 0:
                return False
            await self._bump_registry(db)
            return True

    # -- offline queues --------------------------------------------------------
    async def enqueue(self, envelopes: Sequence[Envelope], max_len: int) -> list[Enqueued]:
        if not envelopes:
            return []
        batch = tuple(envelopes)
        max_len = max(0, min(max_len, _INT64_MAX))
        results: list[Enqueued | None] = [None] * len(batch)
        # The first envelope for a (device, id) goes to the server; later ones in the
        # same batch are answered from what the first one came to.
        first: dict[tuple[str, str], int] = {}
        repeats: list[int] = []
        by_device: dict[str, list[int]] = {}
        for i, env in enumerate(batch):
            key = (env.to, env.id)
            if key in first:
                repeats.append(i)
            else:
                first[key] = i
                by_device.setdefault(env.to, []).append(i)
        holders: dict[tuple[str, str], str] = {}  # sender now queued under (device, id)
        stored = _date(_now_ms())
        with self._guard("enqueue") as db:
            outcomes = await asyncio.gather(
                *(
                    self._enqueue_device(db, device, idxs, batch, max_len, stored, results, holders)
                    for device, idxs in by_device.items()
                ),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        for i in repeats:
            env = batch[i]
            holder = holders.get((env.to, env.id))
            if holder is None:
                results[i] = Enqueued.FULL
            else:
                results[i] = Enqueued.DUPLICATE if holder == env.sender else Enqueued.CONFLICT
        return [r if r is not None else Enqueued.FULL for r in results]

    async def _enqueue_device(
        self,
        db: AsyncDatabase[Doc],
        device: str,
        idxs: list[int],
        batch: tuple[Envelope, ...],
        max_len: int,
        stored: dt.datetime,
        results: list[Enqueued | None],
        holders: dict[tuple[str, str], str],
    ) -> None:
        todo = list(idxs)
        retries = 0
        while todo:
            granted = await self._reserve(db, device, len(todo), max_len)
            if granted == 0:
                # The queue is full: an id already queued is still a DUPLICATE (the
                # sender gets its receipt) or a CONFLICT; anything new is FULL.
                queued = await self._queued_senders(db.offline, device, [batch[i].id for i in todo])
                for i in todo:
                    sender = queued.get(batch[i].id)
                    results[i] = _repeat_result(sender, batch[i].sender)
                    if sender is not None:
                        holders[(device, batch[i].id)] = sender
                return
            taking, todo = todo[:granted], todo[granted:]
            docs = [_offline_doc(batch[i], stored) for i in taking]
            rejected = await self._insert(db.offline, docs)
            for j, i in enumerate(taking):
                if j not in rejected:
                    results[i] = Enqueued.STORED
                    holders[(device, batch[i].id)] = batch[i].sender
            if not rejected:
                continue
            # Already queued: give their slots back and tell retries from conflicts.
            await db.queues.update_one(
                {"_id": device}, {"$inc": {"n": -len(rejected), "v": 1}, "$max": {"t": _now_ms()}}
            )
            dup_idxs = [taking[j] for j in sorted(rejected)]
            queued = await self._queued_senders(db.offline, device, [batch[i].id for i in dup_idxs])
            again: list[int] = []
            for i in dup_idxs:
                sender = queued.get(batch[i].id)
                if sender is None:
                    again.append(i)  # acked meanwhile: there is room for it now
                else:
                    results[i] = _repeat_result(sender, batch[i].sender)
                    holders[(device, batch[i].id)] = sender
            if again:
                retries += 1
                if retries > 5:
                    raise StoreUnavailable(f"MongoDB store: queue of {device!r} keeps changing")
                todo = again + todo

    async def _reserve(self, db: AsyncDatabase[Doc], device: str, k: int, max_len: int) -> int:
        """Take up to ``k`` slots of the device's queue; returns how many were taken
        (0: the queue is full)."""
        queues = db.queues
        if k <= max_len:
            result = await queues.update_one(
                {"_id": device, "n": {"$lte": max_len - k}},
                {"$inc": {"n": k, "v": 1}, "$max": {"t": _now_ms()}},
            )
            if result.modified_count == 1:
                return k
        # The queue is near its bound, or its counter does not exist yet. Each failed
        # attempt below means another writer changed the counter, so this ends.
        while True:
            doc = await queues.find_one({"_id": device})
            if doc is None:
                # First message for this device: create its counter (an equality upsert
                # on _id, safe when two nodes do it at once).
                await queues.update_one(
                    {"_id": device}, {"$setOnInsert": {"n": 0, "v": 0, "t": 0}}, upsert=True
                )
                continue
            room = max_len - int(doc["n"])
            if room <= 0:
                if not await self._heal(db, device, doc):
                    return 0
                continue
            take = min(room, k)
            result = await queues.update_one(
                {"_id": device, "n": {"$lte": max_len - take}},
                {"$inc": {"n": take, "v": 1}, "$max": {"t": _now_ms()}},
            )
            if result.modified_count == 1:
                return take

    async def _heal(self, db: AsyncDatabase[Doc], device: str, counter: Doc) -> bool:
        """The queue looks full: if the counter may have drifted and nobody is changing
        the queue, set it to the real count. True when it changed."""
        now = time.monotonic()
        last = self._heal_checked.get(device)
        if last is not None and now - last < 5.0:
            return False  # recounted a moment ago: a full queue is full
        if _now_ms() - int(counter.get("t", 0)) < self._heal_quiet_ms:
            return False  # writers may be in flight: their changes are not counted yet
        if len(self._heal_checked) > 10_000:
            self._heal_checked.clear()
        self._heal_checked[device] = now
        real = await db.offline.count_documents({"device": device})
        if real == int(counter["n"]):
            return False
        result = await db.queues.update_one(
            {"_id": device, "v": counter["v"]}, {"$set": {"n": real}, "$inc": {"v": 1}}
        )
        if result.modified_count == 1:
            log.warning(
                "offline queue counter of %s was %s, the queue holds %d: corrected",
                device,
                counter["n"],
                real,
            )
            return True
        return False

    async def _insert(self, offline: AsyncCollection[Doc], docs: list[Doc]) -> set[int]:
        """Insert; returns the positions rejected because that (device, id) is queued.
        Anything else (including a write concern error) raises."""
        try:
            await offline.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            details = exc.details or {}
            if details.get("writeConcernErrors"):
                raise
            rejected: set[int] = set()
            for error in details.get("writeErrors", []):
                if error.get("code") != _DUPLICATE_KEY:
                    raise
                rejected.add(int(error["index"]))
            return rejected
        return set()

    async def _queued_senders(
        self, offline: AsyncCollection[Doc], device: str, ids: list[str]
    ) -> dict[str, str]:
        docs = await offline.find(
            {"device": device, "id": {"$in": ids}}, {"_id": 0, "id": 1, "sender": 1}
        ).to_list()
        return {doc["id"]: doc["sender"] for doc in docs}

    async def pending(self, device_id: str, after_okey: int, limit: int) -> list[Envelope]:
        if limit <= 0:
            return []
        with self._guard("pending") as db:
            docs = await (
                db.offline.find({"device": device_id, "okey": {"$gt": after_okey}})
                .sort([("okey", ASCENDING), ("_id", ASCENDING)])
                .limit(limit)
                .to_list()
            )
        return [_envelope_from_doc(doc) for doc in docs]

    async def ack(self, device_id: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        unique = list(dict.fromkeys(ids))  # an id repeated in one ack counts once
        with self._guard("ack") as db:
            # Mark the counter as being changed first, so a recount (``_heal``) never
            # runs between the delete and the decrement.
            await db.queues.update_one(
                {"_id": device_id}, {"$inc": {"v": 1}, "$max": {"t": _now_ms()}}
            )
            removed = 0
            for start in range(0, len(unique), _ID_CHUNK):
                chunk = unique[start : start + _ID_CHUNK]
                result = await db.offline.delete_many({"device": device_id, "id": {"$in": chunk}})
                removed += result.deleted_count
            if removed:
                await db.queues.update_one(
                    {"_id": device_id}, {"$inc": {"n": -removed, "v": 1}, "$max": {"t": _now_ms()}}
                )
            return removed

    async def queue_depth(self, device_id: str) -> int:
        with self._guard("queue_depth") as db:
            return await db.offline.count_documents({"device": device_id})

    async def queue_depths(self) -> dict[str, int]:
        with self._guard("queue_depths") as db:
            cursor = await db.offline.aggregate([{"$group": {"_id": "$device", "n": {"$sum": 1}}}])
            docs = await cursor.to_list()
        return {doc["_id"]: int(doc["n"]) for doc in docs if doc["n"]}

    async def purge_expired(self, older_than_ms: int) -> int:
        cutoff = _date(older_than_ms)
        with self._guard("purge_expired") as db:
            cursor = await db.offline.aggregate(
                [
                    {"$match": {"stored": {"$lt": cutoff}}},
                    {"$group": {"_id": "$device"}},
                ]
            )
            devices = [doc["_id"] for doc in await cursor.to_list()]
            if not devices:
                return 0
            for start in range(0, len(devices), _ID_CHUNK):
                await db.queues.update_many(
                    {"_id": {"$in": devices[start : start + _ID_CHUNK]}},
                    {"$inc": {"v": 1}, "$max": {"t": _now_ms()}},
                )
            limit = asyncio.Semaphore(_PURGE_PARALLEL)

            async def purge(device: str) -> int:
                async with limit:
                    result = await db.offline.delete_many(
                        {"device": device, "stored": {"$lt": cutoff}}
                    )
                    if result.deleted_count:
                        await db.queues.update_one(
                            {"_id": device},
                            {
                                "$inc": {"n": -result.deleted_count, "v": 1},
                                "$max": {"t": _now_ms()},
                            },
                        )
                    return result.deleted_count

            outcomes = await asyncio.gather(*(purge(d) for d in devices), return_exceptions=True)
            total = 0
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                total += outcome
            return total


def _repeat_result(queued_sender: str | None, sender: str) -> Enqueued:
    if queued_sender is None:
        return Enqueued.FULL
    return Enqueued.DUPLICATE if queued_sender == sender else Enqueued.CONFLICT


def _device_doc(device: DeviceRecord) -> Doc:
    return {
        "_id": device.id,
        "token_hash": bytes(device.token_hash),
        "v1": device.v1,
        "revoked": device.revoked,
        "created_ms": device.created_ms,
        "revoked_ms": device.revoked_ms,
        "public_key": device.public_key,
        "meta": dict(device.meta),
        "psk": device.psk,
        "rotated_ms": device.rotated_ms,
    }


def _device_from_doc(doc: Doc) -> DeviceRecord:
    return DeviceRecord(
        id=doc["_id"],
        token_hash=bytes(doc.get("token_hash", b"")),
        v1=bool(doc.get("v1", False)),
        revoked=bool(doc.get("revoked", False)),
        created_ms=int(doc.get("created_ms", 0)),
        revoked_ms=int(doc.get("revoked_ms", 0)),
        public_key=doc.get("public_key", ""),
        meta=dict(doc["meta"]) if doc.get("meta") else NO_META,
        psk=doc.get("psk", ""),
        rotated_ms=int(doc.get("rotated_ms", 0)),
    )


def _topic_from_doc(doc: Doc) -> TopicRecord:
    return TopicRecord(
        name=doc["_id"],
        owner=doc.get("owner", ""),
        open=bool(doc.get("open", True)),
        created_ms=int(doc.get("created_ms", 0)),
        members=frozenset(doc.get("members") or ()),
    )


def _offline_doc(env: Envelope, stored: dt.datetime) -> Doc:
    return {
        "device": env.to,
        "id": env.id,
        "okey": env.okey,
        "sender": env.sender,
        "kind": env.kind,
        "topic": env.topic,
        "body": env.body,
        "ts": env.ts,
        "enc": env.enc,
        "stored": stored,
    }


def _envelope_from_doc(doc: Doc) -> Envelope:
    return Envelope(
        id=doc["id"],
        sender=doc["sender"],
        to=doc["device"],
        body=doc["body"],
        ts=int(doc["ts"]),
        okey=int(doc["okey"]),
        kind=doc.get("kind", "p2p"),
        topic=doc.get("topic", ""),
        enc=doc.get("enc", "none"),
    )
