"""Point-to-point and topic messaging between token devices, on one shared server."""

from __future__ import annotations

import time

from support.raw_client import (
    Connect,
    RawClient,
    assert_next_delivery_is_new,
    collect_receipts,
    recv_deliveries,
)
from support.server import ServerProcess


def assert_recent_ts(ts: str) -> None:
    assert ts.isdigit(), ts
    assert abs(int(ts) - time.time() * 1000) < 60_000, ts


async def send_and_deliver(
    sender: RawClient, receiver: RawClient, body: str, mid: str
) -> list[str]:
    """sender -> receiver: ACCEPTED [mid] to the sender, then the delivery, acked."""
    await sender.send_p2p(receiver.device_id, body, mid)
    assert await sender.expect("ACCEPTED") == [mid]
    args = await receiver.expect("RESP_MESSAGE_P2P")
    assert args[:3] == [body, sender.device_id, mid], args
    assert len(args) == 4, args
    assert_recent_ts(args[3])
    await receiver.ack(receiver.device_id, mid)
    return args


async def test_p2p_both_ways_with_receipt_delivery_and_ack(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])

    await send_and_deliver(a, b, "hello b, from a", "a-1")
    await send_and_deliver(b, a, "hello a, from b", "b-1")
    await send_and_deliver(a, b, 'ünïcødé ✓ and "quotes"\n', "a-2")

    # Acked messages are gone: both log in again and nothing old comes back.
    await a.close()
    await b.close()
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await assert_next_delivery_is_new(a, b)
    await assert_next_delivery_is_new(b, a)


async def test_message_without_id_gets_one_from_the_server(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])

    await a.send("SEND_MESSAGE_P2P", b_id, "no id", a_id)  # v1 argument list
    (mid,) = await a.expect("ACCEPTED")
    assert mid
    args = await b.expect("RESP_MESSAGE_P2P")
    assert args[:3] == ["no id", a_id, mid]
    await b.ack(b_id, mid)


async def test_topic_delivers_to_the_other_members_and_leave_stops_it(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    ids = [f"{uid}-{n}" for n in ("a", "b", "c")]
    tokens = up_server.register_many(ids)
    a, b, c = [await connect(up_server.msg_server, i, tokens[i]) for i in ids]
    topic = f"{uid}-room"

    await a.send("CREATE_TOPIC", topic)
    assert await a.expect("OK") == ["CREATE_TOPIC", topic]
    for member in (b, c):
        await member.send("JOIN_TOPIC", topic, member.device_id)
        assert await member.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]

    await a.send("SEND_MESSAGE_TOPIC", topic, "hi all", "t-1")
    assert await a.expect("ACCEPTED") == ["t-1"]
    for member in (b, c):
        args = await member.expect("RESP_MESSAGE_TOPIC")
        assert args[:4] == [topic, "hi all", a.device_id, "t-1"] and len(args) == 5, args
        assert_recent_ts(args[4])
        await member.ack(member.device_id, "t-1")

    # The sender does not get its own message: the next thing a sees is b's message.
    await b.send("SEND_MESSAGE_TOPIC", topic, "hi from b", "t-2")
    assert await b.expect("ACCEPTED") == ["t-2"]
    for member in (a, c):
        args = await member.expect("RESP_MESSAGE_TOPIC")
        assert args[:4] == [topic, "hi from b", b.device_id, "t-2"], args
        await member.ack(member.device_id, "t-2")

    await c.send("LEAVE_TOPIC", topic)
    assert await c.expect("OK") == ["LEAVE_TOPIC", topic]
    await a.send("SEND_MESSAGE_TOPIC", topic, "c has left", "t-3")
    assert await a.expect("ACCEPTED") == ["t-3"]
    args = await b.expect("RESP_MESSAGE_TOPIC")
    assert args[:4] == [topic, "c has left", a.device_id, "t-3"], args
    await b.ack(b.device_id, "t-3")
    # c gets nothing of the topic any more: its next frame is a fresh p2p message.
    await assert_next_delivery_is_new(a, c)
    # ... and may no longer send to it; leaving again is refused too.
    await c.send("SEND_MESSAGE_TOPIC", topic, "still here?", "t-4")
    await c.expect_error("NOT_A_MEMBER", ref="t-4")
    await c.send("LEAVE_TOPIC", topic)
    await c.expect_error("NOT_A_MEMBER", ref=topic)
    await c.ping()


