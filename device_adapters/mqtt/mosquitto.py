"""Mosquitto's ``password_file`` and ``acl_file`` from the registry, for the
external-broker mode (``docs/deploy-mosquitto.md``).

The password file uses Mosquitto 2's own format, the one ``mosquitto_passwd`` writes:
``user:$7$ITERATIONS$base64(salt)$base64(PBKDF2-HMAC-SHA512(password, salt))`` with a
12-byte salt, a 64-byte hash and 101 iterations by default.

The registry keeps only a SHA-256 of each token, from which no Mosquitto hash can be
made; the tokens come from the devices' provisioning bundles (``DATA_DIR/bundles``, or
files given), each checked against the registry so a stale bundle of a rotated device
is never exported. Revoked devices are left out: Mosquitto then refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fishchat_iot.auth import token_matches
from fishchat_iot.stores.base import DeviceRecord

ITERATIONS = 101  # mosquitto_passwd's default for sha512-pbkdf2
SALT_BYTES = 12


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """``$7$...``: Mosquitto's sha512-pbkdf2 password hash."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(hashed: str, password: str) -> bool:
    """Does ``password`` match a ``$7$`` hash (as Mosquitto would decide)?"""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        mine = hashlib.pbkdf2_hmac(
            "sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations), 64
        )
        return hmac.compare_digest(mine, base64.b64decode(digest))
    except ValueError:
        return False


def acl_text(gateway_users: Iterable[str]) -> str:
    """The ACL: each device reads its inbox and writes under its own prefix (one pattern
    for all, so it needs no update when devices come and go); each gateway account reads
    the uplink and writes the inboxes."""
    lines = [
        "# FishChat IoT ACL for Mosquitto (fishchat-iot mqtt export-mosquitto).",
        "# Devices: user name = client id = device id (use_username_as_clientid true).",
        "",
    ]
    for user in gateway_users:
        lines += [
            f"user {user}",
            "topic read fc/+/p2p/+",
            "topic read fc/+/topic/+",
            "topic read fc/+/ctl",
            "topic read fc/+/ack",
            "topic write fc/+/in",
            "",
        ]
    lines += [
        "# every device (pattern lines apply to all users; %u is the user name)",
        "pattern write fc/%u/p2p/+",
        "pattern write fc/%u/topic/+",
        "pattern write fc/%u/ack",
        "pattern write fc/%u/ctl",
        "pattern read fc/%u/in",
        "",
    ]
    return "\n".join(lines)


@dataclass
class Tokens:
    """Device id -> token, from bundles that match the registry."""

    tokens: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # registered, no usable bundle
    revoked: list[str] = field(default_factory=list)


def bundle_files(paths: Iterable[Path]) -> list[Path]:
    """Files given, and the ``*.json`` files of directories given."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            out.append(p)
    return out


def match_tokens(devices: Iterable[DeviceRecord], files: Iterable[Path]) -> Tokens:
    candidates: dict[str, list[str]] = {}
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            token = doc.get("token")
            if isinstance(token, str) and token:
                candidates.setdefault(doc["id"], []).append(token)
    result = Tokens()
    for rec in devices:
        if rec.revoked:
            result.revoked.append(rec.id)
            continue
        good = next(
            (t for t in candidates.get(rec.id, ()) if token_matches(t, rec.token_hash)), None
        )
        if good is None:
            result.skipped.append(rec.id)
        else:
            result.tokens[rec.id] = good
    return result


def password_text(tokens: dict[str, str], gateways: dict[str, str], iterations: int) -> str:
    lines = [f"{user}:{hash_password(pw, iterations)}" for user, pw in sorted(gateways.items())]
    lines += [f"{dev}:{hash_password(tok, iterations)}" for dev, tok in sorted(tokens.items())]
    return "\n".join(lines) + "\n"
