"""FishChatServer v1 compatibility: a client speaking exactly the v1 frames (login
``[id]`` without a token, no trailing newline) on the default listener. A v1 session is
sent only v1 frames with v1 argument counts, whatever it does."""

from __future__ import annotations

import pytest
from support.raw_client import (
    Connect,
    RawClient,
    assert_next_delivery_is_new,
    encode,
    gateway_lookup,
)
from support.server import ServerFactory, ServerProcess


async def v1_send(client: RawClient, cmd: str, *args: str) -> None:
    await client.send(cmd, *args, newline=False)


async def test_v1_client_full_conversation(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    v1a_id, v1b_id, tok_id = f"{uid}-v1a", f"{uid}-v1b", f"{uid}-tok"
    up_server.register_many([v1a_id, v1b_id], v1=True)
    tok_token = up_server.register(tok_id)

    # Step one, as v1 clients do: ask the gateway where to go.
    addr = await gateway_lookup(up_server.gateway)
    assert addr == up_server.msg_server

    v1a = await connect(addr, v1a_id, None)
    v1b = await connect(addr, v1b_id, None)
    tok = await connect(addr, tok_id, tok_token)

    # v1 -> token device: delivered with the real sender and a server-chosen id.
    await v1_send(v1a, "SEND_MESSAGE_P2P", tok_id, "hi token", v1a_id)
    body, sender, mid, ts = await tok.expect("RESP_MESSAGE_P2P")
    assert (body, sender) == ("hi token", v1a_id) and mid and ts.isdigit()
    await tok.ack(tok_id, mid)

    # v1 -> v1: RESP_MESSAGE_P2P [msg, from, uuid], exactly three args; then the ack.
    await v1_send(v1a, "SEND_MESSAGE_P2P", v1b_id, "hi v1b", v1a_id)
    args = await v1b.expect("RESP_MESSAGE_P2P")
    assert len(args) == 3 and args[:2] == ["hi v1b", v1a_id] and args[2], args
    await v1_send(v1b, "P2P_ACK", v1b_id, args[2])

    # token -> v1: the sender's id is the uuid.
    await tok.send_p2p(v1a_id, "hi v1a", "tok-1")
    assert await tok.expect("ACCEPTED") == ["tok-1"]
    assert await v1a.expect("RESP_MESSAGE_P2P") == ["hi v1a", tok_id, "tok-1"]
    await v1_send(v1a, "P2P_ACK", v1a_id, "tok-1")

    # Topics: CREATE_TOPIC gets no answer in v1; JOIN_TOPIC names this msg_server.
    topic = f"{uid}-room"
    await v1_send(v1a, "CREATE_TOPIC", topic)
    await v1_send(v1a, "JOIN_TOPIC", topic, v1a_id)  # the creator is a member already
    assert await v1a.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]
    await v1_send(v1b, "JOIN_TOPIC", topic, v1b_id)
    assert await v1b.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]
    await tok.send("JOIN_TOPIC", topic, tok_id)
    assert await tok.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]

    await v1_send(v1a, "SEND_MESSAGE_TOPIC", topic, "hello topic")
    assert await v1b.expect("RESP_MESSAGE_TOPIC") == [topic, "hello topic", v1a_id]
    args = await tok.expect("RESP_MESSAGE_TOPIC")
    assert args[:3] == [topic, "hello topic", v1a_id] and len(args) == 5, args
    await tok.ack(tok_id, args[3])

    await tok.send("SEND_MESSAGE_TOPIC", topic, "hello v1 members", "tok-t1")
    assert await tok.expect("ACCEPTED") == ["tok-t1"]
    for v1 in (v1a, v1b):
        assert await v1.expect("RESP_MESSAGE_TOPIC") == [topic, "hello v1 members", tok_id]

    # SEND_PING gets nothing back: the next frame v1a sees is the answer to a JOIN.
    await v1_send(v1a, "SEND_PING", "PING")
    await v1_send(v1a, "JOIN_TOPIC", topic, v1a_id)
    assert await v1a.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]

    # What v1 cannot be told (errors, receipts) is not sent: these are logged only.
    await v1_send(v1a, "SEND_MESSAGE_P2P", f"{uid}-nobody", "to nobody", v1a_id)
    await v1_send(v1a, "SEND_MESSAGE_TOPIC", f"{uid}-nosuch", "to no topic")
    await v1_send(v1a, "CREATE_TOPIC", topic)  # exists already
    await v1_send(v1a, "JOIN_TOPIC", topic, v1a_id)
    assert await v1a.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]

    # Acked messages do not come back at the next login.
    await v1a.close()
    await v1b.close()
    v1a = await connect(addr, v1a_id, None)
    v1b = await connect(addr, v1b_id, None)
    await assert_next_delivery_is_new(tok, v1a)
    await assert_next_delivery_is_new(tok, v1b)

    for v1 in (v1a, v1b):
        assert v1.v1_violations() == []
        assert not v1.is_closed


