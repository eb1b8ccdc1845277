"""End-to-end sealing of message bodies (DESIGN section 4, docs/crypto.md).

Device side and server side share this module: devices seal and open p2p and topic
bodies; the server only needs ``generate_keypair`` (provisioning) and never sees a
private key or a group key.
"""

from fishchat_iot.crypto.seal import (
    ENC_GROUP,
    ENC_NONE,
    ENC_P2P,
    ENC_PSK,
    CryptoError,
    Header,
    KeyPair,
    SealedBody,
    b64d,
    b64e,
    enc_label,
    generate_keypair,
    header_bytes,
    open_body,
    p2p_key,
    parse_enc,
    public_from_private,
    seal_body,
)

__all__ = [
    "ENC_GROUP",
    "ENC_NONE",
    "ENC_P2P",
    "ENC_PSK",
    "CryptoError",
    "Header",
    "KeyPair",
    "SealedBody",
    "b64d",
    "b64e",
    "enc_label",
    "generate_keypair",
    "header_bytes",
    "open_body",
    "p2p_key",
    "parse_enc",
    "public_from_private",
    "seal_body",
]
