"""Topic keys are taken from the topic's owner only (docs/crypto.md section 5): a key a
member or an outsider seals to a member is ignored, so nobody but the owner can make
members seal topic messages under a key it chose. Against a real ``fishchat-iot up``."""

from __future__ import annotations

import os
from typing import Any

import pytest
from support.raw_client import RawClient
from support.server import ServerProcess
from support.waiting import eventually, nothing_more

from firmware_sim.mqtt_device import MqttDevice
from fishchat_iot import errors

from .test_e2e_server import device, register


@pytest.fixture
def server(up_server_factory: Any) -> ServerProcess:
    return up_server_factory()  # type: ignore[no-any-return]


async def test_a_topic_key_from_a_non_owner_is_ignored(server: ServerProcess, uid: str) -> None:
    ba, bb, bc, bx = (register(server, f"{uid}-{n}") for n in "abcx")
    topic = f"{uid}-t"
    async with (
        device(server, ba) as a,
        device(server, bb) as b,
        device(server, bc) as c,
        device(server, bx) as x,
    ):
        await a.create_topic(topic)
        await b.join_topic(topic)
        await c.join_topic(topic)
        # c, a member, makes up a key and hands it to b before the owner does
        assert c.crypto is not None and b.crypto is not None
        c.crypto.new_topic_epoch(topic)
        await c.send_topic_key(topic, bb["id"])
        await eventually(lambda: b.topic_keys_refused == 1, "b refused c's key")
        assert b.topic_keys_received == 0 and topic not in b.crypto.group_keys
        # the owner's key is taken
        assert await a.share_topic_key(topic, [bb["id"], bc["id"]]) == 1
        await eventually(lambda: b.topic_keys_received == 1, "b took a's key")
        # a later, higher epoch from c or from an outsider does not displace it
        for _ in range(4):
            c.crypto.new_topic_epoch(topic)
        await c.send_topic_key(topic, bb["id"])
        assert x.crypto is not None
        x.crypto.set_topic_key(topic, 9, os.urandom(32))
        await x.send_topic_key(topic, bb["id"])
        await eventually(lambda: b.topic_keys_refused == 3, "b refused both")
        assert b.crypto.current_epoch[topic] == 1 and set(b.crypto.group_keys[topic]) == {1}
        # b seals with the owner's epoch: a opens it, nothing arrives unopened
        await b.publish(topic, "with the owner's key")
        m = await a.receive(timeout=10)
        assert (m.text, m.enc) == ("with the owner's key", "group-chacha20poly1305:1")
        assert a.open_failed == b.open_failed == 0
        await nothing_more(b)


async def test_get_topic_owner_answers_members_only(server: ServerProcess, uid: str) -> None:
    ba, bb, bx = (register(server, f"{uid}-{n}") for n in "abx")
    topic = f"{uid}-t"
    async with device(server, ba) as a:
        await a.create_topic(topic)
    async with await RawClient.connect(server.msg_server) as b:
        await b.login(bb["id"], bb["token"])
        await b.send("JOIN_TOPIC", topic)
        await b.expect("LOCATE_TOPIC_MSG_ADDR")
        await b.send("GET_TOPIC_OWNER", topic)
        assert await b.expect("TOPIC_OWNER") == [topic, ba["id"]]
        await b.send("GET_TOPIC_OWNER", f"{uid}-none")
        await b.expect_error(errors.UNKNOWN_TOPIC, f"{uid}-none")
    async with await RawClient.connect(server.msg_server) as x:
        await x.login(bx["id"], bx["token"])
        await x.send("GET_TOPIC_OWNER", topic)
        await x.expect_error(errors.NOT_A_MEMBER, topic)


async def test_mqtt_member_takes_keys_from_a_pinned_owner_only(
    server: ServerProcess, uid: str
) -> None:
    ba, bc, bm = (register(server, f"{uid}-{n}") for n in "acm")
    topic = f"{uid}-t"
    m = MqttDevice.from_bundle(bm, broker=server.ready["mqtt"], e2e=True, backoff_max=0.5)
    async with device(server, ba) as a, device(server, bc) as c, m:
        await a.create_topic(topic)
        await c.join_topic(topic)
        await m.join_topic(topic)
        # A pinned owner: another member's key is ignored without asking the server
        # (tests/crypto/test_e2e_mqtt.py: an unpinned one is asked with ctl topic_owner).
        m.set_topic_owner(topic, ba["id"])
        assert c.crypto is not None
        c.crypto.new_topic_epoch(topic)
        await c.send_topic_key(topic, bm["id"])
        await eventually(lambda: m.topic_keys_refused == 1, "m refused c's key")
        await a.share_topic_key(topic, [bm["id"], bc["id"]])
        await eventually(lambda: m.topic_keys_received == 1, "m took a's key")
        assert m.crypto is not None and m.crypto.current_epoch[topic] == 1
