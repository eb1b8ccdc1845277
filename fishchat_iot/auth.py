"""Device credentials: random 256-bit tokens, stored only as their SHA-256, checked in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> str:
    """A fresh 256-bit token, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    # A 256-bit random token needs no slow KDF: there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(token: str, token_hash: bytes) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)
