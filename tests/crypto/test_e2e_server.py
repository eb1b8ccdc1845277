"""End-to-end encryption against a real ``fishchat-iot up``: sealed p2p and topic
messages arrive and open; the plaintext never reaches the server's SQLite file or log;
tampered, moved and replayed messages are rejected by the receiving SDK; topic key
rotation locks a removed member out and a late joiner in; provisioning keys."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from support.raw_client import RawClient
from support.server import ServerProcess
from support.waiting import eventually, nothing_more

from firmware_sim.tcp_device import Message, TcpDevice
from fishchat_iot import errors
from fishchat_iot.crypto import CryptoError, b64d, public_from_private
from fishchat_iot.crypto.device import DeviceCrypto


def register(server: ServerProcess, device_id: str, v1: bool = False) -> dict[str, Any]:
    out = json.loads(
        server.cli("device", "register", device_id, *(["--v1"] if v1 else []), "--json").stdout
    )
    bundle: dict[str, Any] = json.loads(Path(out["bundle"]).read_text())
    bundle["bundle_path"] = out["bundle"]
    return bundle


def file_mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def read_json(path: str | Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(path).read_text())
    return doc


def device(server: ServerProcess, bundle: dict[str, Any], **kw: Any) -> TcpDevice:
    kw.setdefault("backoff_max", 0.5)
    return TcpDevice.from_bundle(
        bundle, gateway=server.gateway, msg_server=server.msg_server, e2e=True, **kw
    )


def scan(server: ServerProcess, marker: bytes) -> list[str]:
    """Where ``marker`` occurs: the SQLite file, its WAL, the server's log."""
    db = server.data_dir / "fishchat.db"
    found = []
    for path in (db, Path(f"{db}-wal"), server.log_path):
        if path.exists() and marker in path.read_bytes():
            found.append(str(path))
    return found


@pytest.fixture
def server(up_server_factory: Any) -> ServerProcess:
    return up_server_factory()  # type: ignore[no-any-return]


async def test_provisioning_stores_only_the_public_key(server: ServerProcess, uid: str) -> None:
    b = register(server, f"{uid}-a")
    path = b["bundle_path"]
    assert file_mode(path) == 0o600
    priv = b64d(b["private_key"])
    assert base64.b64encode(public_from_private(priv)).decode() == b["public_key"]
    shown = json.loads(server.cli("device", "show", b["id"], "--json").stdout)
    assert shown["public_key"] == b["public_key"]
    text = server.cli("device", "show", b["id"]).stdout
    assert b["private_key"] not in text and b["token"] not in text
    db = (server.data_dir / "fishchat.db").read_bytes()
    wal = server.data_dir / "fishchat.db-wal"
    stored = db + (wal.read_bytes() if wal.exists() else b"")
    assert b["private_key"].encode() not in stored and priv not in stored
    # rotate: new token and keys, a new bundle; the old token is refused
    out = json.loads(server.cli("device", "rotate", b["id"], "--json").stdout)
    nb = read_json(out["bundle"])
    assert out["bundle"] == path and file_mode(path) == 0o600
    assert nb["token"] != b["token"] and nb["private_key"] != b["private_key"]
    assert nb["public_key"] == out["public_key"]
    shown = json.loads(server.cli("device", "show", b["id"], "--json").stdout)
    assert shown["public_key"] == nb["public_key"]
    async with await RawClient.connect(server.msg_server) as c:
        await c.send("SEND_CLIENT_ID", b["id"], b["token"])
        await c.expect_error(errors.AUTH_FAILED)
    async with device(server, nb) as dev:
        assert await dev.public_key(b["id"]) == b64d(nb["public_key"])


async def test_p2p_and_topic_arrive_open_and_never_in_the_clear(
    server: ServerProcess, uid: str
) -> None:
    ba, bb, bc = (register(server, f"{uid}-{n}") for n in "abc")
    marker = f"MARKER-{os.urandom(6).hex()}"
    async with device(server, ba) as a:
        # b is offline: the sealed message is stored in b's durable queue
        await a.send(bb["id"], f"{marker} p2p")
        assert scan(server, marker.encode()) == []
        topic = f"{uid}-t"
        await a.create_topic(topic)
        async with device(server, bb) as b, device(server, bc) as c:
            msg = await b.receive(timeout=10)
            assert (msg.kind, msg.sender, msg.text) == ("p2p", ba["id"], f"{marker} p2p")
            assert msg.enc == "x25519-chacha20poly1305"
            await b.join_topic(topic)
            await c.join_topic(topic)
            assert await a.share_topic_key(topic, [bb["id"], bc["id"]]) == 1
            await eventually(lambda: b.topic_keys_received == 1, "b has the topic key")
            await eventually(lambda: c.topic_keys_received == 1, "c has the topic key")
            await a.publish(topic, f"{marker} topic")
            for dev in (b, c):
                m = await dev.receive(timeout=10)
                assert (m.kind, m.topic, m.text) == ("topic", topic, f"{marker} topic")
                assert m.enc == "group-chacha20poly1305:1"
            # b replies, sealed, p2p
            await b.send(ba["id"], f"{marker} reply")
            m = await a.receive(timeout=10)
            assert m.text == f"{marker} reply"
        # c offline: a topic message waits in its queue, sealed
        await a.publish(topic, f"{marker} stored topic")
        assert scan(server, marker.encode()) == []
        async with device(server, bc) as c2:
            c2.crypto = c.crypto  # the same device, rebooted with the keys it learnt
            m = await c2.receive(timeout=10)
            assert m.text == f"{marker} stored topic"
    assert scan(server, marker.encode()) == []
    server.stop()
    assert scan(server, marker.encode()) == []


