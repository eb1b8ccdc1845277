"""Framing edge cases that are valid input: the size limit exactly, frames split into
single bytes, many frames in one write, commands pipelined behind a login."""

from __future__ import annotations

import json

from support.raw_client import Connect, assert_next_delivery_is_new, encode
from support.server import ServerProcess

MAX_FRAME = 65536  # tcp.max_frame default


def p2p_frame_of_length(length: int, to: str, sender: str, mid: str) -> tuple[bytes, str]:
    """A SEND_MESSAGE_P2P frame whose length prefix is exactly ``length``; its body."""
    overhead = len(encode("SEND_MESSAGE_P2P", to, "", sender, mid)) - 4
    body = "x" * (length - overhead)
    frame = encode("SEND_MESSAGE_P2P", to, body, sender, mid)
    assert int.from_bytes(frame[:4], "big") == length
    return frame, body


async def test_frame_of_exactly_max_frame_is_accepted_and_one_more_byte_is_not(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id, v1_id = f"{uid}-a", f"{uid}-b", f"{uid}-v1"
    tokens = up_server.register_many([a_id, b_id])
    up_server.register(v1_id, v1=True)
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    v1 = await connect(up_server.msg_server, v1_id, None)

    for to, reader in ((b_id, b), (v1_id, v1)):
        frame, body = p2p_frame_of_length(MAX_FRAME, to, a_id, f"big-{to}")
        await a.send_raw(frame)
        assert await a.expect("ACCEPTED") == [f"big-{to}"]
        args = await reader.expect("RESP_MESSAGE_P2P")
        assert args[:3] == [body, a_id, f"big-{to}"]  # intact, though the frame is bigger
        await reader.send("P2P_ACK", to, f"big-{to}")
    assert v1.v1_violations() == []

    frame, _ = p2p_frame_of_length(MAX_FRAME + 1, b_id, a_id, "too-big")
    await a.send_raw(frame)
    frames = await a.expect_closed()
    assert [(f.cmd, f.args[0]) for f in frames] == [("ERROR", "FRAME_TOO_LARGE")], frames
    a = await connect(up_server.msg_server, a_id, tokens[a_id])
    await assert_next_delivery_is_new(a, b)  # "too-big" was never taken


async def test_frames_split_into_single_bytes_and_many_in_one_write(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])
    a = await connect(up_server.msg_server)
    data = encode("SEND_CLIENT_ID", a_id, tokens[a_id]) + encode(
        "SEND_MESSAGE_P2P", b_id, "byte by byte", a_id, "s-1"
    )
    for i in range(len(data)):
        await a.send_raw(data[i : i + 1])
    assert await a.expect("LOGIN_OK") == [a_id]
    assert await a.expect("ACCEPTED") == ["s-1"]
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["byte by byte", a_id, "s-1"]

    # Frames with and without the trailing newline, and JSON with spaces and escapes.
    spaced = json.dumps(
        {"Args": [b_id, "spaced \u00e9", a_id, "s-2"], "CmdName": "SEND_MESSAGE_P2P"}
    )
    body = spaced.encode()
    await a.send_raw(
        encode("SEND_MESSAGE_P2P", b_id, "no newline", a_id, "s-3", newline=False)
        + len(body).to_bytes(4, "big")
        + body
    )
    assert [await a.expect("ACCEPTED") for _ in range(2)] == [["s-3"], ["s-2"]]
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["no newline", a_id, "s-3"]
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["spaced é", a_id, "s-2"]
    await b.ack(b_id, "s-1", "s-2", "s-3")


async def test_commands_pipelined_behind_a_login(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    a_id, b_id = f"{uid}-a", f"{uid}-b"
    tokens = up_server.register_many([a_id, b_id])
    b = await connect(up_server.msg_server, b_id, tokens[b_id])

    # A good login: what follows it in the same write is served after LOGIN_OK.
    a = await connect(up_server.msg_server)
    await a.send_raw(
        encode("SEND_CLIENT_ID", a_id, tokens[a_id])
        + encode("SEND_MESSAGE_P2P", b_id, "right behind", a_id, "p-1")
        + encode("SEND_PING", "PING")
    )
    assert await a.expect("LOGIN_OK") == [a_id]
    a.device_id = a_id
    assert await a.expect("ACCEPTED") == ["p-1"]
    assert await a.expect("PONG") == []
    assert (await b.expect("RESP_MESSAGE_P2P"))[:3] == ["right behind", a_id, "p-1"]
    await b.ack(b_id, "p-1")

    # A failed login: nothing behind it is served.
    mark = up_server.log_mark()
    bad = await connect(up_server.msg_server)
    await bad.send_raw(
        encode("SEND_CLIENT_ID", a_id, "not-the-token")
        + encode("SEND_MESSAGE_P2P", b_id, "sneaking in", a_id, "p-2")
    )
    frames = await bad.expect_closed()
    assert [(f.cmd, f.args[0]) for f in frames] == [("ERROR", "AUTH_FAILED")], frames
    await assert_next_delivery_is_new(a, b)
    assert len(up_server.warnings_since(mark)) == 1