async def test_topic_send_by_non_member_and_to_unknown_topic(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    owner_id, outsider_id = f"{uid}-owner", f"{uid}-out"
    tokens = up_server.register_many([owner_id, outsider_id])
    owner = await connect(up_server.msg_server, owner_id, tokens[owner_id])
    outsider = await connect(up_server.msg_server, outsider_id, tokens[outsider_id])
    topic = f"{uid}-club"
    await owner.send("CREATE_TOPIC", topic)
    assert await owner.expect("OK") == ["CREATE_TOPIC", topic]

    await outsider.send("SEND_MESSAGE_TOPIC", topic, "let me in", "x-1")
    await outsider.expect_error("NOT_A_MEMBER", ref="x-1")
    await outsider.send("SEND_MESSAGE_TOPIC", f"{uid}-nosuch", "anyone?", "x-2")
    await outsider.expect_error("UNKNOWN_TOPIC", ref="x-2")
    await outsider.ping()  # per-message errors leave the session open
    # The owner got nothing from the outsider.
    await assert_next_delivery_is_new(outsider, owner)


async def test_unknown_recipient_gets_unknown_device(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id = f"{uid}-a"
    token = up_server.register(a_id)
    a = await connect(up_server.msg_server, a_id, token)
    await a.send_p2p(f"{uid}-nobody", "hello?", "u-1")
    await a.expect_error("UNKNOWN_DEVICE", ref="u-1")
    await a.ping()


async def test_one_sender_many_receivers(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """One sender interleaving messages to several receivers: each gets its own, in
    order, nothing of the others'."""
    ids = [f"{uid}-s"] + [f"{uid}-r{n}" for n in range(3)]
    tokens = up_server.register_many(ids)
    s = await connect(up_server.msg_server, ids[0], tokens[ids[0]])
    rs = [await connect(up_server.msg_server, i, tokens[i]) for i in ids[1:]]
    frames = []
    for n in range(30):
        r = rs[n % 3]
        frames.append(("SEND_MESSAGE_P2P", [r.device_id, f"n{n}", s.device_id, f"m{n}"]))
    await s.send_frames(frames)
    await collect_receipts(s, (f"m{n}" for n in range(30)))
    for i, r in enumerate(rs):
        got = await recv_deliveries(r, 10)
        assert [g[2] for g in got] == [f"m{n}" for n in range(i, 30, 3)]
        assert all(g[1] == s.device_id for g in got)
        await r.ack(r.device_id, *(g[2] for g in got))
        await assert_next_delivery_is_new(s, r)


async def make_topic(owner: RawClient, name: str, *members: RawClient) -> None:
    """``owner`` creates ``name``, ``members`` join; then one message from the owner
    (acked by all), so the server has the topic cached."""
    await owner.send("CREATE_TOPIC", name)
    assert await owner.expect("OK") == ["CREATE_TOPIC", name]
    for m in members:
        await m.send("JOIN_TOPIC", name, m.device_id)
        assert await m.expect("LOCATE_TOPIC_MSG_ADDR") == [m.msg_server_addr, name]
    await owner.send("SEND_MESSAGE_TOPIC", name, "warm-up", f"{name}-warm")
    assert await owner.expect("ACCEPTED") == [f"{name}-warm"]
    for m in members:
        assert (await m.expect("RESP_MESSAGE_TOPIC"))[3] == f"{name}-warm"
        await m.ack(m.device_id, f"{name}-warm")


async def test_pipelined_commands_take_effect_in_the_order_sent(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """A device need not wait for each answer: JOIN_TOPIC then SEND_MESSAGE_TOPIC in one
    write sends as a member; LEAVE_TOPIC then SEND_MESSAGE_TOPIC is refused; a topic
    message then a p2p message to the same member arrive in that order."""
    ids = [f"{uid}-a", f"{uid}-b", f"{uid}-c"]
    tokens = up_server.register_many(ids)
    a, b, c = [await connect(up_server.msg_server, i, tokens[i]) for i in ids]
    topic = f"{uid}-room"
    await make_topic(a, topic, b)

    await c.send_frames(
        [("JOIN_TOPIC", [topic, c.device_id]), ("SEND_MESSAGE_TOPIC", [topic, "I'm in", "c-1"])]
    )
    assert await c.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]
    assert await c.expect("ACCEPTED") == ["c-1"]
    for m in (a, b):
        assert (await m.expect("RESP_MESSAGE_TOPIC"))[1:4] == ["I'm in", c.device_id, "c-1"]
        await m.ack(m.device_id, "c-1")

    await b.send_frames([("LEAVE_TOPIC", [topic]), ("SEND_MESSAGE_TOPIC", [topic, "gone", "b-1"])])
    assert await b.expect("OK") == ["LEAVE_TOPIC", topic]
    await b.expect_error("NOT_A_MEMBER", ref="b-1")

    await a.send_frames(
        [
            ("SEND_MESSAGE_TOPIC", [topic, "first", "a-1"]),
            ("SEND_MESSAGE_P2P", [c.device_id, "second", a.device_id, "a-2"]),
            ("SEND_MESSAGE_TOPIC", [topic, "third", "a-3"]),
        ]
    )
    assert [await a.expect("ACCEPTED") for _ in range(3)] == [["a-1"], ["a-2"], ["a-3"]]
    first = await c.expect("RESP_MESSAGE_TOPIC")
    second = await c.expect("RESP_MESSAGE_P2P")
    third = await c.expect("RESP_MESSAGE_TOPIC")
    assert [first[3], second[2], third[3]] == ["a-1", "a-2", "a-3"]
    await c.ack(c.device_id, "a-1", "a-2", "a-3")
    # b left before any of it: nothing for b.
    await assert_next_delivery_is_new(a, b)
