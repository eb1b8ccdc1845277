"""docs/crypto.md: the test vectors on the page are what the code computes, and they
check out against an independent computation (HKDF by hand from RFC 5869, the AEAD
straight from ``cryptography``); plus the construction's unit properties."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fishchat_iot.crypto import (
    ENC_GROUP,
    ENC_P2P,
    CryptoError,
    Header,
    generate_keypair,
    header_bytes,
    open_body,
    p2p_key,
    parse_enc,
    seal_body,
)
from fishchat_iot.crypto.device import DeviceCrypto
from fishchat_iot.crypto.vectors import vectors

DOC = Path(__file__).resolve().parents[2] / "docs" / "crypto.md"


def doc_vectors() -> dict[str, dict[str, str]]:
    text = DOC.read_text()
    out: dict[str, dict[str, str]] = {}
    for name, block in re.findall(r"<!-- vector (\w+) -->\n```text\n(.*?)```", text, re.S):
        out[name] = dict(line.split(None, 1) for line in block.strip().splitlines())
    return out


def test_the_vectors_in_the_doc_are_what_the_code_computes() -> None:
    assert doc_vectors() == vectors()


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_p2p_vector_independently() -> None:
    v = doc_vectors()["p2p"]
    info = b"fishchat-iot p2p key" + b"\x00\x05alice" + b"\x00\x03bob"
    key = _hkdf(bytes.fromhex(v["shared_secret"]), b"fishchat-iot/e2e/v1", info)
    assert key.hex() == v["pair_key"]
    sealed = bytes.fromhex(v["sealed"])
    assert sealed[0] == 1 and sealed[1:5] == b"\0\0\0\0"
    assert int.from_bytes(sealed[5:13], "big") == int(v["ts"])
    assert sealed[13:25].hex() == v["nonce"]
    plain = ChaCha20Poly1305(key).decrypt(sealed[13:25], sealed[25:], bytes.fromhex(v["header"]))
    assert plain.hex() == v["plaintext"]


def test_topic_vector_independently() -> None:
    v = doc_vectors()["topic"]
    sealed = bytes.fromhex(v["sealed"])
    assert int.from_bytes(sealed[1:5], "big") == int(v["epoch"]) == 3
    plain = ChaCha20Poly1305(bytes.fromhex(v["group_key"])).decrypt(
        sealed[13:25], sealed[25:], bytes.fromhex(v["header"])
    )
    assert plain == b"temp=21.5"


@pytest.mark.parametrize("name", ["psk_up", "psk_down"])
def test_psk_vectors_independently(name: str) -> None:
    v = doc_vectors()[name]

    # the header by hand: magic, str(id), str(from), str(to), ts, str(kind), str(enc), epoch
    def s(x: str) -> bytes:
        return len(x).to_bytes(2, "big") + x.encode()

    header = (
        (b"FCE1" + s(v["id"]) + s(v["from"]) + s(v["to"]) + int(v["ts"]).to_bytes(8, "big"))
        + s("p2p")
        + s("psk-chacha20poly1305")
        + bytes(4)
    )
    assert header.hex() == v["header"]
    sealed = bytes.fromhex(v["sealed"])
    assert sealed[:5] == b"\x01\0\0\0\0" and sealed[13:25].hex() == v["nonce"]
    assert int.from_bytes(sealed[5:13], "big") == int(v["ts"])
    plain = ChaCha20Poly1305(bytes.fromhex(v["psk"])).decrypt(sealed[13:25], sealed[25:], header)
    assert plain.hex() == v["plaintext"]


def test_psk_device_and_gateway_open_each_other() -> None:
    from fishchat_iot.core.envelope import Envelope
    from fishchat_iot.crypto.device import PskCrypto
    from fishchat_iot.crypto.gateway import open_from_device, seal_to_device

    key = bytes(range(32))
    dev = PskCrypto("lamp", key)
    body, enc = dev.seal("p2p", "bob", "m-1", "on")
    assert enc == "psk-chacha20poly1305"
    assert open_from_device(key, "lamp", "bob", "p2p", "m-1", body) == "on"
    with pytest.raises(CryptoError):
        open_from_device(key, "lamp", "carol", "p2p", "m-1", body)  # moved
    with pytest.raises(CryptoError):
        open_from_device(key, "lamp", "bob", "topic", "m-1", body)  # another kind
    env = Envelope("m-2", "bob", "lamp", "ok", 1764201602000, 1)
    assert dev.open(sender="bob", msg_id="m-2", body=seal_to_device(key, env)) == "ok"
    topic = Envelope("m-3", "bob", "lamp", "t", 1764201602000, 2, "topic", "room")
    assert dev.open(sender="bob", msg_id="m-3", body=seal_to_device(key, topic), topic="room")
    with pytest.raises(CryptoError):
        dev.open(sender="bob", msg_id="m-3", body=seal_to_device(key, topic))  # not p2p


def test_pair_key_is_symmetric_and_bound_to_the_ids() -> None:
    a, b = generate_keypair(), generate_keypair()
    k = p2p_key(a.private, "a", b.public, "b")
    assert k == p2p_key(b.private, "b", a.public, "a")
    assert k != p2p_key(a.private, "a", b.public, "c")
    with pytest.raises(CryptoError):
        p2p_key(a.private, "a", bytes(32), "b")  # low-order point


def test_every_header_field_and_every_body_bit_is_authenticated() -> None:
    key = bytes(range(32))
    h = Header("id1", "alice", "bob", 1000, "p2p", ENC_P2P, 0)
    sealed = seal_body(key, h, b"secret")
    assert open_body(key, h, sealed) == b"secret"
    for other in (
        Header("id2", "alice", "bob", 1000, "p2p", ENC_P2P, 0),
        Header("id1", "carol", "bob", 1000, "p2p", ENC_P2P, 0),
        Header("id1", "alice", "carol", 1000, "p2p", ENC_P2P, 0),
        Header("id1", "alice", "bob", 1000, "topic", ENC_P2P, 0),
        Header("id1", "alice", "bob", 1000, "p2p", ENC_GROUP, 0),
    ):
        with pytest.raises(CryptoError):
            open_body(key, other, sealed)
    for i in range(len(sealed) * 8):
        bad = bytearray(sealed)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CryptoError):
            open_body(key, h, bytes(bad))
    # Layouts are unambiguous: ("ab", "c") and ("a", "bc") differ.
    assert header_bytes(Header("ab", "c", "", 0, "p2p", ENC_P2P)) != header_bytes(
        Header("a", "bc", "", 0, "p2p", ENC_P2P)
    )


def test_parse_enc() -> None:
    assert parse_enc("x25519-chacha20poly1305") == (ENC_P2P, 0)
    assert parse_enc("group-chacha20poly1305:7") == (ENC_GROUP, 7)
    for bad in ("none", "rot13", "group-chacha20poly1305:x", "group-chacha20poly1305:-1"):
        with pytest.raises(CryptoError):
            parse_enc(bad)


def test_device_crypto_p2p_topic_and_rotation() -> None:
    ka, kb, kc = generate_keypair(), generate_keypair(), generate_keypair()
    a = DeviceCrypto("a", ka.private)
    b = DeviceCrypto("b", kb.private)
    c = DeviceCrypto("c", kc.private)
    for d in (a, b, c):
        d.peers.update({"a": ka.public, "b": kb.public, "c": kc.public})
    body, enc = a.seal_p2p("b", "m1", "hi b")
    assert b.open(sender="a", msg_id="m1", body=body, enc=enc).text == "hi b"
    with pytest.raises(CryptoError):  # moved to another recipient
        c.open(sender="a", msg_id="m1", body=body, enc=enc)
    # topic: a owns it, hands epoch 1 to b and c
    a.new_topic_epoch("t")
    for d in (b, c):
        ctl, cenc = a.seal_p2p(d.device_id, "k-" + d.device_id, a.topic_key_control("t"))
        opened = d.open(sender="a", msg_id="k-" + d.device_id, body=ctl, enc=cenc)
        assert opened.control is not None
    tb, tenc = b.seal_topic("t", "t1", "to all")
    assert c.open(sender="b", msg_id="t1", body=tb, enc=tenc, topic="t").text == "to all"
    # c is removed: epoch 2 goes to b only
    a.new_topic_epoch("t")
    ctl, cenc = a.seal_p2p("b", "k2", a.topic_key_control("t"))
    b.open(sender="a", msg_id="k2", body=ctl, enc=cenc)
    tb, tenc = b.seal_topic("t", "t2", "after removal")
    assert tenc.endswith(":2")
    assert a.open(sender="b", msg_id="t2", body=tb, enc=tenc, topic="t").text == "after removal"
    with pytest.raises(CryptoError):
        c.open(sender="b", msg_id="t2", body=tb, enc=tenc, topic="t")
