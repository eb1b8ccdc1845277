"""Durability across a server restart: ``kill -9`` after ACCEPTED, and a graceful stop
(SIGTERM) with messages delivered but not acked. Each test has its own server."""

from __future__ import annotations

import asyncio
import contextlib

from support.raw_client import (
    Connect,
    RawClient,
    assert_next_delivery_is_new,
    collect_receipts,
    recv_deliveries,
)
from support.server import ServerFactory


async def test_accepted_message_survives_kill_9(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    server = up_server_factory()
    tokens = server.register_many(["a", "b"])
    a = await connect(server.msg_server, "a", tokens["a"])
    ids = [f"m{n}" for n in range(20)]
    await a.send_frames(("SEND_MESSAGE_P2P", ["b", f"n-{m}", "a", m]) for m in ids)
    await collect_receipts(a, ids)  # every one ACCEPTED, b offline

    assert await asyncio.to_thread(server.restart, kill=True) == -9
    assert await a.expect_closed() == []

    a = await connect(server.msg_server, "a", tokens["a"])
    b = await connect(server.msg_server, "b", tokens["b"])
    got = await recv_deliveries(b, len(ids))
    assert [g[2] for g in got] == ids
    assert [g[:2] for g in got] == [[f"n-{m}", "a"] for m in ids]
    await b.ack("b", *ids)
    await assert_next_delivery_is_new(a, b)


async def test_delivered_unacked_messages_survive_a_graceful_stop(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    server = up_server_factory()
    tokens = server.register_many(["a", "b"])
    a = await connect(server.msg_server, "a", tokens["a"])
    b = await connect(server.msg_server, "b", tokens["b"])
    # 1000 (the in-flight window) delivered live, never stored; 500 more held for b,
    # then queued (delivery.hold_wait: b does not ack): then a gets their receipts.
    ids = [f"m{n}" for n in range(1500)]
    await a.send_frames(("SEND_MESSAGE_P2P", ["b", f"n-{m}", "a", m]) for m in ids)
    await collect_receipts(a, ids)
    assert [g[2] for g in await recv_deliveries(b, 1000)] == ids[:1000]
    await b.ack("b", *ids[:5])
    # The acks were handled (they made room: up to five more may come); the rest stay
    # unacked.
    more = await b.ping(skip=("RESP_MESSAGE_P2P",))
    assert [f.args[2] for f in more] == ids[1000 : 1000 + len(more)]

    assert await asyncio.to_thread(server.restart) == 0  # SIGTERM, clean exit
    for client in (a, b):
        for frame in await client.expect_closed():
            # b may have been sent more (its acks made room); then told why, or not.
            if frame.cmd != "RESP_MESSAGE_P2P" or client is a:
                assert frame.cmd == "ERROR" and frame.args[0] == "UNAVAILABLE", frame

    a = await connect(server.msg_server, "a", tokens["a"])
    b = await connect(server.msg_server, "b", tokens["b"])
    got: list[str] = []
    while len(got) < len(ids) - 5:
        args = await b.expect("RESP_MESSAGE_P2P")
        assert args[:2] == [f"n-{args[2]}", "a"], args
        got.append(args[2])
        if len(got) % 250 == 0:
            await b.ack("b", *got[-250:])
    assert got == ids[5:]
    await b.ack("b", *got[-(len(got) % 250) :])
    await assert_next_delivery_is_new(a, b)


async def test_kill_9_mid_stream_then_resending_keeps_every_message_in_order(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    """The server is killed while a sender streams to an offline receiver. After the
    restart the sender resends (same ids) what got no receipt, as the SDK does: the
    receiver gets every message once, in the order first sent, and every message
    that had been ACCEPTED survived."""
    server = up_server_factory()
    tokens = server.register_many(["a", "b"])
    a = await connect(server.msg_server, "a", tokens["a"])
    ids = [f"m{n}" for n in range(3000)]

    async def stream(client: RawClient, which: list[str]) -> None:
        for start in range(0, len(which), 50):
            await client.send_frames(
                ("SEND_MESSAGE_P2P", ["b", f"n-{m}", "a", m]) for m in which[start : start + 50]
            )
            await asyncio.sleep(0.001)

    sending = asyncio.create_task(stream(a, ids))
    accepted: list[str] = []
    while len(accepted) < 300:
        accepted.append((await a.expect("ACCEPTED"))[0])
    await asyncio.to_thread(server.kill9)
    for frame in await a.expect_closed():  # receipts still on their way to a
        assert frame.cmd == "ACCEPTED", frame
        accepted.append(frame.args[0])
    with contextlib.suppress(ConnectionError):
        await sending  # writing to a dead server may fail
    assert len(accepted) < len(ids), "the kill came too late to test anything"

    await asyncio.to_thread(server.start)
    a = await connect(server.msg_server, "a", tokens["a"])
    retry = [m for m in ids if m not in set(accepted)]
    await stream(a, retry)
    await collect_receipts(a, retry, timeout=30)

    b = await connect(server.msg_server, "b", tokens["b"])
    got: list[str] = []
    while len(got) < len(ids):
        args = await b.expect("RESP_MESSAGE_P2P", timeout=30)
        assert args[:2] == [f"n-{args[2]}", "a"], args
        got.append(args[2])
        if len(got) % 250 == 0:
            await b.ack("b", *got[-250:])
    assert got == ids, "messages lost, repeated or out of order across the crash"
    await assert_next_delivery_is_new(a, b)
