"""The test vectors of docs/crypto.md, computed from fixed inputs (tests/crypto checks the
page against them; ``python -m fishchat_iot.crypto.vectors`` prints them)."""

from __future__ import annotations

from fishchat_iot.crypto.seal import (
    ENC_GROUP,
    ENC_P2P,
    Header,
    enc_label,
    header_bytes,
    p2p_key,
    psk_header,
    public_from_private,
    seal_body,
)


def vectors() -> dict[str, dict[str, str]]:
    """name -> {field: value}; bytes as lowercase hex, text as is."""
    a_priv = bytes(range(1, 33))
    b_priv = bytes(range(101, 133))
    a_pub, b_pub = public_from_private(a_priv), public_from_private(b_priv)
    key = p2p_key(a_priv, "alice", b_pub, "bob")
    assert key == p2p_key(b_priv, "bob", a_pub, "alice")
    h = Header("m-0001", "alice", "bob", 1764201600000, "p2p", ENC_P2P, 0)
    nonce = bytes(range(200, 212))
    body = b"hello, bob"
    p2p = {
        "alice_private": a_priv.hex(),
        "alice_public": a_pub.hex(),
        "bob_private": b_priv.hex(),
        "bob_public": b_pub.hex(),
        "shared_secret": _x25519(a_priv, b_pub).hex(),
        "pair_key": key.hex(),
        "id": h.id,
        "from": h.sender,
        "to": h.to,
        "ts": str(h.ts),
        "kind": h.kind,
        "enc": enc_label(ENC_P2P, 0),
        "header": header_bytes(h).hex(),
        "nonce": nonce.hex(),
        "plaintext": body.hex(),
        "sealed": seal_body(key, h, body, nonce).hex(),
    }
    gkey = bytes(range(64, 96))
    gh = Header("m-0002", "alice", "sensors", 1764201600500, "topic", ENC_GROUP, 3)
    gnonce = bytes(range(12))
    gbody = b"temp=21.5"
    topic = {
        "group_key": gkey.hex(),
        "id": gh.id,
        "from": gh.sender,
        "to": gh.to,
        "ts": str(gh.ts),
        "kind": gh.kind,
        "enc": enc_label(ENC_GROUP, 3),
        "epoch": str(gh.epoch),
        "header": header_bytes(gh).hex(),
        "nonce": gnonce.hex(),
        "plaintext": gbody.hex(),
        "sealed": seal_body(gkey, gh, gbody, gnonce).hex(),
    }
    # Gateway-terminated device "lamp": what it sends to "bob" (sealed for the gateway,
    # to = bob) and what the gateway writes to it from "bob" (to = lamp itself).
    psk = bytes(range(160, 192))
    up = psk_header("m-0003", "lamp", "bob", 1764201601000, "p2p")
    down = psk_header("m-0004", "bob", "lamp", 1764201602000, "p2p")
    psk_up = _psk_vector(psk, up, bytes(range(12, 24)), b"on")
    psk_down = _psk_vector(psk, down, bytes(range(24, 36)), b"ok")
    return {"p2p": p2p, "topic": topic, "psk_up": psk_up, "psk_down": psk_down}


def _psk_vector(psk: bytes, h: Header, nonce: bytes, plaintext: bytes) -> dict[str, str]:
    """One PSK vector: the key, the header's fields and bytes, and the sealed body."""
    return {
        "psk": psk.hex(),
        "id": h.id,
        "from": h.sender,
        "to": h.to,
        "ts": str(h.ts),
        "kind": h.kind,
        "enc": h.enc,
        "header": header_bytes(h).hex(),
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "sealed": seal_body(psk, h, plaintext, nonce).hex(),
    }


def _x25519(private: bytes, public: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


if __name__ == "__main__":
    for name, fields in vectors().items():
        print(f"<!-- vector {name} -->")
        print("```text")
        for k, v in fields.items():
            print(f"{k:14} {v}")
        print("```")
