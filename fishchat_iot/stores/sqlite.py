"""The embedded store: registry and offline queues in one SQLite file (WAL).

All SQLite work runs on one worker thread that owns the connection, so the event loop
never waits on disk. Calls from the loop are queued; the worker runs every call waiting
(up to ``_MAX_BATCH``) in one transaction and commits once (group commit), then settles
all their futures with one ``call_soon_threadsafe``. Under load one fsync-free WAL commit
then carries hundreds of messages, which is what makes the enqueue hot path cheap.

Durability: WAL with ``synchronous=NORMAL`` keeps every committed transaction across a
process crash or ``kill -9``; only an OS crash or power loss can lose the last commits.

Another process (the CLI) may write the same file while the server runs: the busy
timeout lets each side wait for the other's short write lock, and ``PRAGMA
data_version`` tells this store when someone else committed (registry callbacks, and
dropping the cached queue lengths that the other process may have changed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fishchat_iot.core.envelope import Envelope
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

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Kept in ``PRAGMA user_version``; bump it (and add a migration) when the schema changes.
SCHEMA_VERSION = 2

# Most calls one transaction carries. Large enough that a burst is one commit, small
# enough that the futures of the first calls in a burst are not held back for long.
_MAX_BATCH = 1000
# How often an idle worker looks for commits by other processes (only while someone
# asked for registry-change callbacks).
_POLL_INTERVAL_S = 0.5
# The CLI holds the write lock only for a moment; waiting up to 5 s beats failing.
_BUSY_TIMEOUT_MS = 5000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL,
        v1 INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL DEFAULT 0,
        revoked_ms INTEGER NOT NULL DEFAULT 0,
        public_key TEXT NOT NULL DEFAULT '',
        meta TEXT NOT NULL DEFAULT '{}',
        psk TEXT NOT NULL DEFAULT '',
        rotated_ms INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS topics (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL DEFAULT '',
        open INTEGER NOT NULL DEFAULT 1,
        created_ms INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS members (
        topic TEXT NOT NULL,
        device TEXT NOT NULL,
        PRIMARY KEY (topic, device)
    ) WITHOUT ROWID""",
    # Clustered on (device, okey): a device's queue is one contiguous range read in order.
    """CREATE TABLE IF NOT EXISTS offline (
        device TEXT NOT NULL,
        okey INTEGER NOT NULL,
        id TEXT NOT NULL,
        sender TEXT NOT NULL,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        body TEXT NOT NULL,
        ts INTEGER NOT NULL,
        enc TEXT NOT NULL,
        stored_ms INTEGER NOT NULL,
        PRIMARY KEY (device, okey)
    ) WITHOUT ROWID""",
    # Duplicate detection on enqueue and deletion on ack both look up (device, id).
    "CREATE UNIQUE INDEX IF NOT EXISTS offline_device_id ON offline (device, id)",
    "CREATE INDEX IF NOT EXISTS offline_stored_ms ON offline (stored_ms)",
)


# What one call came to: its future, and its result or its error.
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Op:
    """One store call waiting for the worker."""

    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    write: bool  # writes take the write lock up front (BEGIN IMMEDIATE)


class _BatchAborted(Exception):
    """SQLite dropped the whole transaction (e.g. disk full): no call in the batch holds."""


class _NeedsIsolation(Exception):
    """A call failed after writing rows, which only a savepoint around it can undo."""


class _QueueCounts:
    """Per-device queue lengths, so FULL is decided without a COUNT(*) per message.

    Loaded lazily with one COUNT(*) the first time a device is touched, then kept in
    step by enqueue, ack and purge. Every change is journalled so a call that fails
    (its savepoint rolled back) can undo its own changes; a failed commit or a commit
    by another process drops the whole cache instead. Only the worker thread uses it.
    """

    __slots__ = ("_counts", "_journal")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._journal: list[tuple[str, int | None]] = []

    def get(self, conn: sqlite3.Connection, device: str) -> int:
        n = self._counts.get(device)
        if n is None:
            row = conn.execute("SELECT COUNT(*) FROM offline WHERE device = ?", (device,))
            n = int(row.fetchone()[0])
            self._set(device, n)
        return n

    def add(self, device: str, delta: int) -> None:
        # A device not cached yet needs nothing: its first get() counts the table.
        n = self._counts.get(device)
        if n is not None and delta:
            self._set(device, n + delta)

    def mark(self) -> int:
        return len(self._journal)

    def undo(self, mark: int) -> None:
        while len(self._journal) > mark:
            device, old = self._journal.pop()
            if old is None:
                self._counts.pop(device, None)
            else:
                self._counts[device] = old

    def commit(self) -> None:
        self._journal.clear()

    def clear(self) -> None:
        self._counts.clear()
        self._journal.clear()

    def _set(self, device: str, n: int) -> None:
        self._journal.append((device, self._counts.get(device)))
        self._counts[device] = n


