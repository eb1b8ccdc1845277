"""The device side of end-to-end encryption, transport-independent: the SDKs
(``firmware_sim.tcp_device``, ``mqtt_device``) hold one ``DeviceCrypto`` and call it to
seal what they send and open what they receive.

Topic keys travel as p2p control messages, sealed like any other p2p body; their
plaintext is the JSON object ``{"fc": "topic-key", "topic": name, "epoch": n,
"key": base64}`` (see docs/crypto.md). The SDK consumes them: the application never
sees them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from fishchat_iot.crypto.seal import (
    ENC_GROUP,
    ENC_NONE,
    ENC_P2P,
    ENC_PSK,
    KEY_LEN,
    CryptoError,
    Header,
    SealedBody,
    b64d,
    b64e,
    enc_label,
    open_body,
    p2p_key,
    parse_enc,
    psk_header,
    public_from_private,
    seal_body,
)

CONTROL_TOPIC_KEY = "topic-key"


@dataclass(slots=True)
class Opened:
    text: str
    control: dict[str, object] | None = None  # a consumed control message (topic key)


@dataclass
class DeviceCrypto:
    device_id: str
    private: bytes
    public: bytes = b""
    peers: dict[str, bytes] = field(default_factory=dict)  # device id -> public key
    # topic -> epoch -> key; and the epoch this device seals with.
    group_keys: dict[str, dict[int, bytes]] = field(default_factory=dict)
    current_epoch: dict[str, int] = field(default_factory=dict)
    _pair: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.public:
            self.public = public_from_private(self.private)

    @classmethod
    def from_b64(cls, device_id: str, private_b64: str) -> DeviceCrypto:
        return cls(device_id, b64d(private_b64))

    # -- keys ------------------------------------------------------------------------
    def add_peer(self, peer_id: str, public: bytes) -> None:
        if self.peers.get(peer_id) != public:
            self.peers[peer_id] = public
            self._pair.pop(peer_id, None)

    def pair_key(self, peer_id: str) -> bytes:
        key = self._pair.get(peer_id)
        if key is None:
            pub = self.peers.get(peer_id)
            if pub is None:
                raise CryptoError(f"no public key of {peer_id!r}")
            key = p2p_key(self.private, self.device_id, pub, peer_id)
            self._pair[peer_id] = key
        return key

    def new_topic_epoch(self, topic: str) -> tuple[int, bytes]:
        """A fresh random group key for ``topic``, one epoch after the current one."""
        epoch = max(self.group_keys.get(topic, {0: b""}).keys(), default=0) + 1
        key = os.urandom(KEY_LEN)
        self.set_topic_key(topic, epoch, key)
        return epoch, key

    def set_topic_key(self, topic: str, epoch: int, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise CryptoError("a group key is 32 bytes")
        self.group_keys.setdefault(topic, {})[epoch] = key
        if epoch >= self.current_epoch.get(topic, 0):
            self.current_epoch[topic] = epoch

    def topic_key_control(self, topic: str) -> str:
        """The plaintext of the control message handing the current key of ``topic``."""
        epoch = self.current_epoch.get(topic)
        if epoch is None:
            raise CryptoError(f"no key for topic {topic!r}")
        key = self.group_keys[topic][epoch]
        return json.dumps(
            {"fc": CONTROL_TOPIC_KEY, "topic": topic, "epoch": epoch, "key": b64e(key)},
            separators=(",", ":"),
        )

    # -- sealing ---------------------------------------------------------------------
    def seal_p2p(self, to: str, msg_id: str, text: str, ts: int | None = None) -> tuple[str, str]:
        """-> (sealed body as base64, enc)."""
        h = Header(msg_id, self.device_id, to, ts or _now_ms(), "p2p", ENC_P2P, 0)
        return b64e(seal_body(self.pair_key(to), h, text.encode("utf-8"))), ENC_P2P

    def seal_topic(
        self, topic: str, msg_id: str, text: str, ts: int | None = None
    ) -> tuple[str, str]:
        epoch = self.current_epoch.get(topic)
        if epoch is None:
            raise CryptoError(f"no key for topic {topic!r}: ask its owner")
        key = self.group_keys[topic][epoch]
        h = Header(msg_id, self.device_id, topic, ts or _now_ms(), "topic", ENC_GROUP, epoch)
        return b64e(seal_body(key, h, text.encode("utf-8"))), enc_label(ENC_GROUP, epoch)

    # -- opening ---------------------------------------------------------------------
    def open(
        self,
        *,
        sender: str,
        msg_id: str,
        body: str,
        enc: str,
        topic: str = "",
        apply_control: bool = True,
    ) -> Opened:
        """Open a delivery; CryptoError when it cannot be (tampered, wrong key, wrong
        recipient). A p2p topic-key control message is returned as such, and applied
        unless ``apply_control`` is False (the SDKs first check that its sender owns
        the topic, then call ``apply_control``)."""
        if enc == ENC_NONE:
            raise CryptoError("plaintext message on an end-to-end session")
        scheme, epoch = parse_enc(enc)
        sealed = b64d(body)
        ts = SealedBody.from_bytes(sealed).ts
        if topic:
            if scheme != ENC_GROUP:
                raise CryptoError(f"topic message sealed with {scheme}")
            key = self.group_keys.get(topic, {}).get(epoch)
            if key is None:
                raise CryptoError(f"no key for topic {topic!r} epoch {epoch}")
            h = Header(msg_id, sender, topic, ts, "topic", ENC_GROUP, epoch)
            return Opened(open_body(key, h, sealed).decode("utf-8", "replace"))
        if scheme != ENC_P2P:
            raise CryptoError(f"p2p message sealed with {scheme}")
        h = Header(msg_id, sender, self.device_id, ts, "p2p", ENC_P2P, 0)
        text = open_body(self.pair_key(sender), h, sealed).decode("utf-8", "replace")
        ctl = _control(text)
        if ctl is not None and apply_control:
            self.apply_control(ctl)
        return Opened(text, ctl)

    def apply_control(self, ctl: dict[str, object]) -> None:
        """Take the topic key a control message hands over."""
        self.set_topic_key(str(ctl["topic"]), int(str(ctl["epoch"])), b64d(str(ctl["key"])))


def _control(text: str) -> dict[str, object] | None:
    if not text.startswith('{"fc":'):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if (
        isinstance(obj, dict)
        and obj.get("fc") == CONTROL_TOPIC_KEY
        and isinstance(obj.get("topic"), str)
        and isinstance(obj.get("epoch"), int)
        and isinstance(obj.get("key"), str)
    ):
        return obj
    return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class PskCrypto:
    """The device side of gateway-terminated mode (docs/crypto.md section 7): what the
    device sends is sealed under its pre-shared key for the gateway, which opens it;
    what it receives the gateway sealed under the same key."""

    device_id: str
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != KEY_LEN:
            raise CryptoError("a pre-shared key is 32 bytes")

    @classmethod
    def from_b64(cls, device_id: str, psk_b64: str) -> PskCrypto:
        return cls(device_id, b64d(psk_b64))

    def seal(
        self, kind: str, to: str, msg_id: str, text: str, ts: int | None = None
    ) -> tuple[str, str]:
        """-> (sealed body as base64, enc); ``to`` is the recipient or the topic."""
        h = psk_header(msg_id, self.device_id, to, ts or _now_ms(), kind)
        return b64e(seal_body(self.key, h, text.encode("utf-8"))), ENC_PSK

    def open(self, *, sender: str, msg_id: str, body: str, topic: str = "") -> str:
        """Open a delivery the gateway sealed for this device; CryptoError when it does
        not open (changed on the way, another device's, another key)."""
        sealed = b64d(body)
        ts = SealedBody.from_bytes(sealed).ts
        kind, to = ("topic", topic) if topic else ("p2p", self.device_id)
        h = psk_header(msg_id, sender, to, ts, kind)
        return open_body(self.key, h, sealed).decode("utf-8", "replace")
