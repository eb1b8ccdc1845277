"""Per sender->receiver order while the receiver's state changes under a stream of
messages: logging in mid-stream, reconnecting mid-stream, two senders at once."""

from __future__ import annotations

import asyncio

from support.raw_client import Connect, RawClient, assert_next_delivery_is_new
from support.server import ServerProcess

TOTAL = 3000


async def stream(sender: RawClient, to: str, ids: list[str], chunk: int = 100) -> None:
    """Send ``ids`` in chunks, pacing a little so the receiver's changes interleave."""
    for start in range(0, len(ids), chunk):
        await sender.send_frames(
            ("SEND_MESSAGE_P2P", [to, f"body of {m}", sender.device_id, m])
            for m in ids[start : start + chunk]
        )
        await asyncio.sleep(0.002)


async def wait_receipts(sender: RawClient, ids: list[str], at_least: int) -> set[str]:
    """Read ACCEPTED receipts until ``at_least`` arrived (each once, for a sent id)."""
    want, got = set(ids), set[str]()
    while len(got) < at_least:
        (mid,) = await sender.expect("ACCEPTED", timeout=30)
        assert mid in want and mid not in got, mid
        got.add(mid)
    return got


async def read_acking(receiver: RawClient, n: int, by_sender: dict[str, list[str]]) -> int:
    """Read ``n`` deliveries, acking every 100; returns how many were read."""
    unacked: list[str] = []
    for _ in range(n):
        body, sender, mid, _ts = await receiver.expect("RESP_MESSAGE_P2P", timeout=30)
        assert body == f"body of {mid}", (body, mid)
        by_sender.setdefault(sender, []).append(mid)
        unacked.append(mid)
        if len(unacked) == 100:
            await receiver.ack(receiver.device_id, *unacked)
            unacked = []
    if unacked:
        await receiver.ack(receiver.device_id, *unacked)
    return n


async def test_receiver_logging_in_mid_stream_gets_everything_in_order(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    ids = [f"m{n}" for n in range(TOTAL)]
    sending = asyncio.create_task(stream(a, b_id, ids))
    receipts = await wait_receipts(a, ids, 300)  # some queued before b logs in

    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    got: dict[str, list[str]] = {}
    await read_acking(b, TOTAL, got)
    await sending
    receipts |= await wait_receipts(a, ids, TOTAL - len(receipts))
    assert got == {a_id: ids}
    await assert_next_delivery_is_new(a, b)


async def test_receiver_reconnecting_mid_stream_loses_nothing_and_keeps_order(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    ids = [f"m{n}" for n in range(TOTAL)]
    sending = asyncio.create_task(stream(a, b_id, ids))
    index = {m: i for i, m in enumerate(ids)}

    sessions: list[list[str]] = []
    seen: set[str] = set()
    acked: set[str] = set()
    acked_at_cut: list[int] = []
    for cut in (750, 1550, None):  # acks go every 100: the last 50 are unacked at a cut
        wire: list[str] = []
        while len(seen) < TOTAL and (cut is None or len(seen) < cut):
            body, sender, mid, _ts = await b.expect("RESP_MESSAGE_P2P", timeout=30)
            assert (body, sender) == (f"body of {mid}", a_id)
            wire.append(mid)
            seen.add(mid)
            if len(wire) % 100 == 0:
                await b.ack(b_id, *wire[-100:])
                acked.update(wire[-100:])
        sessions.append(wire)
        acked_at_cut.append(len(acked))
        if cut is not None:
            await b.close()  # gone without a word; unacked ones must come again
            b = await connect(up_server.msg_server, b_id, tokens[b_id])
    if len(sessions[-1]) % 100:
        await b.ack(b_id, *sessions[-1][-(len(sessions[-1]) % 100) :])
    await sending
    await wait_receipts(a, ids, TOTAL)

    for n, wire in enumerate(sessions):
        positions = [index[m] for m in wire]
        # Each session: a contiguous run, in order, with no repeats.
        assert positions == list(range(positions[0], positions[0] + len(positions))), n
    for n in range(1, len(sessions)):
        # A new session starts with the first message not acked: the unacked tail of
        # the previous session comes again.
        assert index[sessions[n][0]] == acked_at_cut[n - 1]
        assert index[sessions[n][0]] < index[sessions[n - 1][-1]]
    assert list(dict.fromkeys(m for wire in sessions for m in wire)) == ids
    await assert_next_delivery_is_new(a, b)


async def test_two_senders_streaming_to_one_receiver_each_in_order(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, c_id, b_id = f"{uid}-a", f"{uid}-c", f"{uid}-b"
    tokens = up_server.register_many([a_id, c_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    c = await connect(up_server.msg_server, c_id, tokens[c_id])
    a_ids = [f"a{n}" for n in range(1500)]
    c_ids = [f"c{n}" for n in range(1500)]
    sends = [
        asyncio.create_task(stream(a, b_id, a_ids)),
        asyncio.create_task(stream(c, b_id, c_ids)),
    ]
    await wait_receipts(a, a_ids, 200)
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    got: dict[str, list[str]] = {}
    await read_acking(b, 3000, got)
    await asyncio.gather(*sends)
    assert got == {a_id: a_ids, c_id: c_ids}


async def test_receiver_replaced_repeatedly_mid_stream_keeps_order(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """The receiver logs in again and again on new connections (each replacing the
    last, which still has unacked messages) while the sender streams."""
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    ids = [f"m{n}" for n in range(TOTAL)]
    index = {m: i for i, m in enumerate(ids)}
    sending = asyncio.create_task(stream(a, b_id, ids))

    seen: list[str] = []
    acked = 0
    for round_ in range(8):
        wire: list[str] = []
        while len(wire) < 250 and len(set(seen)) < TOTAL:
            body, sender, mid, _ts = await b.expect("RESP_MESSAGE_P2P", timeout=30)
            assert sender == a_id and body == f"body of {mid}"
            wire.append(mid)
            if len(wire) % 100 == 0:
                await b.ack(b_id, *wire[-100:])
                acked = max(acked, index[wire[-1]] + 1)
        positions = [index[m] for m in wire]
        assert positions == list(range(positions[0], positions[0] + len(positions))), round_
        assert positions[0] <= (index[seen[-1]] + 1 if seen else 0), round_  # no gap
        seen += wire
        new = await connect(up_server.msg_server, b_id, tokens[b_id])  # replaces b
        while (frame := await b.recv()).cmd == "RESP_MESSAGE_P2P":
            pass  # still on its way to the old connection: not acked, so it comes again
        assert frame.cmd == "ERROR" and frame.args[0] == "SESSION_REPLACED", frame
        assert await b.expect_closed() == []
        b = new
        # The new session starts with the first message that was not acked.
        body, sender, first, _ts = await b.expect("RESP_MESSAGE_P2P", timeout=30)
        assert index[first] == acked, (round_, first, acked)
        await b.ack(b_id, first)  # acked; it is the first of the next round's wire too
        seen.append(first)
        acked = max(acked, index[first] + 1)
    await sending
    rest: list[str] = []
    while len(set(seen) | set(rest)) < TOTAL:
        rest.append((await b.expect("RESP_MESSAGE_P2P", timeout=30))[2])
        await b.ack(b_id, rest[-1])
    assert list(dict.fromkeys(seen + rest)) == ids
    await wait_receipts(a, ids, TOTAL)
