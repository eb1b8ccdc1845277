"""End-to-end encryption across transports: an MQTT device and a TCP device exchange
sealed p2p and topic messages through a real ``fishchat-iot up`` (embedded broker); the
plaintext is never in the server's SQLite file or log."""

from __future__ import annotations

import os
from typing import Any

from support.server import ServerProcess
from support.waiting import eventually

from firmware_sim.mqtt_device import MqttDevice

from .test_e2e_server import device, register, scan


async def test_mqtt_and_tcp_devices_exchange_sealed_messages(
    up_server_factory: Any, uid: str
) -> None:
    server: ServerProcess = up_server_factory()
    bm, bt = register(server, f"{uid}-m"), register(server, f"{uid}-t")
    marker = f"MQTT-MARKER-{os.urandom(6).hex()}"
    m = MqttDevice.from_bundle(bm, broker=server.ready["mqtt"], e2e=True, backoff_max=0.5)
    async with m, device(server, bt) as t:
        await m.send(bt["id"], f"{marker} from mqtt")
        got = await t.receive(timeout=10)
        assert (got.sender, got.text, got.enc) == (
            bm["id"],
            f"{marker} from mqtt",
            "x25519-chacha20poly1305",
        )
        await t.send(bm["id"], f"{marker} from tcp")
        got = await m.receive(timeout=10)
        assert (got.sender, got.text) == (bt["id"], f"{marker} from tcp")
        topic = f"{uid}-room"
        await m.create_topic(topic)
        await t.join_topic(topic)
        await m.share_topic_key(topic, [bt["id"]])
        await eventually(lambda: t.topic_keys_received == 1, "t has the topic key")
        await m.publish(topic, f"{marker} topic")
        got = await t.receive(timeout=10)
        assert (got.topic, got.text) == (topic, f"{marker} topic")
        await t.publish(topic, f"{marker} topic back")
        got = await m.receive(timeout=10)
        assert got.text == f"{marker} topic back"
        assert m.open_failed == t.open_failed == 0
    assert scan(server, marker.encode()) == []


async def test_an_mqtt_member_takes_the_topic_key_from_the_owner_only(
    up_server_factory: Any, uid: str
) -> None:
    """The MQTT SDK asks the gateway who owns a topic (ctl ``topic_owner``) when a key
    arrives: the owner's is taken, another member's is ignored."""
    server: ServerProcess = up_server_factory()
    bo, bx = register(server, f"{uid}-o"), register(server, f"{uid}-x")
    bm = register(server, f"{uid}-m")
    m = MqttDevice.from_bundle(bm, broker=server.ready["mqtt"], e2e=True, backoff_max=0.5)
    async with m, device(server, bo) as owner, device(server, bx) as other:
        topic = f"{uid}-room"
        await owner.create_topic(topic)
        await other.join_topic(topic)
        await m.join_topic(topic)
        # Not the owner: ignored, whatever epoch it claims.
        await other.share_topic_key(topic, [bm["id"]])
        await eventually(lambda: m.topic_keys_refused == 1, "m refused the member's key")
        await owner.share_topic_key(topic, [bm["id"], bx["id"]])
        await eventually(lambda: m.topic_keys_received == 1, "m took the owner's key")
        await owner.publish(topic, "for the members")
        got = await m.receive(timeout=10)
        assert (got.sender, got.topic, got.text) == (bo["id"], topic, "for the members")
        assert m.open_failed == 0
