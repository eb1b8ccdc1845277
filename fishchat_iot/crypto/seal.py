"""The construction of docs/crypto.md: X25519 + HKDF-SHA256 pairwise keys, group keys per
topic epoch, ChaCha20-Poly1305 with the message header as associated data.

Wire form of a sealed body (base64, standard alphabet with padding, in the frame):

    0x01 | epoch u32 BE | ts u64 BE | nonce (12) | ciphertext || tag (16)

Associated data (the canonical header, see ``header_bytes``):

    "FCE1" | str(id) | str(from) | str(to) | ts u64 BE | str(kind) | str(enc) | epoch u32 BE

where ``str(x)`` is u16 BE length followed by the UTF-8 bytes. ``to`` is the recipient
device id for p2p and the topic name for topic messages.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENC_NONE = "none"
ENC_P2P = "x25519-chacha20poly1305"
ENC_GROUP = "group-chacha20poly1305"
ENC_PSK = "psk-chacha20poly1305"  # gateway-terminated: a pre-shared device key
ENC_KINDS = frozenset({ENC_P2P, ENC_GROUP, ENC_PSK})

VERSION = 1
AD_MAGIC = b"FCE1"
P2P_SALT = b"fishchat-iot/e2e/v1"
P2P_INFO = b"fishchat-iot p2p key"
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
_PREFIX = struct.Struct(">BIQ")  # version, epoch, ts
MIN_SEALED = _PREFIX.size + NONCE_LEN + TAG_LEN


class CryptoError(Exception):
    """A body that cannot be opened: wrong key, tampered header or body, bad layout."""


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CryptoError(f"not base64: {exc}") from None


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: bytes  # 32 raw bytes
    public: bytes  # 32 raw bytes

    @property
    def private_b64(self) -> str:
        return b64e(self.private)

    @property
    def public_b64(self) -> str:
        return b64e(self.public)


def generate_keypair() -> KeyPair:
    priv = X25519PrivateKey.generate()
    return KeyPair(_raw_private(priv), _raw_public(priv.public_key()))


def public_from_private(private: bytes) -> bytes:
    return _raw_public(_private(private).public_key())


def _raw_private(k: X25519PrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _raw_public(k: X25519PublicKey) -> bytes:
    return k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_LEN:
        raise CryptoError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise CryptoError("header field longer than 65535 bytes")
    return struct.pack(">H", len(b)) + b


def str_field(s: str) -> bytes:
    """``str(x)`` of docs/crypto.md: u16 BE length, then the UTF-8 bytes."""
    return _str(s)


def p2p_key(my_private: bytes, my_id: str, peer_public: bytes, peer_id: str) -> bytes:
    """The pairwise key of two devices (the same from both sides).

    HKDF-SHA256(ikm = X25519(my_private, peer_public), salt = P2P_SALT,
    info = P2P_INFO | str(lo) | str(hi)), 32 bytes, where lo < hi are the two device ids
    ordered by their UTF-8 bytes.
    """
    if len(peer_public) != KEY_LEN:
        raise CryptoError("an X25519 public key is 32 bytes")
    try:
        shared = _private(my_private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # cryptography refuses an all-zero result itself
        shared = bytes(KEY_LEN)
    if shared == bytes(KEY_LEN):
        raise CryptoError("peer public key is a low-order point")
    lo, hi = sorted((my_id, peer_id), key=lambda s: s.encode("utf-8"))
    info = P2P_INFO + _str(lo) + _str(hi)
    return HKDF(hashes.SHA256(), KEY_LEN, P2P_SALT, info).derive(shared)


@dataclass(frozen=True, slots=True)
class Header:
    id: str
    sender: str
    to: str  # recipient device id (p2p) or topic name (topic)
    ts: int
    kind: str  # "p2p" or "topic"
    enc: str  # ENC_P2P, ENC_GROUP or ENC_PSK (without the epoch)
    epoch: int = 0


def header_bytes(h: Header) -> bytes:
    """The canonical byte layout of the header: the AEAD's associated data."""
    return (
        AD_MAGIC
        + _str(h.id)
        + _str(h.sender)
        + _str(h.to)
        + struct.pack(">Q", h.ts)
        + _str(h.kind)
        + _str(h.enc)
        + struct.pack(">I", h.epoch)
    )


def psk_header(msg_id: str, sender: str, to: str, ts: int, kind: str) -> Header:
    """The header of a body sealed under a gateway-terminated device's pre-shared key:
    ``to`` is the recipient device (p2p) or the topic (topic), enc ``psk-...``, epoch 0.
    The device seals what it sends with ``to`` = where it sends it; the gateway seals
    what it delivers to the device with ``to`` = the device itself (p2p) or the topic."""
    return Header(msg_id, sender, to, ts, kind, ENC_PSK, 0)


def enc_label(enc: str, epoch: int) -> str:
    """The envelope's ``enc`` field: ``x25519-chacha20poly1305`` for p2p (epoch 0),
    ``group-chacha20poly1305:<epoch>`` for topics."""
    return enc if epoch == 0 and enc != ENC_GROUP else f"{enc}:{epoch}"


def parse_enc(label: str) -> tuple[str, int]:
    """``enc`` field -> (scheme, epoch); CryptoError when the scheme is unknown."""
    scheme, _, ep = label.partition(":")
    if scheme not in ENC_KINDS:
        raise CryptoError(f"unknown enc {label[:60]!r}")
    try:
        epoch = int(ep) if ep else 0
    except ValueError:
        raise CryptoError(f"bad key epoch in enc {label[:60]!r}") from None
    if not 0 <= epoch <= 0xFFFFFFFF:
        raise CryptoError(f"bad key epoch in enc {label[:60]!r}")
    return scheme, epoch


@dataclass(frozen=True, slots=True)
class SealedBody:
    epoch: int
    ts: int
    nonce: bytes
    ciphertext: bytes  # with the 16-byte tag at the end

    def to_bytes(self) -> bytes:
        return _PREFIX.pack(VERSION, self.epoch, self.ts) + self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedBody:
        if len(data) < MIN_SEALED:
            raise CryptoError("sealed body too short")
        version, epoch, ts = _PREFIX.unpack_from(data)
        if version != VERSION:
            raise CryptoError(f"unknown sealed body version {version}")
        n = _PREFIX.size
        return cls(epoch, ts, data[n : n + NONCE_LEN], data[n + NONCE_LEN :])


def seal_body(key: bytes, header: Header, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """Seal ``plaintext``; returns the wire bytes (prefix | nonce | ciphertext | tag).
    ``nonce`` is random unless given (test vectors only)."""
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise CryptoError("nonce is 12 bytes")
    ct = ChaCha20Poly1305(key).encrypt(nonce, plaintext, header_bytes(header))
    return SealedBody(header.epoch, header.ts, nonce, ct).to_bytes()


def open_body(key: bytes, header: Header, sealed: bytes) -> bytes:
    """Open wire bytes sealed under ``key`` for ``header`` (whose ``ts`` and ``epoch``
    must be those of the sealed body's prefix); CryptoError when anything was changed."""
    sb = SealedBody.from_bytes(sealed)
    if sb.epoch != header.epoch or sb.ts != header.ts:
        raise CryptoError("header does not match the sealed body")
    try:
        return ChaCha20Poly1305(key).decrypt(sb.nonce, sb.ciphertext, header_bytes(header))
    except InvalidTag:
        raise CryptoError("authentication failed: wrong key, or header or body changed") from None