async def test_v1_unacked_message_comes_again(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    v1_id, tok_id = f"{uid}-v1", f"{uid}-tok"
    up_server.register(v1_id, v1=True)
    tok = await connect(up_server.msg_server, tok_id, up_server.register(tok_id))
    v1 = await connect(up_server.msg_server, v1_id, None)
    await tok.send_p2p(v1_id, "ack me", "m1")
    assert await tok.expect("ACCEPTED") == ["m1"]
    assert await v1.expect("RESP_MESSAGE_P2P") == ["ack me", tok_id, "m1"]
    await v1.close()
    v1 = await connect(up_server.msg_server, v1_id, None)
    assert await v1.expect("RESP_MESSAGE_P2P") == ["ack me", tok_id, "m1"]
    await v1_send(v1, "P2P_ACK", v1_id, "m1")
    await assert_next_delivery_is_new(tok, v1)
    assert v1.v1_violations() == []


@pytest.mark.parametrize(
    "login",
    [
        pytest.param(["%s-nobody"], id="unknown-device"),
        pytest.param(["%s-tok"], id="device-not-registered-v1"),
        pytest.param(["%s/bad"], id="invalid-id"),
        pytest.param(["%s-revoked"], id="revoked-device"),
    ],
)
async def test_v1_login_refused_closes_without_a_frame(
    up_server: ServerProcess, uid: str, connect: Connect, login: list[str]
) -> None:
    up_server.register(f"{uid}-tok")
    up_server.register(f"{uid}-revoked", v1=True)
    up_server.revoke(f"{uid}-revoked")
    device_id = login[0] % uid
    mark = up_server.log_mark()
    client = await connect(up_server.msg_server)
    await client.send("SEND_CLIENT_ID", device_id, newline=False)
    assert await client.expect_closed() == []
    lines = [line for line in up_server.warnings_since(mark) if client.local in line]
    assert len(lines) == 1, up_server.warnings_since(mark)


async def test_v1_login_refused_on_a_server_started_with_no_v1(
    up_server_factory: ServerFactory, connect: Connect
) -> None:
    server = up_server_factory("--no-v1")
    token = server.register("old", v1=True)
    mark = server.log_mark()
    client = await connect(server.msg_server)
    await client.send("SEND_CLIENT_ID", "old", newline=False)
    assert await client.expect_closed() == []
    assert len([w for w in server.warnings_since(mark) if client.local in w]) == 1
    # The same device may still log in with its token.
    tok = await connect(server.msg_server, "old", token)
    await tok.ping()


async def test_replaced_v1_session_is_closed_without_a_frame(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    v1_id, tok_id = f"{uid}-v1", f"{uid}-tok"
    up_server.register(v1_id, v1=True)
    tok = await connect(up_server.msg_server, tok_id, up_server.register(tok_id))
    first = await connect(up_server.msg_server, v1_id, None)
    await assert_next_delivery_is_new(tok, first)
    second = await connect(up_server.msg_server, v1_id, None)
    assert await first.expect_closed() == []
    await assert_next_delivery_is_new(tok, second)
    assert first.v1_violations() == [] and second.v1_violations() == []


async def test_v1_member_offline_gets_a_topic_message_once(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """v1 cannot ack topic messages (RESP_MESSAGE_TOPIC has no id): one queued while it
    was offline counts as delivered once written, and does not come back at every login."""
    v1_id, tok_id = f"{uid}-v1", f"{uid}-tok"
    up_server.register(v1_id, v1=True)
    tok = await connect(up_server.msg_server, tok_id, up_server.register(tok_id))
    topic = f"{uid}-room"
    await tok.send("CREATE_TOPIC", topic)
    assert await tok.expect("OK") == ["CREATE_TOPIC", topic]
    v1 = await connect(up_server.msg_server, v1_id, None)
    await v1_send(v1, "JOIN_TOPIC", topic, v1_id)
    assert await v1.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]
    await v1.close()

    await tok.send("SEND_MESSAGE_TOPIC", topic, "while you were away", "t-1")
    assert await tok.expect("ACCEPTED") == ["t-1"]
    v1 = await connect(up_server.msg_server, v1_id, None)
    assert await v1.expect("RESP_MESSAGE_TOPIC") == [topic, "while you were away", tok_id]
    await assert_next_delivery_is_new(tok, v1)
    await v1.close()

    v1 = await connect(up_server.msg_server, v1_id, None)
    await assert_next_delivery_is_new(tok, v1)  # not the topic message again
    assert v1.v1_violations() == []


async def test_v1_pipelined_join_then_send_reaches_the_members(
    up_server: ServerProcess, uid: str, connect: Connect
) -> None:
    """A v1 client never learns whether CREATE_TOPIC / JOIN_TOPIC worked before it
    sends: its commands must take effect in the order sent."""
    v1_id, tok_id = f"{uid}-v1", f"{uid}-tok"
    up_server.register(v1_id, v1=True)
    tok = await connect(up_server.msg_server, tok_id, up_server.register(tok_id))
    v1 = await connect(up_server.msg_server, v1_id, None)
    topic, fresh = f"{uid}-room", f"{uid}-new"
    await tok.send("CREATE_TOPIC", topic)
    assert await tok.expect("OK") == ["CREATE_TOPIC", topic]
    await tok.send("SEND_MESSAGE_TOPIC", topic, "alone", "t-0")  # the server caches it
    assert await tok.expect("ACCEPTED") == ["t-0"]
    await tok.send("SEND_MESSAGE_TOPIC", fresh, "nobody", "t-1")  # known not to exist
    await tok.expect_error("UNKNOWN_TOPIC", ref="t-1")

    await v1.send_raw(
        b"".join(
            encode(cmd, *args, newline=False)
            for cmd, args in [
                ("JOIN_TOPIC", [topic, v1_id]),
                ("SEND_MESSAGE_TOPIC", [topic, "joined and said hi"]),
                ("CREATE_TOPIC", [fresh]),
                ("SEND_MESSAGE_TOPIC", [fresh, "created and said hi"]),
                ("JOIN_TOPIC", [fresh, v1_id]),
            ]
        )
    )
    assert await v1.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, topic]
    args = await tok.expect("RESP_MESSAGE_TOPIC")
    assert args[:3] == [topic, "joined and said hi", v1_id], args
    await tok.ack(tok_id, args[3])
    assert await v1.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, fresh]
    # The message to the fresh topic was accepted (no other member to see it): the
    # v1 log shows no UNKNOWN_TOPIC for it.
    await tok.send("JOIN_TOPIC", fresh, tok_id)
    assert await tok.expect("LOCATE_TOPIC_MSG_ADDR") == [up_server.msg_server, fresh]
    await v1_send(v1, "SEND_MESSAGE_TOPIC", fresh, "now with company")
    assert (await tok.expect("RESP_MESSAGE_TOPIC"))[:3] == [fresh, "now with company", v1_id]
    assert not [w for w in up_server.log_text().splitlines() if fresh in w and "UNKNOWN" in w]
    assert v1.v1_violations() == []
