"""Every ``fishchat-iot`` command end to end: the installed console script runs as a
subprocess against a temporary ``--data-dir`` and the real SQLite store; the tests read
stdout, stderr, exit codes, the bundle files and the store itself.

Each subprocess costs ~0.3 s, so read-only checks share one module-scoped registry and
independent error cases run in parallel (``run_many``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from fishchat_iot.auth import token_matches
from fishchat_iot.stores.base import DeviceRecord, TopicRecord
from fishchat_iot.stores.sqlite import SqliteStore

_SCRIPT = Path(sys.executable).with_name("fishchat-iot")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fishchat_iot.cli.main"]


@dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def ok(self) -> Result:
        assert self.code == 0, f"{self.argv} exited {self.code}: {self.err}"
        assert self.err == ""
        return self


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHCHAT_")}
    env.update(extra or {})
    return env


def run(
    *args: str | Path,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Result:
    """``fishchat-iot [--data-dir DIR] args...``; never inherits FISHCHAT_* variables."""
    argv = [*CLI, *(["--data-dir", str(data_dir)] if data_dir else []), *map(str, args)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=_env(env), cwd=cwd, timeout=60, check=False
    )
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def run_many(*calls: tuple[str | Path, ...], data_dir: Path) -> list[Result]:
    """Independent invocations at once (they only read, or fail before writing)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda call: run(*call, data_dir=data_dir), calls))


def assert_error(result: Result, *fragments: str, code: int = 1) -> None:
    """One ``error: ...`` line on stderr, nothing on stdout, no traceback."""
    assert result.code == code, f"{result.argv}: exit {result.code}, stderr {result.err!r}"
    assert result.out == ""
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, f"{result.argv}: expected one line, got {result.err!r}"
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def store_get(data_dir: Path, device_id: str) -> DeviceRecord | None:
    async def go() -> DeviceRecord | None:
        store = SqliteStore(data_dir / "fishchat.db")
        await store.open()
        try:
            return await store.get_device(device_id)
        finally:
            await store.close()

    return asyncio.run(go())


def store_topic(data_dir: Path, name: str) -> TopicRecord | None:
    async def go() -> TopicRecord | None:
        store = SqliteStore(data_dir / "fishchat.db")
        await store.open()
        try:
            return await store.get_topic(name)
        finally:
            await store.close()

    return asyncio.run(go())


@dataclass
class Registry:
    """A data dir with lamp-1 (token only), sensor-2 (--v1, registered with --json),
    owner-3, and the open topic "kitchen" owned by lamp-1."""

    data_dir: Path
    lamp: Result
    sensor: Result


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    lamp = run("device", "register", "lamp-1", data_dir=data_dir).ok()
    sensor = run("device", "register", "sensor-2", "--v1", "--json", data_dir=data_dir).ok()
    run("device", "register", "owner-3", data_dir=data_dir).ok()
    run("topic", "create", "kitchen", "--owner", "lamp-1", data_dir=data_dir).ok()
    yield Registry(data_dir, lamp, sensor)


@dataclass
class LockedStore:
    """Two commands started against a store whose write lock is held."""

    data_dir: Path
    holder: sqlite3.Connection
    procs: list[tuple[list[str], subprocess.Popen[str]]]

    def results(self) -> list[Result]:
        results = []
        for argv, proc in self.procs:
            out, err = proc.communicate(timeout=60)
            results.append(Result(argv, proc.returncode, out, err))
        self.holder.close()
        return results


