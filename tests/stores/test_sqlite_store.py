"""What only the SQLite store promises: a durable file shared with the CLI process, group
commit behind one worker thread, a bounded call queue, and an event loop never blocked."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fishchat_iot.core.envelope import Envelope
from fishchat_iot.stores import sqlite as sqlite_module
from fishchat_iot.stores.base import DeviceRecord, Enqueued, StoreUnavailable, TopicRecord
from fishchat_iot.stores.sqlite import SCHEMA_VERSION, SqliteStore


def device(device_id: str) -> DeviceRecord:
    return DeviceRecord(id=device_id, token_hash=b"\x01" * 32)


def env(msg_id: str, to: str, okey: int, sender: str = "alice") -> Envelope:
    return Envelope(id=msg_id, sender=sender, to=to, body="x" * 64, ts=1, okey=okey)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "fishchat.db"


@contextlib.asynccontextmanager
async def opened(path: Path, **kwargs: int) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(path, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, as a CLI command
    writing at the same moment would (only much longer)."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("COMMIT")
    finally:
        other.close()


async def test_data_survives_close_and_reopen(db_path: Path) -> None:
    async with opened(db_path) as store:
        await store.add_device(device("d1"))
        await store.revoke_device("d1", at_ms=10)
        await store.create_topic(TopicRecord(name="t", owner="d1", members=frozenset({"d2"})))
        assert await store.enqueue([env("m1", "d2", 1), env("m2", "d2", 2)], max_len=10) == [
            Enqueued.STORED,
            Enqueued.STORED,
        ]
        await store.ack("d2", ["m1"])

    # The file is in WAL mode, so the CLI can read while the server writes.
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async with opened(db_path) as store:
        d1 = await store.get_device("d1")
        assert d1 is not None and d1.revoked and d1.revoked_ms == 10
        topic = await store.get_topic("t")
        assert topic is not None and topic.members == frozenset({"d1", "d2"})
        assert [e.id for e in await store.pending("d2", 0, 10)] == ["m2"]
        # The queue length is read back from the file, so the bound still holds.
        assert await store.enqueue([env("m3", "d2", 3), env("m4", "d2", 4)], max_len=2) == [
            Enqueued.STORED,
            Enqueued.FULL,
        ]


async def test_same_instance_can_be_reopened(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.add_device(device("d1"))
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(StoreUnavailable):
        await store.get_device("d1")
    await store.open()
    try:
        assert await store.get_device("d1") is not None
    finally:
        await store.close()


async def test_calls_before_open_are_refused(db_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await SqliteStore(db_path).list_devices()


async def test_unopenable_path_raises_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    store = SqliteStore(tmp_path / "a-file" / "fishchat.db")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.list_devices()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        raw.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreUnavailable, match="newer"):
        await SqliteStore(db_path).open()


async def test_a_version_1_file_is_migrated_and_keeps_its_devices(db_path: Path) -> None:
    # The schema of version 1: devices without the psk column.
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        raw.execute(
            "CREATE TABLE devices (id TEXT PRIMARY KEY, token_hash BLOB NOT NULL, v1 INTEGER"
            " NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT"
            " NULL DEFAULT 0, revoked_ms INTEGER NOT NULL DEFAULT 0, public_key TEXT NOT NULL"
            " DEFAULT '', meta TEXT NOT NULL DEFAULT '{}')"
        )
        raw.execute("INSERT INTO devices (id, token_hash) VALUES ('old', x'01')")
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
    async with opened(db_path) as store:
        old = await store.get_device("old")
        assert old is not None and old.psk == "" and old.token_hash == b"\x01"
        assert old.rotated_ms == 0
        await store.add_device(DeviceRecord("new", b"\x01" * 32, psk="sealed"))
        new = await store.get_device("new")
        assert new is not None and new.psk == "sealed"
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


async def test_another_process_changing_the_registry_is_noticed(db_path: Path) -> None:
    async with opened(db_path) as server, opened(db_path) as cli:
        changed = asyncio.Event()
        server.on_registry_change(changed.set)
        await cli.add_device(device("new-sensor"))
        await asyncio.wait_for(changed.wait(), timeout=3.0)
        assert await server.get_device("new-sensor") is not None


async def test_queue_lengths_stay_exact_when_another_process_writes(db_path: Path) -> None:
    async with opened(db_path) as server, opened(db_path) as cli:
        await server.enqueue([env("m1", "bob", 1), env("m2", "bob", 2)], max_len=3)
        assert await server.queue_depth("bob") == 2
        # e.g. an operator's `send` from the CLI
        assert await cli.enqueue([env("m3", "bob", 3)], max_len=3) == [Enqueued.STORED]
        assert await server.queue_depth("bob") == 3
        assert await server.enqueue([env("m4", "bob", 4)], max_len=3) == [Enqueued.FULL]
        assert await cli.ack("bob", ["m1", "m2"]) == 2
        assert await server.enqueue([env("m4", "bob", 4)], max_len=3) == [Enqueued.STORED]
        assert await server.queue_depths() == {"bob": 2}


async def test_many_concurrent_enqueues_all_land(db_path: Path) -> None:
    n = 2000
    async with opened(db_path) as store:
        results = await asyncio.gather(
            *(store.enqueue([env(f"m{i}", f"dev{i % 7}", i + 1)], max_len=n) for i in range(n))
        )
        assert results == [[Enqueued.STORED]] * n

    async with opened(db_path) as store:
        depths = await store.queue_depths()
        assert sum(depths.values()) == n and len(depths) == 7
        queued = await store.pending("dev0", 0, n)
        assert [e.okey for e in queued] == list(range(1, n + 1, 7))


async def test_close_finishes_calls_already_queued(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    calls = [asyncio.create_task(store.add_device(device(f"d{i:03}"))) for i in range(300)]
    await asyncio.sleep(0)  # every call is submitted, few if any have run
    await store.close()
    assert await asyncio.gather(*calls) == [None] * 300

    async with opened(db_path) as reopened:
        assert len(await reopened.list_devices()) == 300


async def test_too_many_waiting_calls_are_refused_and_write_nothing(db_path: Path) -> None:
    async with opened(db_path, queue_max=10) as store:
        with write_locked(db_path):
            # The worker is stuck waiting for the lock, so calls pile up behind it.
            calls = [asyncio.create_task(store.add_device(device(f"d{i:02}"))) for i in range(30)]
            await asyncio.sleep(0.2)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)

        refused = {f"d{i:02}" for i, o in enumerate(outcomes) if isinstance(o, StoreUnavailable)}
        accepted = {f"d{i:02}" for i, o in enumerate(outcomes) if o is None}
        assert len(refused) + len(accepted) == 30
        # At most one batch in the worker plus queue_max waiting got in.
        assert len(refused) >= 10
        assert {d.id for d in await store.list_devices()} == accepted
        # Once the backlog is gone the store takes calls again.
        await store.add_device(device("after"))


async def test_event_loop_runs_while_the_store_waits(db_path: Path) -> None:
    async with opened(db_path) as store:
        with write_locked(db_path):
            call = asyncio.create_task(store.add_device(device("d1")))
            await asyncio.sleep(0.1)
            # Had the store blocked the loop, the call would have run to its end
            # (failing on the lock) before this line ran.
            assert not call.done()
        await call
        assert await store.get_device("d1") is not None


async def test_event_loop_keeps_ticking_during_a_big_batch(db_path: Path) -> None:
    async with opened(db_path) as store:
        big = [env(f"m{i}", f"dev{i % 50}", i) for i in range(50_000)]
        call = asyncio.create_task(store.enqueue(big, max_len=len(big)))
        ticks_while_writing = 0

        async def ticker() -> None:
            nonlocal ticks_while_writing
            while not call.done():
                ticks_while_writing += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        results = await call
        await tick_task
        assert results == [Enqueued.STORED] * len(big)
        # A blocked loop would have let the ticker run at most once before the call.
        assert ticks_while_writing >= 3


async def test_a_call_failing_after_writing_is_undone_alone(db_path: Path) -> None:
    async with opened(db_path) as store:
        outcomes = await asyncio.gather(
            store.enqueue([env("a1", "bob", 1)], max_len=10),
            # Its first envelope is written before the second's okey collides with a1.
            store.enqueue([env("c1", "carol", 1), env("b2", "bob", 1)], max_len=10),
            store.add_device(device("d1")),
            store.enqueue([env("c2", "carol", 2)], max_len=10),
            return_exceptions=True,
        )
        assert outcomes[0] == [Enqueued.STORED]
        assert isinstance(outcomes[1], ValueError)
        assert outcomes[2] is None
        assert outcomes[3] == [Enqueued.STORED]
        # The failed call is atomic: carol's c1 went with it.
        assert [e.id for e in await store.pending("carol", 0, 10)] == ["c2"]
        assert await store.queue_depths() == {"bob": 1, "carol": 1}
        assert await store.queue_depth("carol") == 1
        assert await store.get_device("d1") is not None


async def test_concurrent_opens_both_wait_for_the_schema(db_path: Path) -> None:
    store = SqliteStore(db_path)
    try:
        await asyncio.gather(store.open(), store.open())
        await store.add_device(device("d1"))
        assert [d.id for d in await store.list_devices()] == ["d1"]
    finally:
        await store.close()


def _open_and_register(path: str, name: str, start: Any, out: Any) -> None:
    async def work() -> None:
        async with opened(Path(path)) as store:
            await store.add_device(device(name))

    start.wait()
    try:
        asyncio.run(work())
        out.put("ok")
    except StoreUnavailable as exc:
        out.put(f"{exc} ({exc.__cause__!r})")


def test_processes_creating_one_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """`device register` twice at once on a new data directory (the tests' register_many,
    and an operator's script): both processes create the file, and neither may be told
    it is locked. (Under load, one was: switching a new file to WAL upgrades a lock, and
    SQLite refuses a second upgrader at once instead of waiting.)"""
    ctx = multiprocessing.get_context("fork")
    racers = 6
    for attempt in range(10):
        path = str(tmp_path / f"{attempt}" / "fishchat.db")
        start, out = ctx.Barrier(racers), ctx.Queue()
        procs = [
            ctx.Process(target=_open_and_register, args=(path, f"d{i}", start, out))
            for i in range(racers)
        ]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert results == ["ok"] * racers
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == racers


def refuse_opens(
    monkeypatch: pytest.MonkeyPatch, times: int, text: str = "database is locked"
) -> list[int]:
    """SQLite's answer to a second process upgrading its lock on a new file, given
    ``times`` times before the real open (it cannot be provoked on demand). Returns the
    count of opens tried, in a one-item list."""
    calls = [0]
    real = SqliteStore._connect_once

    def connect_once(store: SqliteStore) -> sqlite3.Connection:
        calls[0] += 1
        if calls[0] <= times:
            raise sqlite3.OperationalError(text)
        return real(store)

    monkeypatch.setattr(SqliteStore, "_connect_once", connect_once)
    return calls


async def test_an_open_refused_as_locked_is_tried_again(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = refuse_opens(monkeypatch, times=3)
    async with opened(db_path) as store:
        await store.add_device(device("d1"))
        assert [d.id for d in await store.list_devices()] == ["d1"]
    assert calls == [4]


async def test_an_open_locked_for_longer_than_the_busy_timeout_fails(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_BUSY_TIMEOUT_MS", 300)
    calls = refuse_opens(monkeypatch, times=10**6)
    store = SqliteStore(db_path)
    with pytest.raises(StoreUnavailable, match="database is locked"):
        await store.open()
    assert 2 <= calls[0] < 100  # tried again with a growing pause, then gave up


async def test_other_open_errors_are_not_tried_again(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = refuse_opens(monkeypatch, times=1, text="disk I/O error")
    store = SqliteStore(db_path)
    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        await store.open()
    assert calls == [1]
