"""At-least-once delivery: offline queues, acks, order under load, duplicate ids and
the queue bound (DESIGN section 2)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from support.raw_client import (
    Connect,
    RawClient,
    assert_next_delivery_is_new,
    collect_receipts,
    encode,
    raw_frame,
    recv_deliveries,
)
from support.server import ServerFactory, ServerProcess


async def send_batch(sender: RawClient, to: str, ids: list[str], chunk: int = 500) -> None:
    """Pipeline ``SEND_MESSAGE_P2P`` frames (body ``body of ID``), ``chunk`` per write."""
    for start in range(0, len(ids), chunk):
        await sender.send_frames(
            ("SEND_MESSAGE_P2P", [to, f"body of {mid}", sender.device_id, mid])
            for mid in ids[start : start + chunk]
        )


async def receive_until(receiver: RawClient, last_id: str) -> list[list[str]]:
    """Every delivery up to and including the one with id ``last_id``."""
    out = []
    while True:
        args = await receiver.expect("RESP_MESSAGE_P2P")
        out.append(args)
        if args[2] == last_id:
            return out


async def test_offline_device_gets_its_messages_in_order_at_login(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    ids = [f"m{n}" for n in range(50)]
    await send_batch(a, b_id, ids)
    await collect_receipts(a, ids)

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    got = await recv_deliveries(b, 50)
    assert [g[2] for g in got] == ids
    assert [g[0] for g in got] == [f"body of {m}" for m in ids]
    assert {g[1] for g in got} == {a_id}
    await b.ack(b_id, *ids)
    # Each id was seen once, and acked messages are not delivered again.
    await assert_next_delivery_is_new(a, b)
    await b.close()
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await assert_next_delivery_is_new(a, b)


async def test_unacked_messages_come_again_at_next_login_acked_ones_do_not(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    ids = [f"m{n}" for n in range(10)]
    await send_batch(a, b_id, ids)
    await collect_receipts(a, ids)

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    assert [g[2] for g in await recv_deliveries(b, 10)] == ids
    await b.ack(b_id, *ids[:4])
    await b.ping()  # the acks were handled
    await b.close()

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    assert [g[2] for g in await recv_deliveries(b, 6)] == ids[4:]
    await assert_next_delivery_is_new(a, b)
    await b.ack(b_id, *ids[4:])
    await b.ping()
    await b.close()

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await assert_next_delivery_is_new(a, b)


async def test_live_unacked_messages_come_again_after_reconnect(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """Delivered live (never stored) and not acked: back to the queue when the
    session ends, delivered again at the next login, in order."""
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    ids = [f"m{n}" for n in range(20)]
    await send_batch(a, b_id, ids)
    await collect_receipts(a, ids)
    assert [g[2] for g in await recv_deliveries(b, 20)] == ids
    await b.ack(b_id, *ids[::2])
    await b.ping()
    await b.close()

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    assert [g[2] for g in await recv_deliveries(b, 10)] == ids[1::2]
    await b.ack(b_id, *ids[1::2])
    await assert_next_delivery_is_new(a, b)


async def test_order_under_load_past_the_inflight_window(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """3000 messages to a receiver that does not ack at first: it is sent the window
    (1000 by default), then nothing until it acks; then the rest comes from the durable
    queue. All arrive once, in order."""
    total, window = 3000, 1000
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    ids = [f"m{n}" for n in range(total)]
    await send_batch(a, b_id, ids)
    await collect_receipts(a, ids, timeout=30)

    got = [g[2] for g in await recv_deliveries(b, window)]
    assert got == ids[:window]
    await b.expect_silence(0.5)  # the window is full: nothing more until b acks

    for start in range(0, window, 250):
        await b.ack(b_id, *got[start : start + 250])
    unacked: list[str] = []
    while len(got) < total:
        args = await b.expect("RESP_MESSAGE_P2P")
        assert args[1] == a_id and args[0] == f"body of {args[2]}", args
        got.append(args[2])
        unacked.append(args[2])
        if len(unacked) == 250:
            await b.ack(b_id, *unacked)
            unacked = []
    assert got == ids, "deliveries out of order, duplicated or missing"
    if unacked:
        await b.ack(b_id, *unacked)
    await b.ping()
    await b.close()

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await assert_next_delivery_is_new(a, b)


async def _queued(server: ServerProcess, device_id: str) -> int:
    """The device's offline queue depth, as ``device show --json`` tells an operator."""
    done = await asyncio.to_thread(server.cli, "device", "show", device_id, "--json")
    return int(json.loads(done.stdout)["queued"])


