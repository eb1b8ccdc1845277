"""Unit tests of the MQTT adapter's pure parts: the topic scheme and envelopes, the
PUBLISH encoder (checked against amqtt's decoder), and Mosquitto's hash format (checked
against a line mosquitto_passwd wrote)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.publish import PublishPacket

from device_adapters.mqtt import codec
from device_adapters.mqtt.codec import BadEnvelope
from device_adapters.mqtt.mosquitto import acl_text, check_password, hash_password
from device_adapters.mqtt.packets import append_publish
from fishchat_iot import errors
from fishchat_iot.core.envelope import Envelope

P = codec.prefix("alice")


def test_topic_scheme() -> None:
    assert (P, codec.inbox("alice")) == ("fc/alice/", "fc/alice/in")
    assert codec.split_topic("fc/alice/p2p/bob", P) == ("p2p", "bob")
    assert codec.split_topic("fc/alice/topic/room", P) == ("topic", "room")
    assert codec.split_topic("fc/alice/ack", P) == ("ack", "")
    assert codec.split_topic("fc/alice/ctl", P) == ("ctl", "")
    for topic, code in [
        ("fc/bob/p2p/alice", errors.FORBIDDEN),
        ("fc/alicex/p2p/bob", errors.FORBIDDEN),
        ("fc/alice/in", errors.UNKNOWN_COMMAND),
        ("fc/alice/ack/x", errors.UNKNOWN_COMMAND),
        ("fc/alice/p2p", errors.BAD_ARGS),
        ("fc/alice/p2p/a/b", errors.BAD_ARGS),
    ]:
        with pytest.raises(BadEnvelope) as info:
            codec.split_topic(topic, P)
        assert info.value.code == code, topic


def test_uplink_envelopes() -> None:
    up = codec.parse_uplink("p2p", "bob", b'{"id": "m1", "body": "hi", "ts": 5}', 100)
    assert (up.id, up.body, up.target) == ("m1", "hi", "bob")
    up = codec.parse_uplink("ack", "", b'{"ids": ["a", "b"]}', 100)
    assert up.ids == ["a", "b"]
    up = codec.parse_uplink("ctl", "", b'{"op": "join_topic", "topic": "room"}', 100)
    assert (up.op, up.target) == ("join_topic", "room")
    with pytest.raises(BadEnvelope) as info:
        codec.parse_uplink("p2p", "bob", b'{"id": "m1", "body": "x"}', 10)
    assert info.value.code == errors.FRAME_TOO_LARGE
    with pytest.raises(BadEnvelope) as info:
        codec.parse_uplink("p2p", "bob", b'{"id": "m1", "body": "x", "enc": "aes"}', 100)
    assert (info.value.code, info.value.ref) == (errors.BAD_ARGS, "m1")


def test_inbox_envelopes() -> None:
    env = Envelope("m1", "alice", "bob", "hi", 7, 1)
    assert orjson.loads(codec.delivery(env)) == {
        "kind": "p2p",
        "id": "m1",
        "from": "alice",
        "to": "bob",
        "ts": 7,
        "body": "hi",
        "enc": "none",
    }
    env = Envelope("m2", "alice", "bob", "hi", 7, 1, "topic", "room")
    assert orjson.loads(codec.delivery(env))["topic"] == "room"
    assert orjson.loads(codec.error("E", "t", "r")) == {
        "kind": "error",
        "code": "E",
        "text": "t",
        "ref": "r",
    }


@pytest.mark.parametrize(("qos", "size"), [(0, 5), (1, 5), (1, 200), (1, 20000), (0, 3_000_000)])
def test_publish_encoding_matches_amqtt(qos: int, size: int) -> None:
    out = bytearray()
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    append_publish(out, b"fc/bob/in", payload, qos, 4242)
    packet = asyncio.run(PublishPacket.from_stream(BufferReader(bytes(out))))
    assert (packet.topic_name, packet.qos, packet.data) == ("fc/bob/in", qos, payload)
    if qos:
        assert packet.packet_id == 4242


def test_mosquitto_hash() -> None:
    # Written by mosquitto_passwd 2.0.11 for the password "secret".
    theirs = (
        "$7$101$lMZCqMTL88tjRQ29$M9WOvWokiigiPJB11vqT/ppfbM5zwOuA57iuhn2qvAzC73CGuY4dpIEs1E"
        "ORXvGUhyHBydNAVqI/T4BsYRX8wQ=="
    )
    assert check_password(theirs, "secret") and not check_password(theirs, "Secret")
    import base64

    assert hash_password("secret", salt=base64.b64decode("lMZCqMTL88tjRQ29")) == theirs
    mine = hash_password("a token")
    assert mine != hash_password("a token")  # salted
    assert check_password(mine, "a token") and not check_password("$6$x$y", "a token")
    acl = acl_text(["gw"])
    assert "user gw\ntopic read fc/+/p2p/+" in acl and "pattern read fc/%u/in" in acl
