"""Session lifecycle: a second login replaces the first, keepalive, logout, revocation."""

from __future__ import annotations

import asyncio
import time

from support.raw_client import (
    Connect,
    RawClient,
    assert_next_delivery_is_new,
    recv_deliveries,
)
from support.server import ServerFactory, ServerProcess


async def test_second_login_replaces_the_first(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    first = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await b.send_p2p(a_id, "to the first", "m1")
    assert await b.expect("ACCEPTED") == ["m1"]
    assert (await first.expect("RESP_MESSAGE_P2P"))[2] == "m1"  # not acked

    second = await connect(up_server.msg_server, a_id, tokens[a_id])
    await first.expect_error("SESSION_REPLACED")
    assert await first.expect_closed() == []

    # The unacked message moves to the new session; new messages go there too.
    assert (await second.expect("RESP_MESSAGE_P2P"))[:3] == ["to the first", b_id, "m1"]
    await b.send_p2p(a_id, "to the second", "m2")
    assert await b.expect("ACCEPTED") == ["m2"]
    assert (await second.expect("RESP_MESSAGE_P2P"))[:3] == ["to the second", b_id, "m2"]
    await second.ack(a_id, "m1", "m2")
    await assert_next_delivery_is_new(b, second)


async def keep_pinging(client: RawClient, every: float, until: asyncio.Event) -> None:
    while not until.is_set():
        await client.ping()
        try:
            await asyncio.wait_for(until.wait(), every)
        except TimeoutError:
            pass


async def test_silent_session_is_closed_after_keepalive_and_its_messages_queue(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    server = up_server_factory("--keepalive", "1", config={"tcp": {"login_timeout": 1}})
    tokens = server.register_many(["quiet", "busy", "sender"])
    server.register("quiet-v1", v1=True)

    mark = server.log_mark()
    idle = await connect(server.msg_server)  # connects, never logs in
    quiet = await connect(server.msg_server, "quiet", tokens["quiet"])
    logged_in = time.monotonic()
    quiet_v1 = await connect(server.msg_server, "quiet-v1", None)
    busy = await connect(server.msg_server, "busy", tokens["busy"])
    stop = asyncio.Event()
    pinger = asyncio.create_task(keep_pinging(busy, 0.2, stop))
    try:
        await quiet.expect_error("KEEPALIVE_TIMEOUT", timeout=15)
        assert await quiet.expect_closed() == []
        assert time.monotonic() - logged_in >= 0.9  # not before the keepalive
        assert await quiet_v1.expect_closed(timeout=15) == []  # v1: closed, no frame
        # Not logged in within tcp.login_timeout: told, closed, logged once.
        frames = await idle.expect_closed(timeout=15)
        assert [(f.cmd, f.args[0]) for f in frames] == [("ERROR", "NOT_LOGGED_IN")], frames
        assert len([w for w in server.warnings_since(mark) if idle.local in w]) == 1
        # Traffic keeps a session open well past the keepalive.
        await asyncio.sleep(1.5)
        assert not busy.is_closed and not pinger.done()
    finally:
        stop.set()
        await pinger

    sender = await connect(server.msg_server, "sender", tokens["sender"])
    ids = ["k1", "k2", "k3"]
    for to in ("quiet", "quiet-v1"):
        await sender.send_frames(("SEND_MESSAGE_P2P", [to, f"n-{m}", "sender", m]) for m in ids)
        for m in ids:
            assert await sender.expect("ACCEPTED") == [m]

    quiet = await connect(server.msg_server, "quiet", tokens["quiet"])
    assert [g[2] for g in await recv_deliveries(quiet, 3)] == ids
    await quiet.ack("quiet", *ids)
    quiet_v1 = await connect(server.msg_server, "quiet-v1", None)
    assert await recv_deliveries(quiet_v1, 3) == [[f"n-{m}", "sender", m] for m in ids]


async def test_logout_closes_and_messages_queue_until_next_login(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await a.send("LOGOUT")
    assert await a.expect("OK") == ["LOGOUT", a_id]
    assert await a.expect_closed() == []
    await b.send_p2p(a_id, "while you were out", "m1")
    assert await b.expect("ACCEPTED") == ["m1"]
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    assert (await a.expect("RESP_MESSAGE_P2P"))[:3] == ["while you were out", b_id, "m1"]
    await a.ack(a_id, "m1")
    await assert_next_delivery_is_new(b, a)


async def test_revoking_a_device_cuts_its_session_and_its_logins(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    await asyncio.to_thread(up_server.revoke, a_id)
    await a.expect_error("REVOKED", timeout=15)  # "within seconds"
    assert await a.expect_closed() == []

    again = await connect(up_server.msg_server)
    await again.send("SEND_CLIENT_ID", a_id, tokens[a_id])
    await again.expect_error("REVOKED")
    assert await again.expect_closed() == []

    await b.send_p2p(a_id, "hello?", "m1")
    await b.expect_error("UNKNOWN_DEVICE", ref="m1")
    await b.ping()