async def _stream_past_the_window(
    factory: ServerFactory, connect: Connect, hold_wait: float, total: int
) -> tuple[ServerProcess, RawClient, RawClient, list[str]]:
    """A fresh server with ``delivery.hold_wait``; a streams ``total`` messages to b,
    which does not ack (yet)."""
    server = factory(config={"delivery": {"hold_wait": hold_wait}})
    tokens = server.register_many(["a", "b"])
    a = await connect(server.msg_server, "a", tokens["a"])
    b = await connect(server.msg_server, "b", tokens["b"])
    ids = [f"m{n}" for n in range(total)]
    await send_batch(a, "b", ids)
    return server, a, b, ids


async def test_a_receiver_a_window_behind_gets_the_next_messages_from_memory(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    """A receiver whose in-flight window is full and that acks within
    ``delivery.hold_wait`` is sent what came meanwhile straight from memory: nothing
    goes through its offline queue, the sender's receipts of those messages come once
    they are written to it, in order, and the sender is not read from meanwhile (its
    PING is answered only then: backpressure, not a trip through the store)."""
    server, a, b, ids = await _stream_past_the_window(up_server_factory, connect, 60.0, 1500)
    await collect_receipts(a, ids[:1000])
    assert [g[2] for g in await recv_deliveries(b, 1000)] == ids[:1000]
    await a.send("SEND_PING", "PING")
    await a.expect_silence(0.5)  # the rest is held for b, and a is not read from
    await b.expect_silence(0.1)
    assert await _queued(server, "b") == 0

    for start in range(0, 1000, 500):
        await b.ack("b", *ids[start : start + 500])
    assert [g[2] for g in await recv_deliveries(b, 500)] == ids[1000:]
    await collect_receipts(a, ids[1000:])
    assert await a.expect("PONG") == []  # read again once b caught up
    assert await _queued(server, "b") == 0
    await b.ack("b", *ids[1000:])
    await assert_next_delivery_is_new(a, b)


async def test_a_receiver_that_stops_acking_has_the_rest_queued_after_hold_wait(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    """Held messages wait ``delivery.hold_wait`` at most: then they are queued and
    their sender gets its receipts, while the receiver still has not acked."""
    server, a, b, ids = await _stream_past_the_window(up_server_factory, connect, 1.0, 1300)
    await collect_receipts(a, ids, timeout=20)
    assert [g[2] for g in await recv_deliveries(b, 1000)] == ids[:1000]
    assert await _queued(server, "b") == 300
    for start in range(0, 1000, 500):
        await b.ack("b", *ids[start : start + 500])
    assert [g[2] for g in await recv_deliveries(b, 300)] == ids[1000:]
    await b.ack("b", *ids[1000:])
    await assert_next_delivery_is_new(a, b)


async def test_resend_of_the_same_id_is_accepted_and_delivered_once(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])

    # Receiver offline: the resend finds the queued copy.
    for _ in range(2):
        await a.send_p2p(b_id, "once only", "dup-1")
        assert await a.expect("ACCEPTED") == ["dup-1"]
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await a.send_p2p(b_id, "after", "after-1")
    assert await a.expect("ACCEPTED") == ["after-1"]
    wire = [g[2] for g in await receive_until(b, "after-1")]
    assert Counter(wire)["dup-1"] <= 2, wire
    assert list(dict.fromkeys(wire)) == ["dup-1", "after-1"], wire  # what a deduper keeps
    await b.ack(b_id, "dup-1", "after-1")

    # Receiver online and not acking yet: the resend finds the in-flight copy.
    for _ in range(2):
        await a.send_p2p(b_id, "once only, live", "dup-2")
        assert await a.expect("ACCEPTED") == ["dup-2"]
    await a.send_p2p(b_id, "after", "after-2")
    assert await a.expect("ACCEPTED") == ["after-2"]
    wire = [g[2] for g in await receive_until(b, "after-2")]
    assert Counter(wire)["dup-2"] <= 2, wire
    assert list(dict.fromkeys(wire)) == ["dup-2", "after-2"], wire
    await b.ack(b_id, "dup-2", "after-2")
    await assert_next_delivery_is_new(a, b)


async def test_one_read_mixing_usual_sends_with_every_other_case_is_served_in_order(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """The session's short lane for plain sends (MsgServer.send_live) and the general
    path take turns within one read: each frame gets what it would get alone, in
    order."""
    a_id, b_id, off_id = f"{uid}-a", f"{uid}-b", f"{uid}-off"
    tokens = up_server.register_many([a_id, b_id, off_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])

    def send(mid: str, to: str = b_id, sender: str = a_id) -> bytes:
        return encode("SEND_MESSAGE_P2P", to, f"body of {mid}", sender, mid)

    await a.send_raw(
        send("m1")
        + send("m1")  # in flight already: accepted again, not delivered twice
        + raw_frame(b'{"CmdName": "SEND_MESSAGE_P2P", "Args": [}')  # bad JSON
        + send("m2")
        + send("m3", sender="someone-else")  # the sender is the session's id anyway
        + send("m4", to=off_id)  # offline: to the queue
        + encode("SEND_MESSAGE_P2P", b_id, "server-chosen id", a_id, "")
        + send("x" * 65)  # id too long
        + send("m5")
    )
    replies = [await a.recv() for _ in range(9)]
    # m4's receipt waits for the store; every other reply comes in the order sent.
    assert Counter(f.args[0] for f in replies if f.cmd == "ACCEPTED")["m4"] == 1, replies
    rest = [f for f in replies if f.args[0] != "m4"]
    assert [(f.cmd, f.args[0]) for f in rest[:5]] == [
        ("ACCEPTED", "m1"),
        ("ACCEPTED", "m1"),
        ("ERROR", "BAD_FRAME"),
        ("ACCEPTED", "m2"),
        ("ACCEPTED", "m3"),
    ], replies
    server_id = rest[5].args[0]
    assert rest[5].cmd == "ACCEPTED" and server_id not in {"", "m4", "m5"}, replies
    assert (rest[6].cmd, rest[6].args[0]) == ("ERROR", "BAD_ARGS"), replies
    assert (rest[7].cmd, rest[7].args) == ("ACCEPTED", ["m5"]), replies

    got = await recv_deliveries(b, 5)
    assert [(g[2], g[0], g[1]) for g in got] == [
        ("m1", "body of m1", a_id),
        ("m2", "body of m2", a_id),
        ("m3", "body of m3", a_id),
        (server_id, "server-chosen id", a_id),
        ("m5", "body of m5", a_id),
    ], got
    await b.ack(b_id, "m1", "m2", "m3", server_id, "m5")
    await assert_next_delivery_is_new(a, b)
    off = await connect(up_server.msg_server, off_id, tokens[off_id])
    assert (await off.expect("RESP_MESSAGE_P2P"))[:3] == ["body of m4", a_id, "m4"]


async def test_another_sender_reusing_a_pending_id_gets_duplicate_id(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id, c_id = f"{uid}-a", f"{uid}-b", f"{uid}-c"
    tokens = up_server.register_many([a_id, b_id, c_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    c = await connect(up_server.msg_server, c_id, tokens[c_id])

    # Pending in b's offline queue.
    await a.send_p2p(b_id, "from a", "same-1")
    assert await a.expect("ACCEPTED") == ["same-1"]
    await c.send_p2p(b_id, "from c", "same-1")
    await c.expect_error("DUPLICATE_ID", ref="same-1")

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    args = await b.expect("RESP_MESSAGE_P2P")
    assert args[:3] == ["from a", a_id, "same-1"], args
    await assert_next_delivery_is_new(c, b)  # c's message was not taken

    # Pending in b's live session (delivered, not acked).
    await a.send_p2p(b_id, "from a, live", "same-2")
    assert await a.expect("ACCEPTED") == ["same-2"]
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["from a, live", a_id, "same-2"]
    await c.send_p2p(b_id, "from c, live", "same-2")
    await c.expect_error("DUPLICATE_ID", ref="same-2")
    await c.ping()

    # Once b has acked it, the id is free again.
    await b.ack(b_id, "same-1", "same-2")
    await b.ping()
    await c.send_p2p(b_id, "from c, later", "same-2")
    assert await c.expect("ACCEPTED") == ["same-2"]
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["from c, later", c_id, "same-2"]
    await b.ack(b_id, "same-2")
    await assert_next_delivery_is_new(a, b)


async def test_offline_queue_bound_refuses_with_queue_full(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    server = up_server_factory(config={"delivery": {"offline_max": 5}})
    tokens = server.register_many(["a", "b"])
    a = await connect(server.msg_server, "a", tokens["a"])
    for n in range(1, 6):
        await a.send_p2p("b", f"n{n}", f"m{n}")
        assert await a.expect("ACCEPTED") == [f"m{n}"]
    await a.send_p2p("b", "n6", "m6")
    args = await a.expect_error("QUEUE_FULL", ref="m6")
    assert "5" in args[1], args  # the text names the bound
    await a.ping()

    b = await connect(server.msg_server, "b", tokens["b"])
    got = await recv_deliveries(b, 5)
    assert [g[2] for g in got] == ["m1", "m2", "m3", "m4", "m5"]
    await b.ack("b", *(g[2] for g in got))
    await b.ping()
    await assert_next_delivery_is_new(a, b)  # m6 was refused: it never comes


async def test_queue_bound_admits_a_senders_messages_in_the_order_sent(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    """The durable queue takes a sender's messages in the order they were sent, whatever
    each needs first (a p2p send checks its recipient in the registry, a topic fan-out
    does not). Seen through the bound: with room for one, the first is taken and the
    second refused, never the other way round (which would also break per-pair order
    across a crash: the refused or lost first one comes after the second when resent)."""
    server = up_server_factory(config={"delivery": {"offline_max": 1}}, start=False)
    tokens = server.register_many(["a", "b"])
    server.topic_create("room", owner="a", members=["b"])
    server.start()  # nothing cached: b's registry entry is read at the first p2p send

    a = await connect(server.msg_server, "a", tokens["a"])
    await a.send("JOIN_TOPIC", "room", "a")  # a is a member: this only caches the topic
    assert await a.expect("LOCATE_TOPIC_MSG_ADDR") == [server.msg_server, "room"]
    await a.send_frames(
        [
            ("SEND_MESSAGE_P2P", ["b", "first", "a", "m1"]),
            ("SEND_MESSAGE_TOPIC", ["room", "second", "m2"]),
        ]
    )
    outcome = {}
    for _ in range(2):
        frame = await a.recv()
        ref = frame.args[0] if frame.cmd == "ACCEPTED" else frame.args[2]
        outcome[ref] = frame.cmd if frame.cmd == "ACCEPTED" else frame.args[0]
    assert outcome == {"m1": "ACCEPTED", "m2": "QUEUE_FULL"}

    b = await connect(server.msg_server, "b", tokens["b"])
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["first", "a", "m1"]
    await b.ack("b", "m1")
    await assert_next_delivery_is_new(a, b)
