"""Provisioning bundles: the JSON file ``fishchat-iot device register`` writes for a
device (its id, its token, where to connect), read by the simulator and the CLI.

Only the fields a TCP client needs are interpreted; the rest (keys, CA certificate ...)
is kept in ``Bundle.raw`` for the parts of the SDK that use them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BundleError(Exception):
    """A bundle that cannot be used, phrased for the operator (one line)."""


@dataclass(frozen=True, slots=True)
class Bundle:
    id: str
    token: str
    gateway: tuple[str, ...] = ()  # "host:port" of gateways, tried in turn
    msg_server: tuple[str, ...] = ()  # "host:port" of msg_servers, used when no gateway answers
    v1: bool = False  # the device may also log in without a token
    raw: Mapping[str, Any] = field(default_factory=dict)


def _addresses(value: object, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BundleError(f"{where}: {key!r} must be a list of 'host:port' strings")
    return tuple(value)


def parse_bundle(obj: object, where: str = "bundle") -> Bundle:
    """A Bundle from the decoded JSON of a bundle file; BundleError names what is wrong."""
    if not isinstance(obj, Mapping):
        raise BundleError(f"{where}: expected a JSON object with 'id' and 'token'")
    dev_id = obj.get("id")
    token = obj.get("token")
    if not isinstance(dev_id, str) or not dev_id:
        raise BundleError(f"{where}: no device 'id' in it: is this a provisioning bundle?")
    if not isinstance(token, str) or not token:
        raise BundleError(f"{where}: no 'token' in it: is this a provisioning bundle?")
    return Bundle(
        id=dev_id,
        token=token,
        gateway=_addresses(obj.get("gateway"), "gateway", where),
        msg_server=_addresses(obj.get("msg_server"), "msg_server", where),
        v1=bool(obj.get("v1", False)),
        raw=dict(obj),
    )


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle file; every failure is a one-line BundleError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(
            f"bundle {p} does not exist: pass the file 'device register --bundle' wrote"
        ) from None
    except UnicodeDecodeError:
        raise BundleError(f"bundle {p} is not UTF-8 JSON") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {p}: {(exc.strerror or str(exc)).lower()}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"bundle {p} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    return parse_bundle(obj, f"bundle {p}")
