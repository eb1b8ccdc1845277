"""Sealing at rest (docs/crypto.md section 7): bodies that are not sealed end to end (v1
sessions, plaintext token sessions) are sealed with ChaCha20-Poly1305 under a server key
before they reach a durable queue, and opened when they are read back for delivery.

The key is 32 random bytes in ``{data_dir}/server.key`` (base64, one line, mode 0600),
created on the first start; it is never in the database. Live deliveries (the hot path)
never touch it: only the store hand-off and the queue feed do, through ``SealedStore``,
which wraps any ``Store``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fishchat_iot.core.envelope import Envelope
from fishchat_iot.crypto.seal import (
    KEY_LEN,
    NONCE_LEN,
    CryptoError,
    Header,
    b64d,
    b64e,
    header_bytes,
    str_field,
)
from fishchat_iot.files import create_once
from fishchat_iot.stores.base import Enqueued, Store

log = logging.getLogger("fishchat.crypto")

ENC_AT_REST = "server-chacha20poly1305"
# Associated data of a device's pre-shared key sealed at rest: this label, then str(id).
PSK_AT_REST_AD = b"fishchat-iot/psk-at-rest/v1"
SERVER_KEY_FILE = "server.key"
KEY_MODE = 0o600


def load_server_key(path: str | Path) -> bytes:
    """The server key in ``path``, created (mode 0600, never over an existing file) when
    there is none. CryptoError when the file is unusable or readable by others.

    Roles of one cluster may start at once on one data directory, so creation is atomic:
    the key is written and synced in a private temporary file, which is then hard-linked
    to ``path`` (a link never replaces an existing file). Whoever links first wins; every
    reader sees either no file or the whole key, never a file still being written."""
    p = Path(path)
    # Durable before anything is sealed under it: a key lost in a crash would leave
    # every queued body sealed under it unreadable.
    if not p.exists() and create_once(p, b64e(os.urandom(KEY_LEN)) + "\n", KEY_MODE):
        log.debug("created the server key %s (mode 0600)", p)
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise CryptoError(f"server key {p} has mode {mode:o}: it must be 0600 (chmod 600 {p})")
    try:
        key = b64d(p.read_text(encoding="ascii").strip())
    except (UnicodeDecodeError, CryptoError):
        raise CryptoError(f"server key {p} is not base64") from None
    if len(key) != KEY_LEN:
        raise CryptoError(f"server key {p} does not hold 32 bytes")
    return key


class AtRest:
    """Seal / open one envelope's body under the server key. The header of docs/crypto.md
    (id, from, to, ts, kind, enc = ``server-chacha20poly1305``, epoch 0) is the associated
    data; the stored body is base64(nonce (12) | ciphertext | tag)."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    @staticmethod
    def _ad(env: Envelope) -> bytes:
        return header_bytes(Header(env.id, env.sender, env.to, env.ts, env.kind, ENC_AT_REST, 0))

    def seal(self, env: Envelope) -> Envelope:
        if env.enc != "none":
            return env  # already ciphertext (end to end)
        nonce = os.urandom(NONCE_LEN)
        ct = self._aead.encrypt(nonce, env.body.encode("utf-8"), self._ad(env))
        return replace(env, body=b64e(nonce + ct), enc=ENC_AT_REST)

    def seal_psk(self, device_id: str, psk: bytes) -> str:
        """A gateway-terminated device's pre-shared key as the registry stores it:
        base64(nonce (12) | ciphertext | tag), associated data = PSK_AT_REST_AD |
        str(device id) (a sealed key copied to another device does not open)."""
        if len(psk) != KEY_LEN:
            raise CryptoError("a pre-shared key is 32 bytes")
        nonce = os.urandom(NONCE_LEN)
        return b64e(nonce + self._aead.encrypt(nonce, psk, _psk_ad(device_id)))

    def open_psk(self, device_id: str, sealed: str) -> bytes:
        """The pre-shared key sealed by ``seal_psk``; CryptoError when it does not open
        (another server key, another device's row, a changed row)."""
        raw = b64d(sealed)
        try:
            psk = self._aead.decrypt(raw[:NONCE_LEN], raw[NONCE_LEN:], _psk_ad(device_id))
        except (InvalidTag, ValueError):
            raise CryptoError(
                f"the pre-shared key of {device_id!r} does not open under the server key"
            ) from None
        if len(psk) != KEY_LEN:
            raise CryptoError(f"the pre-shared key of {device_id!r} is not 32 bytes")
        return psk

    def open(self, env: Envelope) -> Envelope:
        if env.enc != ENC_AT_REST:
            return env
        try:
            raw = b64d(env.body)
            body = self._aead.decrypt(raw[:NONCE_LEN], raw[NONCE_LEN:], self._ad(env))
        except (CryptoError, InvalidTag, ValueError):
            # Wrong or replaced server key, or a changed row: delivered as it is (a token
            # session's SDK drops a body it cannot open; a v1 session is not sent it).
            log.error(
                "queued message %s from %s to %s does not open under the server key",
                env.id,
                env.sender,
                env.to,
            )
            return env
        return replace(env, body=body.decode("utf-8"), enc="none")


def _psk_ad(device_id: str) -> bytes:
    return PSK_AT_REST_AD + str_field(device_id)


class SealedStore:
    """A ``Store`` whose offline queues hold bodies sealed at rest: ``enqueue`` seals,
    ``pending`` opens; everything else is the wrapped store's."""

    def __init__(self, inner: Store, atrest: AtRest | None = None) -> None:
        self._inner = inner
        self.atrest = atrest  # set before the first enqueue (EmbeddedApp.start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _keyed(self) -> AtRest:
        if self.atrest is None:
            raise RuntimeError("the server key is not loaded")
        return self.atrest

    async def enqueue(self, envelopes: Sequence[Envelope], max_len: int) -> list[Enqueued]:
        seal = self._keyed().seal
        return await self._inner.enqueue([seal(e) for e in envelopes], max_len)

    async def pending(self, device_id: str, after_okey: int, limit: int) -> list[Envelope]:
        opened = self._keyed().open
        return [opened(e) for e in await self._inner.pending(device_id, after_okey, limit)]

    def as_store(self) -> Store:
        return cast(Store, self)