@pytest.fixture(scope="module", autouse=True)
def locked_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedStore]:
    """Set up before the module's first test, so the commands wait out the store's busy
    timeout (5 s) while the other tests run; ``test_store_locked`` collects them."""
    data_dir = tmp_path_factory.mktemp("locked")
    run("device", "register", "a", data_dir=data_dir).ok()
    holder = sqlite3.connect(data_dir / "fishchat.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what a stuck writer would hold
    argvs = [
        [*CLI, "--data-dir", str(data_dir), *args]
        for args in (("device", "register", "b"), ("device", "revoke", "a"))
    ]
    procs = [
        (argv, subprocess.Popen(argv, stdout=PIPE, stderr=PIPE, text=True, env=_env(None)))
        for argv in argvs
    ]
    locked = LockedStore(data_dir, holder, procs)
    yield locked
    for _, proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    holder.close()


# -- device register ------------------------------------------------------------------


def test_register_prints_token_once_and_writes_a_private_bundle(reg: Registry) -> None:
    lines = reg.lamp.out.splitlines()
    assert lines[0] == "registered device 'lamp-1' (token login)"
    token = next(line.split()[1] for line in lines if line.startswith("token:"))
    assert reg.lamp.out.count(token) == 1
    assert "shown only now" in reg.lamp.out
    bundle_path = reg.data_dir.resolve() / "bundles" / "lamp-1.json"
    assert f"bundle: {bundle_path} (mode 0600)" in lines

    assert stat.S_IMODE(bundle_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle_path.parent.stat().st_mode) == 0o700
    bundle = json.loads(bundle_path.read_text())
    assert {"id", "token", "gateway", "msg_server", "mqtt", "v1", "created_ms"} <= set(bundle)
    assert bundle["id"] == "lamp-1"
    assert bundle["token"] == token
    assert bundle["gateway"] == ["127.0.0.1:17000"]
    assert bundle["msg_server"] == ["127.0.0.1:19000"]
    assert bundle["mqtt"] == ["127.0.0.1:1883"]
    assert bundle["v1"] is False

    device = store_get(reg.data_dir, "lamp-1")
    assert device is not None
    assert token_matches(token, device.token_hash)
    assert not token_matches(token + "x", device.token_hash)
    assert device.created_ms == bundle["created_ms"]
    assert not device.v1 and not device.revoked
    # Only the hash is stored: the token is nowhere in the database files.
    for db_file in reg.data_dir.glob("fishchat.db*"):
        assert token.encode() not in db_file.read_bytes()


def test_register_json_v1(reg: Registry) -> None:
    doc = reg.sensor.json()
    assert set(doc) == {"id", "token", "bundle", "v1", "psk"}
    assert doc["psk"] is False
    assert doc["id"] == "sensor-2" and doc["v1"] is True
    assert Path(doc["bundle"]) == reg.data_dir.resolve() / "bundles" / "sensor-2.json"
    bundle = json.loads(Path(doc["bundle"]).read_text())
    assert bundle["token"] == doc["token"] and bundle["v1"] is True
    device = store_get(reg.data_dir, "sensor-2")
    assert device is not None and device.v1
    assert token_matches(doc["token"], device.token_hash)


def test_register_bundle_option_and_config(tmp_path: Path) -> None:
    config = tmp_path / "fc.toml"
    config.write_text('[node]\nadvertise_host = "::1"\n[tcp]\ngateway_port = 27000\n')
    target = tmp_path / "new" / "dir" / "b.json"
    result = run(
        "--config", config, "device", "register", "x:y_z.1", "--bundle", target, "--json",
        data_dir=tmp_path / "d",
    ).ok()  # fmt: skip
    assert result.json()["bundle"] == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    bundle = json.loads(target.read_text())
    assert bundle["gateway"] == ["[::1]:27000"]
    assert bundle["msg_server"] == ["[::1]:19000"]
    assert not (tmp_path / "d" / "bundles").exists()


def test_register_duplicate_id_keeps_everything(reg: Registry) -> None:
    bundle_path = reg.data_dir / "bundles" / "lamp-1.json"
    before = bundle_path.read_bytes()
    device = store_get(reg.data_dir, "lamp-1")
    result = run("device", "register", "lamp-1", data_dir=reg.data_dir)
    assert_error(result, "device 'lamp-1' already exists", "choose another id")
    assert bundle_path.read_bytes() == before
    assert store_get(reg.data_dir, "lamp-1") == device


def test_register_invalid_ids(tmp_path: Path) -> None:
    bad = ["a/b", "x" * 65, "sp ace", "", "fc/+/#", "tab\there", "é"]
    results = run_many(*(("device", "register", "--", i) for i in bad), data_dir=tmp_path)
    for result in results:
        assert_error(result, "invalid device id", "1 to 64 characters", "no '/'")
    assert "'tab\\there'" in results[5].err  # control characters shown escaped
    assert not tmp_path.joinpath("fishchat.db").exists()
    # 64 characters is fine.
    run("device", "register", "y" * 64, data_dir=tmp_path).ok()


def test_register_refuses_to_replace_a_file_and_rolls_back(tmp_path: Path) -> None:
    existing = tmp_path / "taken.json"
    existing.write_text("keep me")
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    taken, unwritable = run_many(
        ("device", "register", "d1", "--bundle", existing),
        ("device", "register", "d2", "--bundle", blocker / "b.json"),
        data_dir=tmp_path / "data",
    )
    assert_error(taken, f"bundle file {existing} already exists", "--bundle FILE")
    assert "the device was not registered" in taken.err
    assert existing.read_text() == "keep me"
    assert_error(unwritable, str(blocker), "--bundle FILE", "the device was not registered")
    assert store_get(tmp_path / "data", "d1") is None
    assert store_get(tmp_path / "data", "d2") is None


# -- device list / show / revoke ------------------------------------------------------


def test_device_list(reg: Registry) -> None:
    table, as_json = run_many(
        ("device", "list"), ("device", "list", "--json"), data_dir=reg.data_dir
    )
    lines = table.ok().out.splitlines()
    assert lines[0].split() == ["ID", "V1", "REVOKED", "CREATED", "(UTC)", "QUEUED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["lamp-1"][1:3] == ["no", "no"]
    assert rows["sensor-2"][1:3] == ["yes", "no"]
    assert rows["lamp-1"][-1] == "0"
    assert len({len(line) for line in lines}) == 1  # aligned; QUEUED is right-aligned
    docs = {d["id"]: d for d in as_json.ok().json()}
    assert {"lamp-1", "sensor-2", "owner-3"} <= set(docs)
    assert docs["sensor-2"]["v1"] is True
    assert set(docs["lamp-1"]) == {
        *("id", "v1", "revoked", "created_ms", "revoked_ms", "queued", "psk")
    }
    assert docs["lamp-1"]["psk"] is False
    assert "token" not in as_json.out and "hash" not in as_json.out


def test_device_show_never_prints_secrets(reg: Registry) -> None:
    token = json.loads((reg.data_dir / "bundles" / "lamp-1.json").read_text())["token"]
    text, as_json, unknown = run_many(
        ("device", "show", "lamp-1"),
        ("device", "show", "lamp-1", "--json"),
        ("device", "show", "ghost"),
        data_dir=reg.data_dir,
    )
    assert "id:" in text.ok().out and "lamp-1" in text.out
    assert "state:           active" in text.out
    assert "kitchen" in text.out  # its topics
    doc = as_json.ok().json()
    assert doc["id"] == "lamp-1" and doc["topics"] == ["kitchen"] and doc["queued"] == 0
    for result in (text, as_json):
        assert token not in result.out
        assert "hash" not in result.out.lower()
    assert_error(unknown, "no device 'ghost'", "fishchat-iot device list")


def test_device_revoke(tmp_path: Path) -> None:
    run("device", "register", "victim", data_dir=tmp_path).ok()
    first = run("device", "revoke", "victim", data_dir=tmp_path).ok()
    assert first.out.startswith("revoked device 'victim' at ")
    device = store_get(tmp_path, "victim")
    assert device is not None and device.revoked and device.revoked_ms > 0
    again, again_json, unknown, listed = run_many(
        ("device", "revoke", "victim"),
        ("device", "revoke", "victim", "--json"),
        ("device", "revoke", "ghost"),
        ("device", "list", "--json"),
        data_dir=tmp_path,
    )
    assert "already revoked" in again.ok().out
    assert again_json.ok().json() == {
        "id": "victim",
        "revoked": True,
        "revoked_ms": device.revoked_ms,  # the first time is kept
        "already_revoked": True,
    }
    assert_error(unknown, "no device 'ghost'")
    assert listed.json()[0]["revoked"] is True


# -- topics ---------------------------------------------------------------------------


def test_topic_create(reg: Registry) -> None:
    closed = run(
        "topic", "create", "secret", "--owner", "sensor-2", "--closed", "--json",
        data_dir=reg.data_dir,
    ).ok()  # fmt: skip
    doc = closed.json()
    assert doc["name"] == "secret" and doc["owner"] == "sensor-2"
    assert doc["open"] is False and doc["members"] == ["sensor-2"]
    topic = store_topic(reg.data_dir, "kitchen")
    assert topic is not None and topic.open and topic.owner == "lamp-1"
    assert "lamp-1" in topic.members


def test_topic_create_errors(reg: Registry) -> None:
    results = run_many(
        ("topic", "create", "kitchen", "--owner", "lamp-1"),
        ("topic", "create", "new", "--owner", "ghost"),
        ("topic", "create", "a/b", "--owner", "lamp-1"),
        ("topic", "create", "a+", "--owner", "lamp-1"),
        ("topic", "create", "#", "--owner", "lamp-1"),
        ("topic", "create", "t" * 129, "--owner", "lamp-1"),
        ("topic", "create", "line\nbreak", "--owner", "lamp-1"),
        data_dir=reg.data_dir,
    )
    assert_error(results[0], "topic 'kitchen' already exists", "choose another name")
    assert_error(results[1], "no device 'ghost'")
    for result in results[2:]:
        assert_error(result, "invalid topic name", "1 to 128 characters")
    assert "'line\\nbreak'" in results[6].err
    missing_owner = run("topic", "create", "x", data_dir=reg.data_dir)
    assert missing_owner.code == 2 and "--owner" in missing_owner.err  # argparse usage


def test_topic_members(tmp_path: Path) -> None:
    for device in ("a", "b", "gone"):
        run("device", "register", device, data_dir=tmp_path).ok()
    run("device", "revoke", "gone", data_dir=tmp_path).ok()
    run("topic", "create", "room", "--owner", "a", data_dir=tmp_path).ok()
    added = run("topic", "add", "room", "b", data_dir=tmp_path).ok()
    assert added.out == "added device 'b' to topic 'room' (2 members)\n"
    again, unknown_dev, revoked, unknown_topic = run_many(
        ("topic", "add", "room", "b", "--json"),
        ("topic", "add", "room", "ghost"),
        ("topic", "add", "room", "gone"),
        ("topic", "add", "nope", "b"),
        data_dir=tmp_path,
    )
    assert again.ok().json() == {
        "topic": "room",
        "device": "b",
        "changed": False,
        "members": ["a", "b"],
    }
    assert_error(unknown_dev, "no device 'ghost'")
    assert_error(revoked, "device 'gone' is revoked")
    assert_error(unknown_topic, "no topic 'nope'", "topic create")
    topic = store_topic(tmp_path, "room")
    assert topic is not None and topic.members == {"a", "b"}

    removed = run("topic", "remove", "room", "b", data_dir=tmp_path).ok()
    assert removed.out == "removed device 'b' from topic 'room' (1 member left)\n"
    not_member, ghost, no_topic, owner = run_many(
        ("topic", "remove", "room", "b", "--json"),
        ("topic", "remove", "room", "ghost"),
        ("topic", "remove", "nope", "a"),
        ("topic", "show", "room", "--json"),
        data_dir=tmp_path,
    )
    assert not_member.ok().json()["changed"] is False
    assert_error(ghost, "no device 'ghost'")
    assert_error(no_topic, "no topic 'nope'")
    assert owner.ok().json()["members"] == ["a"]
    topic = store_topic(tmp_path, "room")
    assert topic is not None and topic.members == {"a"}


def test_topic_list_and_show(reg: Registry) -> None:
    run("topic", "add", "kitchen", "owner-3", data_dir=reg.data_dir).ok()
    table, as_json, show, unknown = run_many(
        ("topic", "list"),
        ("topic", "list", "--json"),
        ("topic", "show", "kitchen"),
        ("topic", "show", "ghost-topic"),
        data_dir=reg.data_dir,
    )
    lines = table.ok().out.splitlines()
    assert lines[0].split() == ["NAME", "OWNER", "ACCESS", "MEMBERS", "MEMBER", "IDS"]
    kitchen = next(line for line in lines if line.startswith("kitchen "))
    assert kitchen.split()[:4] == ["kitchen", "lamp-1", "open", "2"]
    assert kitchen.endswith("lamp-1, owner-3")
    docs = {t["name"]: t for t in as_json.ok().json()}
    assert docs["kitchen"]["members"] == ["lamp-1", "owner-3"]
    assert docs["kitchen"]["open"] is True
    assert "  owner-3" in show.ok().out.splitlines()
    assert_error(unknown, "no topic 'ghost-topic'")


# -- status ---------------------------------------------------------------------------


def _write_status(data_dir: Path, pid: int, updated_ms: int) -> None:
    doc = {
        "pid": pid,
        "started_ms": updated_ms - 60_000,
        "updated_ms": updated_ms,
        "version": "0.1.0",
        "listeners": {"gateway": "127.0.0.1:17000", "msg_server": "127.0.0.1:19000"},
        "nodes": [
            {
                "node_id": "ms-1",
                "role": "msg_server",
                "address": "127.0.0.1:19000",
                "sessions": 3,
                "msgs_in": 10,
                "msgs_out": 7,
            },
            {
                "node_id": "ms-2",
                "role": "msg_server",
                "address": "127.0.0.1:19001",
                "sessions": 2,
                "msgs_in": 0,
                "msgs_out": 0,
            },
        ],
    }
    (data_dir / "status.json").write_text(json.dumps(doc))


def test_status_not_running(tmp_path: Path) -> None:
    run("device", "register", "a", data_dir=tmp_path).ok()
    run("device", "register", "b", data_dir=tmp_path).ok()
    run("device", "revoke", "b", data_dir=tmp_path).ok()
    text, as_json = run_many(("status",), ("status", "--json"), data_dir=tmp_path)
    assert text.code == 3 and text.err == ""
    assert text.out.startswith("server:  not running: no status file")
    assert "devices: 2 (1 revoked)" in text.out
    assert as_json.code == 3
    doc = as_json.json()
    assert doc["running"] is False and doc["state"] == "stopped"
    assert doc["store"]["devices"] == 2 and doc["store"]["revoked"] == 1
    assert doc["store"]["topics"] == 0 and doc["store"]["queued"] == 0

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    _write_status(tmp_path, exited.pid, int(time.time() * 1000))
    dead, stale = run_many(("status", "--json"), ("status",), data_dir=tmp_path)
    assert dead.code == 3 and dead.json()["state"] == "stopped"
    assert f"pid {exited.pid} has exited" in dead.json()["detail"]
    assert dead.json()["listeners"] == {}

    _write_status(tmp_path, os.getpid(), int(time.time() * 1000) - 60_000)
    stale = run("status", "--json", data_dir=tmp_path)
    assert stale.code == 3 and stale.json()["state"] == "not_responding"


def test_status_running(reg: Registry) -> None:
    _write_status(reg.data_dir, os.getpid(), int(time.time() * 1000))
    try:
        text, as_json = run_many(("status",), ("--json", "status"), data_dir=reg.data_dir)
    finally:
        (reg.data_dir / "status.json").unlink()
    assert text.code == 0, text.err
    assert text.out.startswith(f"server:    running: pid {os.getpid()}")
    assert "listeners: gateway 127.0.0.1:17000, msg_server 127.0.0.1:19000" in text.out
    assert "sessions:  5" in text.out
    node_line = next(line for line in text.out.splitlines() if line.startswith("ms-1"))
    assert node_line.split() == ["ms-1", "msg_server", "127.0.0.1:19000", "3", "10", "7"]
    assert as_json.code == 0
    doc = as_json.json()
    assert doc["running"] is True and doc["pid"] == os.getpid()
    assert doc["listeners"]["msg_server"] == "127.0.0.1:19000"
    assert doc["sessions"] == 5 and len(doc["nodes"]) == 2
    assert doc["store"]["devices"] >= 3 and doc["store"]["topics"] >= 1


def test_status_with_no_store_creates_nothing(tmp_path: Path) -> None:
    result = run("status", "--json", data_dir=tmp_path / "none")
    assert result.code == 3
    assert result.json()["store"] == {
        "path": str(tmp_path / "none" / "fishchat.db"),
        "exists": False,
        "devices": 0,
        "revoked": 0,
        "topics": 0,
        "queued": 0,
    }
    assert not (tmp_path / "none").exists()


# -- errors and global options --------------------------------------------------------


def test_config_errors(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[node\nid = 1\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"node": ')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[node]\nbogus = 1\n")
    results = run_many(
        ("--config", tmp_path / "missing.toml", "device", "list"),
        ("--config", tmp_path, "device", "list"),
        ("--config", bad_toml, "device", "register", "x"),
        ("device", "list", "--config", bad_json),
        ("--config", unknown, "status"),
        data_dir=tmp_path / "data",
    )
    assert_error(results[0], "missing.toml does not exist", "--config")
    assert_error(results[1], "cannot read config file")
    assert_error(results[2], "bad.toml: invalid TOML", "fix the file")
    assert_error(results[3], "bad.json: invalid JSON", "fix the file")
    assert_error(results[4], "unknown option node.bogus")
    assert not (tmp_path / "data").exists()


def test_data_dir_sources(tmp_path: Path) -> None:
    config = tmp_path / "fc.json"
    config.write_text(json.dumps({"node": {"data_dir": str(tmp_path / "from-config")}}))
    run("--config", config, "device", "register", "c").ok()
    env = {"FISHCHAT_DATA_DIR": str(tmp_path / "from-env")}
    run("--config", config, "device", "register", "e", env=env).ok()
    run("device", "register", "o", data_dir=tmp_path / "from-option", env=env).ok()
    run("device", "register", "d", cwd=tmp_path).ok()  # default ./data
    assert store_get(tmp_path / "from-config", "c") is not None
    assert store_get(tmp_path / "from-env", "e") is not None
    assert store_get(tmp_path / "from-option", "o") is not None
    assert store_get(tmp_path / "data", "d") is not None
    after = run("device", "list", "--json", "--data-dir", tmp_path / "from-option", env=env)
    assert [d["id"] for d in after.ok().json()] == ["o"]


def test_data_dir_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("device", "register", "x", data_dir=blocker / "sub")
    assert_error(result, f"cannot create data directory {blocker / 'sub'}", "--data-dir")


def test_read_commands_without_a_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "empty"
    listed, listed_json, topics, show, revoke, add = run_many(
        ("device", "list"),
        ("device", "list", "--json"),
        ("topic", "list", "--json"),
        ("device", "show", "x"),
        ("device", "revoke", "x"),
        ("topic", "add", "t", "x"),
        data_dir=data_dir,
    )
    assert listed.ok().out.startswith("no devices registered in")
    assert listed_json.ok().json() == [] and topics.ok().json() == []
    for result in (show, revoke, add):
        assert_error(result, f"no store at {data_dir / 'fishchat.db'}", "--data-dir")
    assert not data_dir.exists()


def test_store_not_a_database(tmp_path: Path) -> None:
    tmp_path.joinpath("fishchat.db").write_bytes(b"this is not sqlite" * 100)
    assert_error(run("device", "list", data_dir=tmp_path), "not a usable FishChat store")


def test_usage_errors_stay_argparse(tmp_path: Path) -> None:
    none, unknown, missing = run_many(
        (), ("device", "frobnicate"), ("device", "show"), data_dir=tmp_path
    )
    for result in (none, unknown, missing):
        assert result.code == 2
        assert "usage: fishchat-iot" in result.err
        assert "Traceback" not in result.err
    version = run("--version").ok()
    assert version.out.startswith("fishchat-iot ")


def test_help_lists_the_commands() -> None:
    result = run("--help").ok()
    for command in ("device", "topic", "status"):
        assert command in result.out
    device_help = run("device", "register", "--help").ok()
    assert "--bundle FILE" in device_help.out and "--v1" in device_help.out
    assert "--json" in device_help.out  # global options are accepted after the command


def test_store_locked(locked_store: LockedStore) -> None:
    # Last in the module: by now both commands have waited out the busy timeout.
    for result in locked_store.results():
        assert_error(result, "is locked by another process", "retry")
    assert not (locked_store.data_dir / "bundles" / "b.json").exists()
    assert store_get(locked_store.data_dir, "b") is None
    device = store_get(locked_store.data_dir, "a")
    assert device is not None and not device.revoked