def _settle(outcomes: list[_Outcome]) -> None:
    """Runs on the event loop: hand every call of a batch its result or error."""
    for future, result, error in outcomes:
        if future.done():  # the caller was cancelled; the work is done regardless
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _device_from_row(row: sqlite3.Row | tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(
        id=row[0],
        token_hash=bytes(row[1]),
        v1=bool(row[2]),
        revoked=bool(row[3]),
        created_ms=row[4],
        revoked_ms=row[5],
        public_key=row[6],
        meta=json.loads(row[7]) if row[7] and row[7] != "{}" else NO_META,
        psk=row[8],
        rotated_ms=row[9],
    )


_DEVICE_COLUMNS = (
    "id, token_hash, v1, revoked, created_ms, revoked_ms, public_key, meta, psk, rotated_ms"
)
# Schema version -> what brings a file of that version to the next one.
_MIGRATIONS = {
    1: (
        "ALTER TABLE devices ADD COLUMN psk TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE devices ADD COLUMN rotated_ms INTEGER NOT NULL DEFAULT 0",
    )
}


class SqliteStore(Store):
    """``Store`` on one SQLite file, worked by one dedicated thread.

    ``queue_max`` bounds the calls waiting for that thread: beyond it a call raises
    StoreUnavailable at once, so a stalled disk turns into "retry later" for senders
    instead of an ever-growing backlog in memory.
    """

    def __init__(self, path: str | Path, queue_max: int = 100_000) -> None:
        self._path = Path(path)
        self._queue_max = queue_max
        self._ops: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False  # guarded by _cond; once set, no call is accepted
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[], None]] = []
        # Worker-thread state only:
        self._conn: sqlite3.Connection | None = None
        self._counts = _QueueCounts()
        self._data_version = 0

    @property
    def path(self) -> Path:
        return self._path

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        """Start the worker, open the file (creating its folder) and the schema.
        Idempotent; raises StoreUnavailable when the file cannot be opened."""
        if self._thread is not None and self._thread.is_alive() and not self._closing:
            if self._ready is not None:
                await self._ready  # another open() started the worker; wait until it is up
            return
        if self._stopped is not None:
            await self.close()  # a previous worker is still winding down
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._ready = ready
        self._loop = loop
        self._stopped = loop.create_future()
        with self._cond:
            self._closing = False
        self._thread = threading.Thread(
            target=self._worker_main,
            args=(loop, ready, self._stopped),
            name=f"sqlite-store:{self._path.name}",
            daemon=True,  # an unclosed store must not keep the process alive
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            await self.close()  # the worker has stopped; forget it so open() can retry
            raise

    async def close(self) -> None:
        """Run every call already queued, commit, stop the worker, close the file."""
        stopped, thread = self._stopped, self._thread
        if stopped is None or thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        await stopped
        # The worker's last act was to schedule ``stopped``; this join is immediate.
        thread.join()
        if self._thread is thread:
            self._thread = None
            self._stopped = None

    def on_registry_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop whenever another connection (the CLI,
        another process) committed to the file; checked about every 0.5 s. This
        store's own writes do not trigger it: the caller already knows about them."""
        with self._cond:
            self._callbacks.append(callback)
            self._cond.notify()  # an idle worker waits without timeout until now

    # -- devices ---------------------------------------------------------------
    async def add_device(self, device: DeviceRecord) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO devices ({_DEVICE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    device.id,
                    bytes(device.token_hash),
                    int(device.v1),
                    int(device.revoked),
                    device.created_ms,
                    device.revoked_ms,
                    device.public_key,
                    json.dumps(dict(device.meta), sort_keys=True),
                    device.psk,
                    device.rotated_ms,
                ),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"device {device.id!r} exists")

        await self._call(op, write=True)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        def op(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            return None if row is None else _device_from_row(row)

        return await self._call(op, write=False)

    async def list_devices(self) -> list[DeviceRecord]:
        def op(conn: sqlite3.Connection) -> list[DeviceRecord]:
            rows = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY id")
            return [_device_from_row(row) for row in rows]

        return await self._call(op, write=False)

    async def revoke_device(self, device_id: str, at_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Only a live device changes, so a second revoke keeps the first time.
            cur = conn.execute(
                "UPDATE devices SET revoked = 1, revoked_ms = ? WHERE id = ? AND revoked = 0",
                (at_ms, device_id),
            )
            if cur.rowcount == 0 and not _exists(conn, "devices", "id", device_id):
                raise NotFound(f"no device {device_id!r}")

        await self._call(op, write=True)

    async def set_credentials(
        self, device_id: str, token_hash: bytes, public_key: str, psk: str | None = None
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE devices SET token_hash = ?, public_key = ?, psk = coalesce(?, psk),"
                " rotated_ms = ? WHERE id = ?",
                (bytes(token_hash), public_key, psk, _now_ms(), device_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no device {device_id!r}")

        await self._call(op, write=True)

    async def revoked_since(self, since_ms: int) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM devices WHERE revoked = 1 AND revoked_ms >= ? ORDER BY id",
                (since_ms,),
            )
            return [row[0] for row in rows]

        return await self._call(op, write=False)

    async def rotated_since(self, since_ms: int) -> list[tuple[str, int]]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = conn.execute(
                "SELECT id, rotated_ms FROM devices WHERE rotated_ms >= ? ORDER BY id",
                (max(since_ms, 1),),
            )
            return [(row[0], row[1]) for row in rows]

        return await self._call(op, write=False)

    # -- topics ----------------------------------------------------------------
    async def create_topic(self, topic: TopicRecord) -> None:
        members = set(topic.members)
        if topic.owner:
            members.add(topic.owner)

        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "INSERT OR IGNORE INTO topics (name, owner, open, created_ms) VALUES (?,?,?,?)",
                (topic.name, topic.owner, int(topic.open), topic.created_ms),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"topic {topic.name!r} exists")
            conn.executemany(
                "INSERT OR IGNORE INTO members (topic, device) VALUES (?, ?)",
                [(topic.name, device) for device in sorted(members)],
            )

        await self._call(op, write=True)

    async def get_topic(self, name: str) -> TopicRecord | None:
        def op(conn: sqlite3.Connection) -> TopicRecord | None:
            row = conn.execute(
                "SELECT name, owner, open, created_ms FROM topics WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return None
            members = conn.execute("SELECT device FROM members WHERE topic = ?", (name,))
            return TopicRecord(
                name=row[0],
                owner=row[1],
                open=bool(row[2]),
                created_ms=row[3],
                members=frozenset(m[0] for m in members),
            )

        return await self._call(op, write=False)

    async def list_topics(self) -> list[TopicRecord]:
        def op(conn: sqlite3.Connection) -> list[TopicRecord]:
            # Two queries for all topics rather than one members query per topic.
            by_topic: dict[str, set[str]] = collections.defaultdict(set)
            for topic, device in conn.execute("SELECT topic, device FROM members"):
                by_topic[topic].add(device)
            rows = conn.execute("SELECT name, owner, open, created_ms FROM topics ORDER BY name")
            return [
                TopicRecord(
                    name=name,
                    owner=owner,
                    open=bool(is_open),
                    created_ms=created_ms,
                    members=frozenset(by_topic.get(name, ())),
                )
                for name, owner, is_open, created_ms in rows
            ]

        return await self._call(op, write=False)

    async def add_member(self, name: str, device_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if not _exists(conn, "topics", "name", name):
                raise NotFound(f"no topic {name!r}")
            cur = conn.execute(
                "INSERT OR IGNORE INTO members (topic, device) VALUES (?, ?)", (name, device_id)
            )
            return cur.rowcount == 1

        return await self._call(op, write=True)

    async def remove_member(self, name: str, device_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if not _exists(conn, "topics", "name", name):
                raise NotFound(f"no topic {name!r}")
            cur = conn.execute(
                "DELETE FROM members WHERE topic = ? AND device = ?", (name, device_id)
            )
            return cur.rowcount == 1

        return await self._call(op, write=True)

    # -- offline queues --------------------------------------------------------
    async def enqueue(self, envelopes: Sequence[Envelope], max_len: int) -> list[Enqueued]:
        if not envelopes:
            return []
        batch = tuple(envelopes)
        counts = self._counts

        def op(conn: sqlite3.Connection) -> list[Enqueued]:
            now = _now_ms()
            results: list[Enqueued] = []
            for env in batch:
                if counts.get(conn, env.to) < max_len:
                    # One statement on the hot path: the unique (device, id) index turns
                    # a duplicate into "ignored", which is then told apart below.
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO offline (device, okey, id, sender, kind, topic,"
                        " body, ts, enc, stored_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            env.to,
                            env.okey,
                            env.id,
                            env.sender,
                            env.kind,
                            env.topic,
                            env.body,
                            env.ts,
                            env.enc,
                            now,
                        ),
                    )
                    if cur.rowcount == 1:
                        counts.add(env.to, 1)
                        results.append(Enqueued.STORED)
                        continue
                # Full, or the insert was ignored: a retry of a queued message is still
                # DUPLICATE when the queue is full (the sender gets its receipt).
                row = conn.execute(
                    "SELECT sender FROM offline WHERE device = ? AND id = ?", (env.to, env.id)
                ).fetchone()
                if row is not None:
                    results.append(
                        Enqueued.DUPLICATE if row[0] == env.sender else Enqueued.CONFLICT
                    )
                elif counts.get(conn, env.to) >= max_len:
                    results.append(Enqueued.FULL)
                else:
                    # Ignored although the id is new: the (device, okey) key is taken.
                    # Order keys are unique per node, so this is a caller's bug; the
                    # call fails as a whole (its rows stored so far are undone).
                    raise ValueError(f"okey {env.okey} is already queued for {env.to!r}")
            return results

        return await self._call(op, write=True)

    async def pending(self, device_id: str, after_okey: int, limit: int) -> list[Envelope]:
        def op(conn: sqlite3.Connection) -> list[Envelope]:
            rows = conn.execute(
                "SELECT id, sender, body, ts, okey, kind, topic, enc FROM offline"
                " WHERE device = ? AND okey > ? ORDER BY okey LIMIT ?",
                (device_id, after_okey, limit),
            )
            return [
                Envelope(
                    id=id_,
                    sender=sender,
                    to=device_id,
                    body=body,
                    ts=ts,
                    okey=okey,
                    kind=kind,
                    topic=topic,
                    enc=enc,
                )
                for id_, sender, body, ts, okey, kind, topic, enc in rows
            ]

        return await self._call(op, write=False)

    async def ack(self, device_id: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        unique = tuple(dict.fromkeys(ids))  # an id repeated in one ack counts once
        counts = self._counts

        def op(conn: sqlite3.Connection) -> int:
            removed = 0
            for id_ in unique:
                cur = conn.execute(
                    "DELETE FROM offline WHERE device = ? AND id = ?", (device_id, id_)
                )
                removed += cur.rowcount
            counts.add(device_id, -removed)
            return removed

        return await self._call(op, write=True)

    async def queue_depth(self, device_id: str) -> int:
        counts = self._counts
        return await self._call(lambda conn: counts.get(conn, device_id), write=False)

    async def queue_depths(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT device, COUNT(*) FROM offline GROUP BY device")
            return {device: n for device, n in rows}

        return await self._call(op, write=False)

    async def purge_expired(self, older_than_ms: int) -> int:
        counts = self._counts

        def op(conn: sqlite3.Connection) -> int:
            # Count per device first so cached queue lengths stay exact.
            per_device = conn.execute(
                "SELECT device, COUNT(*) FROM offline WHERE stored_ms < ? GROUP BY device",
                (older_than_ms,),
            ).fetchall()
            if not per_device:
                return 0
            conn.execute("DELETE FROM offline WHERE stored_ms < ?", (older_than_ms,))
            for device, n in per_device:
                counts.add(device, -n)
            return sum(n for _, n in per_device)

        return await self._call(op, write=True)

    # -- event-loop side of the worker -----------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        result: T = await self._submit(fn, write)
        return result

    def _submit(self, fn: Callable[[sqlite3.Connection], Any], write: bool) -> asyncio.Future[Any]:
        if self._thread is None:
            raise StoreUnavailable(f"SQLite store {self._path} is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closing:
                raise StoreUnavailable(f"SQLite store {self._path} is closed")
            if len(self._ops) >= self._queue_max:
                raise StoreUnavailable(
                    f"SQLite store {self._path} is behind: {len(self._ops)} calls waiting"
                )
            self._ops.append(_Op(fn, future, write))
            if len(self._ops) == 1:
                # The worker only sleeps on an empty queue, so only the first call wakes it.
                self._cond.notify()
        return future

    def _fire_callbacks(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("registry-change callback %r failed", callback)

    # -- worker thread ---------------------------------------------------------
    def _worker_main(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: asyncio.Future[None],
        stopped: asyncio.Future[None],
    ) -> None:
        try:
            self._conn = self._connect()
        except Exception as exc:
            error = StoreUnavailable(f"cannot open SQLite store {self._path}: {exc}")
            error.__cause__ = exc
            with self._cond:
                self._closing = True
                # A concurrent open() returned early and its caller queued calls already.
                leftover = list(self._ops)
                self._ops.clear()
            failed: list[_Outcome] = [(ready, None, error)]
            failed += [(op.future, None, _unavailable(self._path, exc)) for op in leftover]
            failed.append((stopped, None, None))
            self._resolve(failed)
            return
        opened: list[_Outcome] = [(ready, None, None)]
        loop.call_soon_threadsafe(_settle, opened)
        try:
            self._serve()
        except BaseException:
            log.exception("SQLite store worker for %s crashed", self._path)
            raise
        finally:
            # Normally empty (close drains first); after a crash, no caller is left hanging.
            with self._cond:
                self._closing = True
                leftover = list(self._ops)
                self._ops.clear()
            outcomes: list[_Outcome] = [
                (op.future, None, StoreUnavailable(f"SQLite store {self._path} stopped"))
                for op in leftover
            ]
            try:
                self._conn.close()
            except sqlite3.Error:
                log.exception("closing SQLite store %s", self._path)
            self._conn = None
            self._counts.clear()
            outcomes.append((stopped, None, None))
            self._resolve(outcomes)

    def _connect(self) -> sqlite3.Connection:
        """Open the file and its schema (in the worker thread). Processes opening one new
        file at once (``up`` and CLI commands started together) can find it locked
        although the busy timeout is set: switching a new file to WAL upgrades a shared
        lock, and SQLite answers a second upgrader at once with "database is locked"
        instead of waiting (it would deadlock). Such an open is tried again, for as long
        as the busy timeout, before it fails."""
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        delay = 0.01
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)  # the worker thread, never the event loop
            delay = min(delay * 2, 0.2)

    def _connect_once(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours (BEGIN/COMMIT per batch), not the
        # sqlite3 module's implicit ones. Only the worker thread ever touches it.
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL journal mode unavailable (got {mode!r})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")  # two processes opening at once: one creates
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise sqlite3.OperationalError(
                        f"schema version {version} is newer than this program's"
                        f" {SCHEMA_VERSION}; upgrade fishchat-iot"
                    )
                if version < SCHEMA_VERSION:
                    if version > 0:  # an older file: migrate it step by step
                        for v in range(version, SCHEMA_VERSION):
                            for statement in _MIGRATIONS[v]:
                                conn.execute(statement)
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve(self) -> None:
        next_poll = time.monotonic() + _POLL_INTERVAL_S
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    if not self._callbacks:
                        self._cond.wait()
                        continue
                    wait = next_poll - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                n = min(len(self._ops), _MAX_BATCH)
                batch = [self._ops.popleft() for _ in range(n)]
                done = not batch and self._closing
            if batch:
                self._run_batch(batch)
            elif done:
                return
            if self._callbacks and time.monotonic() >= next_poll:
                try:
                    self._check_data_version()
                except sqlite3.Error:
                    log.exception("polling SQLite store %s", self._path)
                next_poll = time.monotonic() + _POLL_INTERVAL_S

    def _check_data_version(self) -> None:
        """Notice commits by other connections: our cached queue lengths may be wrong
        now, and registry listeners want to know."""
        assert self._conn is not None
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        self._counts.clear()
        if self._callbacks and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._fire_callbacks)
            except RuntimeError:  # the loop is closed; nobody to tell
                pass

    def _run_batch(self, batch: list[_Op]) -> None:
        conn = self._conn
        assert conn is not None
        outcomes: list[_Outcome]
        try:
            try:
                outcomes = self._transact(conn, batch, isolate=False)
            except _NeedsIsolation:
                # A call failed after writing. Without savepoints its rows can only go
                # with the whole transaction: undo everything, then run the batch again
                # with a savepoint around each write so only that call fails.
                conn.execute("ROLLBACK")
                self._counts.undo(0)
                outcomes = self._transact(conn, batch, isolate=True)
        except (sqlite3.Error, _BatchAborted) as exc:
            # Nothing of this batch is on disk: every call in it fails, and cached queue
            # lengths (which may have counted its rows) are dropped.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback in SQLite store %s", self._path)
            self._counts.clear()
            log.warning("SQLite store %s: batch of %d failed: %s", self._path, len(batch), exc)
            outcomes = [(op.future, None, _unavailable(self._path, exc)) for op in batch]
        else:
            self._counts.commit()
        self._resolve(outcomes)

    def _transact(
        self, conn: sqlite3.Connection, batch: list[_Op], *, isolate: bool
    ) -> list[_Outcome]:
        """Run the batch in one transaction and commit it once (the group commit)."""
        # A batch with writes takes the write lock up front: upgrading a read
        # transaction later could fail with SQLITE_BUSY without waiting.
        conn.execute("BEGIN IMMEDIATE" if any(op.write for op in batch) else "BEGIN")
        # Inside the transaction, so the check and the batch see the same snapshot.
        self._check_data_version()
        outcomes = [self._run_op(conn, op, isolate) for op in batch]
        conn.execute("COMMIT")
        return outcomes

    def _run_op(self, conn: sqlite3.Connection, op: _Op, isolate: bool) -> _Outcome:
        # The calls' expected failures (AlreadyExists, NotFound, ...) happen before they
        # write anything, so normally no savepoint is needed: they cost about half as much
        # again as the insert itself on the enqueue hot path. Whether a failing call wrote
        # is read from total_changes, not assumed.
        savepoint = isolate and op.write
        if savepoint:
            conn.execute("SAVEPOINT op")
        mark = self._counts.mark()
        changes = conn.total_changes
        try:
            result = op.fn(conn)
        except Exception as exc:
            self._counts.undo(mark)
            if not conn.in_transaction:
                raise _BatchAborted(str(exc)) from exc
            if savepoint:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            elif conn.total_changes != changes:
                raise _NeedsIsolation from exc
            if isinstance(exc, sqlite3.OperationalError):
                return op.future, None, _unavailable(self._path, exc)
            return op.future, None, exc
        if savepoint:
            conn.execute("RELEASE op")
        return op.future, result, None

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        """Settle a batch with one wake-up per event loop (normally exactly one)."""
        by_loop: dict[
            asyncio.AbstractEventLoop,
            list[_Outcome],
        ] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that loop is closed; its callers are gone
                pass


def _exists(conn: sqlite3.Connection, table: str, column: str, value: str) -> bool:
    # table and column are constants from this module, never user input.
    row = conn.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchone()
    return row is not None


def _unavailable(path: Path, exc: BaseException) -> StoreUnavailable:
    error = StoreUnavailable(f"SQLite store {path}: {exc}")
    error.__cause__ = exc
    return error
