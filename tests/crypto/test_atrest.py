"""Sealing at rest: bodies that are not end-to-end sealed (v1 sessions, plaintext token
sessions) are in the durable queue only as ciphertext under the server key, which lives
in ``{data_dir}/server.key`` (mode 0600), not in the database; they are delivered as
sent."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from support.raw_client import RawClient
from support.server import ServerProcess
from support.waiting import eventually

from fishchat_iot.core.envelope import Envelope
from fishchat_iot.crypto import CryptoError
from fishchat_iot.crypto.atrest import ENC_AT_REST, AtRest, load_server_key

from .test_e2e_server import register, scan


def queued(server: ServerProcess, device_id: str) -> int:
    with contextlib.closing(sqlite3.connect(server.data_dir / "fishchat.db")) as db:
        row = db.execute("SELECT count(*) FROM offline WHERE device = ?", (device_id,)).fetchone()
    return int(row[0])


def key_mode(server: ServerProcess) -> int:
    return stat.S_IMODE((server.data_dir / "server.key").stat().st_mode)


def test_at_rest_round_trip_and_tamper(tmp_path: Path) -> None:
    key = load_server_key(tmp_path / "server.key")
    assert key == load_server_key(tmp_path / "server.key")
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    a = AtRest(key)
    env = Envelope("m1", "alice", "bob", "plain body", 1234, 7)
    sealed = a.seal(env)
    assert sealed.enc == ENC_AT_REST and "plain body" not in sealed.body
    assert env.body == "plain body"  # the original (maybe still in flight) is untouched
    assert a.open(sealed) == env
    moved = Envelope("m1", "alice", "carol", sealed.body, 1234, 7, enc=ENC_AT_REST)
    assert a.open(moved).enc == ENC_AT_REST  # does not open for another recipient
    e2e = Envelope("m2", "alice", "bob", "c2VhbGVk", 1, 8, enc="x25519-chacha20poly1305")
    assert a.seal(e2e) is e2e
    os.chmod(tmp_path / "server.key", 0o644)
    with pytest.raises(CryptoError):
        load_server_key(tmp_path / "server.key")


async def test_v1_and_plaintext_bodies_are_sealed_in_the_queue(
    up_server_factory: Any, uid: str
) -> None:
    server: ServerProcess = up_server_factory()
    assert key_mode(server) == 0o600
    bv = register(server, f"{uid}-v", v1=True)
    bt = register(server, f"{uid}-t")
    marker = f"ATREST-{os.urandom(6).hex()}"
    async with await RawClient.connect(server.msg_server) as v:
        await v.login_v1(bv["id"])
        await v.send("SEND_MESSAGE_P2P", bt["id"], f"{marker} from v1", bv["id"])
        # v1 has no receipts: wait until it is queued, or the token login below may
        # replace the v1 session before the server has read the frame (v1 sends are
        # lost with their connection, by protocol)
        await eventually(lambda: queued(server, bt["id"]) == 1, "the v1 message is queued")
        async with await RawClient.connect(server.msg_server) as p:
            await p.login(bv["id"], bv["token"])  # a token session of the v1 device
            await p.send("SEND_MESSAGE_P2P", bt["id"], f"{marker} plain", "", "p-1")
            assert await p.expect("ACCEPTED") == ["p-1"]
    assert scan(server, marker.encode()) == []
    async with await RawClient.connect(server.msg_server) as t:
        await t.login(bt["id"], bt["token"])
        got = set()
        for _ in range(2):
            args = await t.expect("RESP_MESSAGE_P2P")
            assert len(args) == 4  # plaintext delivery: no enc argument
            got.add(args[0])
            await t.ack(bt["id"], args[2])
        assert got == {f"{marker} from v1", f"{marker} plain"}
    server.stop()
    assert scan(server, marker.encode()) == []
