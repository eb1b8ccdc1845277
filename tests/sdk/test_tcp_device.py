"""The TCP device SDK (``firmware_sim.tcp_device``) against a real ``fishchat-iot up``
subprocess: connect, send and receive, receipts and errors, offline queues, topics,
dedupe of redelivered messages, reconnect across a server restart (in-flight sends
resent, delivered once), keepalive, session replacement, v1 compatibility."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from support.waiting import eventually, receive_n
from support.waiting import nothing_more as assert_nothing_more

from firmware_sim.tcp_device import CLOSED, LOGIN_REFUSED, NOT_SUPPORTED, DeviceError, Message
from fishchat_iot import errors

from .conftest import SdkServer, SdkServerFactory


def sdk_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("fishchat-")]


# -- basics -------------------------------------------------------------------------


async def test_connect_send_receive(server: SdkServer) -> None:
    alice_b = server.register("alice")
    bob_b = server.register("bob")
    async with server.device(alice_b) as alice, server.device(bob_b) as bob:
        assert alice.connected and bob.connected
        assert alice.address == server.msg_server  # told by the gateway
        ids = [await alice.send("bob", f"hello {i}") for i in range(5)]
        assert len(set(ids)) == 5
        msgs = await receive_n(bob, 5)
        assert [m.text for m in msgs] == [f"hello {i}" for i in range(5)]
        assert [m.id for m in msgs] == ids
        assert {(m.kind, m.sender, m.topic) for m in msgs} == {("p2p", "alice", "")}
        now = time.time() * 1000
        assert all(abs(m.ts - now) < 60_000 for m in msgs)

        # The sender's id is kept end to end.
        assert await bob.send("alice", "hi alice", id="bob-msg-1") == "bob-msg-1"
        m = await alice.receive(timeout=10)
        assert (m.id, m.sender, m.text) == ("bob-msg-1", "bob", "hi alice")

        # Many concurrent sends: all accepted, delivered once each, in send order.
        texts = [f"burst {i}" for i in range(300)]
        ids = await asyncio.gather(*(alice.send("bob", t) for t in texts))
        msgs = await receive_n(bob, len(texts))
        assert [m.text for m in msgs] == texts
        assert [m.id for m in msgs] == list(ids)
        assert alice.inflight == 0 and alice.accepted == 305
        await assert_nothing_more(bob, 0.3)
        assert bob.duplicates == 0 and bob.reconnects == 0
    assert sdk_tasks() == []


async def test_unicode_and_large_text(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    async with server.device(a) as alice, server.device(b) as bob:
        texts = ["让智能硬件“聊”起来", "emoji 🐟", 'quotes " and \\ and \n newline', "x" * 60000]
        for t in texts:
            await alice.send("bob", t)
        assert [m.text for m in await receive_n(bob, len(texts))] == texts


async def test_send_errors_keep_the_session(server: SdkServer) -> None:
    a = server.register("alice")
    async with server.device(a) as alice:
        with pytest.raises(DeviceError) as info:
            await alice.send("nobody", "x", id="to-nobody")
        assert info.value.code == errors.UNKNOWN_DEVICE
        assert info.value.ref == "to-nobody"
        with pytest.raises(DeviceError) as info:
            await alice.send("alice", "x", id="i" * 65)
        assert info.value.code == errors.BAD_ARGS
        with pytest.raises(DeviceError) as info:
            await alice.send("alice", "x" * 70000)
        assert info.value.code == errors.FRAME_TOO_LARGE
        assert alice.connected and alice.inflight == 0 and alice.reconnects == 0
        # Still usable: a message to itself goes through.
        mid = await alice.send("alice", "note to self")
        assert (await alice.receive(timeout=10)).id == mid


async def test_login_refused(server: SdkServer) -> None:
    a = server.register("alice")
    for bundle in ({**a, "token": "wrong-token"}, {"id": "ghost", "token": "whatever"}):
        dev = server.device(bundle)
        with pytest.raises(DeviceError) as info:
            await dev.connect()
        assert info.value.code == errors.AUTH_FAILED
        assert not dev.connected
        await dev.close()
    assert sdk_tasks() == []


async def test_connect_failure_is_a_device_error(server: SdkServer) -> None:
    from firmware_sim.tcp_device import TcpDevice

    a = server.register("alice")
    dev = TcpDevice("alice", a["token"], gateway="127.0.0.1:1", connect_timeout=5)
    with pytest.raises(DeviceError) as info:
        await dev.connect()
    assert info.value.code == "CONNECT_FAILED"
    assert "127.0.0.1:1" in info.value.text
    # The gateway down, the msg_server named directly still works.
    dev = TcpDevice("alice", a["token"], gateway="127.0.0.1:1", msg_server=server.msg_server)
    async with dev:
        assert dev.connected


async def test_offline_messages_arrive_in_order_at_login(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    async with server.device(a) as alice:
        ids = [await alice.send("bob", f"queued {i}") for i in range(30)]
    async with server.device(b) as bob:
        msgs = await receive_n(bob, 30)
        assert [m.id for m in msgs] == ids
        await assert_nothing_more(bob, 0.3)
    # They were acked: the next login gets nothing.
    async with server.device(b) as bob:
        await assert_nothing_more(bob, 0.5)


# -- dedupe and acks -------------------------------------------------------------------


async def test_redelivered_message_is_absorbed_once(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    async with server.device(a) as alice, server.device(b, auto_ack=False) as bob:
        mid = await alice.send("bob", "exactly once please")
        msg = await bob.receive(timeout=10)
        assert msg.id == mid
        # The connection breaks before the app acked: the server delivers it again.
        bob.drop()
        await eventually(lambda: bob.duplicates == 1, "the redelivery reaches bob")
        assert bob.reconnects == 1 and bob.connected
        await assert_nothing_more(bob, 0.3)  # absorbed: not handed to the app again
        bob.ack(msg)
        await asyncio.sleep(0.3)
        bob.drop()
        await eventually(lambda: bob.reconnects == 2 and bob.connected, "bob reconnects")
        await asyncio.sleep(0.5)
        assert bob.duplicates == 1  # acked: not delivered a third time
        await assert_nothing_more(bob, 0.2)


async def test_unacked_messages_come_back_to_a_new_instance(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    async with server.device(a) as alice:
        ids = [await alice.send("bob", f"m{i}") for i in range(3)]
    bob = server.device(b, auto_ack=False)
    async with bob:
        assert [m.id for m in await receive_n(bob, 3)] == ids  # never acked
    async with server.device(b) as bob2:  # a device that restarted: no memory of them
        assert [m.id for m in await receive_n(bob2, 3)] == ids
    async with server.device(b) as bob3:
        await assert_nothing_more(bob3, 0.5)


# -- topics -----------------------------------------------------------------------------


async def test_topics(server: SdkServer) -> None:
    bundles = [server.register(n) for n in ("alice", "bob", "carol")]
    devs = [server.device(b_) for b_ in bundles]
    async with devs[0] as alice, devs[1] as bob, devs[2] as carol:
        await alice.create_topic("room")
        with pytest.raises(DeviceError) as info:
            await bob.create_topic("room")
        assert (info.value.code, info.value.ref) == (errors.TOPIC_EXISTS, "room")
        assert await bob.join_topic("room") == server.msg_server
        with pytest.raises(DeviceError) as info:
            await bob.join_topic("no-such-topic")
        assert info.value.code == errors.UNKNOWN_TOPIC
        with pytest.raises(DeviceError) as info:
            await carol.publish("room", "let me in")
        assert info.value.code == errors.NOT_A_MEMBER

        mid = await alice.publish("room", "hello room")
        m = await bob.receive(timeout=10)
        assert (m.kind, m.topic, m.sender, m.id, m.text) == (
            "topic",
            "room",
            "alice",
            mid,
            "hello room",
        )
        await assert_nothing_more(alice, 0.2)  # the sender does not get its own copy
        await assert_nothing_more(carol, 0.2)

        await bob.leave_topic("room")
        with pytest.raises(DeviceError) as info:
            await bob.leave_topic("room")
        assert info.value.code == errors.NOT_A_MEMBER
        await alice.publish("room", "anyone?")
        await assert_nothing_more(bob, 0.4)


# -- restart and reconnect -------------------------------------------------------------


async def test_reconnect_after_server_restart_resends_in_flight(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    gw, ms = server.ports
    async with server.device(a) as alice, server.device(b) as bob:
        first = await alice.send("bob", "before")
        assert (await bob.receive(timeout=10)).id == first

        # A burst written just before the server stops: receipts outstanding.
        burst = [asyncio.create_task(alice.send("bob", f"burst {i}")) for i in range(100)]
        await asyncio.sleep(0)
        await asyncio.to_thread(server.stop)
        await eventually(lambda: not alice.connected and not bob.connected, "both see it go")
        # Sends while the server is down wait for it.
        down = [asyncio.create_task(alice.send("bob", f"down {i}")) for i in range(10)]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in down)

        await asyncio.to_thread(server.start, gw, ms)
        async with asyncio.timeout(30):
            ids = list(await asyncio.gather(*burst, *down))
        assert len(set(ids)) == 110
        got: list[Message] = []
        async with asyncio.timeout(30):
            while {m.id for m in got} != set(ids):
                got.append(await bob.receive())
        await assert_nothing_more(bob, 1.0)
        assert [m.id for m in got] == ids  # each once, in send order
        assert alice.reconnects >= 1 and bob.reconnects >= 1


async def test_kill_9_with_sends_in_flight_resends_them(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    gw, ms = server.ports
    async with server.device(a) as alice, server.device(b) as bob:
        pre = await alice.send("bob", "pre")
        assert (await bob.receive(timeout=10)).id == pre
        os.kill(server.pid, signal.SIGSTOP)  # frozen: reads nothing, answers nothing
        sends = [asyncio.create_task(alice.send("bob", f"k{i}")) for i in range(200)]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in sends)  # written, no receipt
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start, gw, ms)
        async with asyncio.timeout(30):
            ids = list(await asyncio.gather(*sends))
        assert alice.resent == 200  # every one written again, same id, after the restart
        msgs = await receive_n(bob, 200, timeout=30)
        assert [m.id for m in msgs] == ids
        await assert_nothing_more(bob, 0.5)


async def test_kill_9_during_a_burst_loses_no_accepted_message(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    gw, ms = server.ports
    async with server.device(a) as alice:
        sends = [asyncio.create_task(alice.send("bob", f"k{i}")) for i in range(200)]
        await asyncio.sleep(0.02)  # some written, some accepted, some receipts unread
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start, gw, ms)
        async with asyncio.timeout(30):
            ids = list(await asyncio.gather(*sends))
    async with server.device(b) as bob:  # offline during the crash: all from the store
        msgs = await receive_n(bob, len(ids), timeout=30)
        assert [m.id for m in msgs] == ids
        await assert_nothing_more(bob, 0.5)


async def test_dead_server_is_detected_by_keepalive(server: SdkServer) -> None:
    a = server.register("alice")
    pid = server.pid
    async with server.device(a, keepalive=0.9, connect_timeout=2) as alice:
        os.kill(pid, signal.SIGSTOP)  # the server hangs: no PONG, no FIN
        try:
            await eventually(lambda: not alice.connected, "alice notices", timeout=5)
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(lambda: alice.connected, "alice is back", timeout=15)
        assert alice.reconnects >= 1
        assert await alice.send("alice", "alive") != ""


async def test_keepalive_pings_hold_the_session(sdk_server_factory: SdkServerFactory) -> None:
    server = sdk_server_factory("--keepalive", "1")
    a = server.register("alice")
    b = server.register("bob")
    async with server.device(a, keepalive=0.9) as chatty, server.device(b, keepalive=0) as quiet:
        await asyncio.sleep(3)
        assert chatty.connected and chatty.reconnects == 0
        assert quiet.reconnects >= 1  # closed by the server for silence, came back
        assert errors.KEEPALIVE_TIMEOUT in {code for code, _, _ in quiet.server_errors}


# -- sessions ---------------------------------------------------------------------------


async def test_second_login_replaces_the_first(server: SdkServer) -> None:
    a = server.register("alice")
    first = server.device(a)
    second = server.device(a)
    await first.connect()
    try:
        await second.connect()
        await eventually(lambda: first.final_error is not None, "the first is told")
        assert first.final_error is not None
        assert first.final_error.code == errors.SESSION_REPLACED
        assert not first.connected and first.closed
        with pytest.raises(DeviceError) as info:
            await first.receive(timeout=1)
        assert info.value.code == errors.SESSION_REPLACED
        with pytest.raises(DeviceError) as info:
            await first.send("alice", "x")
        assert info.value.code == errors.SESSION_REPLACED
        await asyncio.sleep(0.5)
        assert second.connected and second.reconnects == 0  # no ping-pong between them
        mid = await second.send("alice", "still here")
        assert (await second.receive(timeout=10)).id == mid
    finally:
        await first.close()
        await second.close()


async def test_revoked_device_is_cut(server: SdkServer) -> None:
    a = server.register("alice")
    async with server.device(a) as alice:
        proc = await asyncio.to_thread(server.cli, "device", "revoke", "alice")
        assert proc.returncode == 0, proc.stderr
        await eventually(lambda: alice.final_error is not None, "alice is cut", timeout=20)
        assert alice.final_error is not None
        assert alice.final_error.code == errors.REVOKED
    dev = server.device(a)
    with pytest.raises(DeviceError) as info:
        await dev.connect()
    assert info.value.code in (errors.REVOKED, errors.AUTH_FAILED)


async def test_close_logs_out_and_stops_everything(server: SdkServer) -> None:
    a = server.register("alice")
    b = server.register("bob")
    alice = server.device(a)
    await alice.connect()
    assert sdk_tasks() != []
    await alice.close()
    await alice.close()  # idempotent
    assert alice.closed and not alice.connected
    assert sdk_tasks() == []
    with pytest.raises(DeviceError) as info:
        await alice.send("bob", "x")
    assert info.value.code == CLOSED
    with pytest.raises(DeviceError) as info:
        await alice.receive()
    assert info.value.code == CLOSED
    assert [m async for m in alice.messages()] == []
    # Logged out: messages for it are queued, and a new session gets them.
    async with server.device(b) as bob:
        mid = await bob.send("alice", "while you were out")
    async with server.device(a) as alice2:
        assert (await alice2.receive(timeout=10)).id == mid


# -- v1 ----------------------------------------------------------------------------------


async def test_v1_device_talks_to_token_devices(server: SdkServer) -> None:
    server.register("old", v1=True)
    a = server.register("alice")
    async with server.v1_device("old") as old, server.device(a) as alice:
        assert old.connected
        assert await old.send("alice", "from v1") == ""  # v1 has no receipts
        m = await alice.receive(timeout=10)
        assert (m.kind, m.sender, m.text) == ("p2p", "old", "from v1")
        assert m.id  # assigned by the server

        mid = await alice.send("old", "to v1")
        m = await old.receive(timeout=10)
        assert (m.id, m.sender, m.text) == (mid, "alice", "to v1")

        await alice.create_topic("t")
        assert await old.join_topic("t") == server.msg_server
        await alice.publish("t", "topic hello")
        m = await old.receive(timeout=10)
        assert (m.kind, m.topic, m.sender, m.text, m.id) == (
            "topic",
            "t",
            "alice",
            "topic hello",
            "",
        )
        await old.publish("t", "v1 to topic")
        m = await alice.receive(timeout=10)
        assert (m.kind, m.topic, m.sender, m.text) == ("topic", "t", "old", "v1 to topic")
        with pytest.raises(DeviceError) as info:
            await old.leave_topic("t")
        assert info.value.code == NOT_SUPPORTED

        # It acked (P2P_ACK [client_id, uuid]): nothing comes back after a reconnect.
        await asyncio.sleep(0.3)
        old.drop()
        await eventually(lambda: old.reconnects == 1 and old.connected, "old reconnects")
        await assert_nothing_more(old, 0.7)
        assert old.duplicates == 0


async def test_v1_login_of_a_token_only_device_is_refused(server: SdkServer) -> None:
    server.register("alice")
    dev = server.v1_device("alice")
    with pytest.raises(DeviceError) as info:
        await dev.connect()
    assert info.value.code == LOGIN_REFUSED
    await dev.close()
