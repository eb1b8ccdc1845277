"""Gateway-terminated devices (docs/crypto.md section 7): devices too small for X25519
share a random 32-byte pre-shared key (PSK) with the gateway. They seal what they send
under it (enc ``psk-chacha20poly1305``, the header of docs/crypto.md as associated data,
the body layout of end-to-end bodies); the msg_server opens it on arrival, the body is
then routed like any plaintext body (sealed at rest when queued, ``atrest.py``), and
sealed again under the recipient's PSK when it is written to a PSK device.

The registry holds each PSK only sealed under the server key (``AtRest.seal_psk``).
``PskKeys`` opens it once per session and keeps it on the session (``Session.psk``) for
the session's lifetime (a ``device rotate`` cuts the device's sessions, so a session
never outlives its key).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fishchat_iot.core.envelope import KIND_TOPIC, Envelope
from fishchat_iot.crypto.seal import (
    ENC_PSK,
    CryptoError,
    SealedBody,
    b64d,
    b64e,
    open_body,
    psk_header,
    seal_body,
)

if TYPE_CHECKING:
    from fishchat_iot.core.session import Session
    from fishchat_iot.crypto.atrest import AtRest
    from fishchat_iot.roles.manager import Manager


def open_from_device(key: bytes, sender: str, to: str, kind: str, msg_id: str, body: str) -> str:
    """The plaintext of a body a PSK device sealed (base64 wire form) for ``to`` (device
    or topic); CryptoError when the tag does not verify or the layout is wrong."""
    sealed = b64d(body)
    ts = SealedBody.from_bytes(sealed).ts
    plain = open_body(key, psk_header(msg_id, sender, to, ts, kind), sealed)
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise CryptoError("the opened body is not UTF-8 text") from None


def seal_to_device(key: bytes, env: Envelope) -> str:
    """``env``'s plaintext body sealed under its recipient's PSK (base64), for
    ``to`` = the recipient (p2p) or the topic, with the envelope's ts."""
    to = env.topic if env.kind == KIND_TOPIC else env.to
    h = psk_header(env.id, env.sender, to, env.ts, env.kind)
    return b64e(seal_body(key, h, env.body.encode("utf-8")))


class PskKeys:
    """Opens the PSKs of logged-in gateway-terminated devices from the registry under
    the server key, once per session; the key lives on the session (``Session.psk``:
    one slot, read on every delivery without a lookup)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def _atrest(self) -> AtRest | None:
        # EmbeddedApp's store is a SealedStore that holds the server key.
        return getattr(self.manager.store, "atrest", None)

    async def load(self, s: Session) -> bytes | None:
        """The session's PSK (looked up once). StoreUnavailable propagates; a sealed PSK
        that does not open (another server key) raises CryptoError."""
        if s.psk is not False:
            return s.psk
        rec = await self.manager.device(s.device_id)
        key = None
        if rec is not None and rec.psk:
            atrest = self._atrest()
            if atrest is None:
                raise CryptoError("the server key is not loaded")
            key = atrest.open_psk(rec.id, rec.psk)
        s.psk = key
        return key


__all__ = ["ENC_PSK", "PskKeys", "open_from_device", "seal_to_device"]


def for_last_hop(s: Session, env: Envelope) -> Envelope:
    """``env`` as the session's device must get it: a plaintext body sealed under its
    PSK when it is a gateway-terminated device (every transport's ``emit_message``)."""
    if env.enc == "none":
        key = s.psk
        if key:
            return dataclasses.replace(env, body=seal_to_device(key, env), enc=ENC_PSK)
    return env