async def test_tampered_moved_and_replayed_messages_are_rejected(
    server: ServerProcess, uid: str
) -> None:
    ba, bb, bc = (register(server, f"{uid}-{n}") for n in "abc")
    # The attacker holds a's credentials and writes frames by hand.
    ca = DeviceCrypto.from_b64(ba["id"], ba["private_key"])
    ca.add_peer(bb["id"], b64d(bb["public_key"]))
    ca.add_peer(bc["id"], b64d(bc["public_key"]))
    async with device(server, bb) as b, await RawClient.connect(server.msg_server) as raw:
        await raw.login(ba["id"], ba["token"])

        async def send(to: str, sealed: str, mid: str) -> None:
            await raw.send("SEND_MESSAGE_P2P_E2E", to, sealed, "x25519-chacha20poly1305", mid)
            assert await raw.expect("ACCEPTED") == [mid]

        body, _ = ca.seal_p2p(bb["id"], "ok-1", "first")
        await send(bb["id"], body, "ok-1")
        assert (await b.receive(timeout=10)).text == "first"
        # flipped bit in the body
        raw_body = bytearray(b64d(ca.seal_p2p(bb["id"], "t-1", "flipped")[0]))
        raw_body[-20] ^= 0x04
        await send(bb["id"], base64.b64encode(raw_body).decode(), "t-1")
        # flipped bit in the header: ts in the prefix; and the id changed
        raw_body = bytearray(b64d(ca.seal_p2p(bb["id"], "t-2", "header")[0]))
        raw_body[12] ^= 0x01
        await send(bb["id"], base64.b64encode(raw_body).decode(), "t-2")
        body, _ = ca.seal_p2p(bb["id"], "t-3", "other id")
        await send(bb["id"], body, "t-3x")
        # sealed for c, moved to b
        body, _ = ca.seal_p2p(bc["id"], "t-4", "for c")
        await send(bb["id"], body, "t-4")
        # a topic body in a p2p delivery
        await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], body, "group-chacha20poly1305:1", "t-5")
        assert await raw.expect("ACCEPTED") == ["t-5"]
        await eventually(lambda: b.open_failed == 5, "5 tampered messages rejected")
        # replay of an old id (already delivered and acked): not delivered twice
        body, _ = ca.seal_p2p(bb["id"], "ok-1", "first")
        await send(bb["id"], body, "ok-1")
        await eventually(lambda: b.duplicates == 1, "replay absorbed")
        body, _ = ca.seal_p2p(bb["id"], "ok-2", "second")
        await send(bb["id"], body, "ok-2")
        assert (await b.receive(timeout=10)).text == "second"
        await nothing_more(b)
        assert b.opened == 2


async def test_removed_member_locked_out_late_joiner_let_in(
    server: ServerProcess, uid: str
) -> None:
    ba, bb, bc, bd = (register(server, f"{uid}-{n}") for n in "abcd")
    topic = f"{uid}-t"
    async with device(server, ba) as a, device(server, bb) as b, device(server, bc) as c:
        await a.create_topic(topic)
        await b.join_topic(topic)
        await c.join_topic(topic)
        await a.share_topic_key(topic, [bb["id"], bc["id"]])
        await eventually(lambda: c.topic_keys_received == 1, "c has epoch 1")
        await a.publish(topic, "epoch one")
        assert (await c.receive(timeout=10)).text == "epoch one"
        assert (await b.receive(timeout=10)).text == "epoch one"
        # c is removed (operator), a rotates to epoch 2 for the remaining members
        server.cli("topic", "remove", topic, bc["id"], "--json", check=True)
        await asyncio.sleep(1.0)  # the server sees registry changes within 0.5 s
        assert await a.share_topic_key(topic, [bb["id"]]) == 2
        await eventually(lambda: b.topic_keys_received == 2, "b has epoch 2")
        await a.publish(topic, "epoch two")
        m2 = await b.receive(timeout=10)
        assert (m2.text, m2.enc) == ("epoch two", "group-chacha20poly1305:2")
        await nothing_more(c)
        # even given the sealed body, c cannot open it
        assert c.crypto is not None
        with pytest.raises(CryptoError):
            c.crypto.open(
                sender=m2.sender, msg_id=m2.id, body=sealed_of(m2, b), enc=m2.enc, topic=topic
            )
        # d joins late and gets the current key
        async with device(server, bd) as d:
            await d.join_topic(topic)
            await a.send_topic_key(topic, bd["id"])
            await eventually(lambda: d.topic_keys_received == 1, "d has epoch 2")
            await b.publish(topic, "after d joined")
            m = await d.receive(timeout=10)
            assert m.text == "after d joined"


def sealed_of(msg: Message, receiver: TcpDevice) -> str:
    """The SDK hands the application the plaintext only: rebuild an epoch-2 sealed body
    the way the sender did, with a current member's key."""
    assert receiver.crypto is not None
    body, _ = receiver.crypto.seal_topic(msg.topic, msg.id, msg.text, ts=msg.ts)
    return body


async def test_v1_recipient_never_gets_a_sealed_body(server: ServerProcess, uid: str) -> None:
    ba = register(server, f"{uid}-a")
    bv = register(server, f"{uid}-v", v1=True)
    async with device(server, ba) as a, await RawClient.connect(server.msg_server) as v:
        await a.public_key(bv["id"])
        await v.login_v1(bv["id"])
        await asyncio.sleep(0.2)
        with pytest.raises(Exception) as exc:
            await a.send(bv["id"], "secret for v1")
        assert getattr(exc.value, "code", "") == errors.E2E_UNSUPPORTED
        await v.expect_silence(0.3)
