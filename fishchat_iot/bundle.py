"""Provisioning bundles: the JSON file ``device register`` writes for one device, holding
everything it needs to connect (id, token, server addresses), to be copied onto it.

The bundle carries the device's secrets, so it is created with mode 0600 from the first
byte (``os.open`` with ``O_CREAT | O_EXCL``: never world-readable, never written through
a symlink, never over an existing file). The writer takes any JSON-able mapping, so later
keys (the E2E private key, the CA certificate) are added without touching it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fishchat_iot.config import Settings

BUNDLE_MODE = 0o600
BUNDLE_DIR_MODE = 0o700

# Keys every bundle has, with their JSON types; ``read_bundle`` checks them.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "token": str,
    "gateway": list,
    "msg_server": list,
    "v1": bool,
    "created_ms": int,
}


class BundleError(Exception):
    """A bundle cannot be written or read; the message names the file and the reason."""


class BundleExists(BundleError):
    """``write_bundle`` found a file at the path and left it alone."""


def default_bundle_path(settings: Settings, device_id: str) -> Path:
    """``{data_dir}/bundles/{device_id}.json``."""
    return settings.data_dir / "bundles" / f"{device_id}.json"


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:17000``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def new_bundle(
    device_id: str,
    token: str,
    settings: Settings,
    *,
    v1: bool,
    created_ms: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle for a freshly registered device: the devices are told to connect to
    ``node.advertise_host`` on the gateway and msg_server ports, and to the MQTT broker
    (the embedded one, or the external one devices share). ``extra`` adds keys."""
    host = settings.node.advertise_host
    bundle: dict[str, Any] = {
        "id": device_id,
        "token": token,
        "gateway": [host_port(host, settings.tcp.gateway_port)],
        "msg_server": [host_port(host, settings.tcp.msg_port)],
        "v1": v1,
        "created_ms": created_ms,
    }
    mqtt = settings.mqtt
    if mqtt.mode == "embedded":
        bundle["mqtt"] = [host_port(host, mqtt.port)]
    elif mqtt.mode == "external":
        bundle["mqtt"] = [host_port(mqtt.broker_host, mqtt.broker_port)]
    if settings.tls.enabled:
        bundle.update(tls_entries(settings))
    if extra:
        bundle.update(extra)
    return bundle


def tls_entries(settings: Settings) -> dict[str, Any]:
    """With ``tls.enabled``: the TLS addresses (``msg_server_tls``, and ``mqtt_tls`` for
    the embedded broker) and the CA certificate (``ca``, PEM) devices check the server
    with. No ``ca`` when there is no CA file yet (``fishchat-iot certs init``); no
    address for a port of 0 (picked at each start: see ``up``'s output)."""
    from fishchat_iot.tls import paths

    host = settings.node.advertise_host
    t = settings.tls
    out: dict[str, Any] = {}
    if t.msg_port:
        out["msg_server_tls"] = [host_port(host, t.msg_port)]
    if settings.mqtt.mode == "embedded" and t.mqtt_port:
        out["mqtt_tls"] = [host_port(host, t.mqtt_port)]
    ca = paths(settings.data_dir / "certs", t.cert, t.key, t.ca).ca_cert
    try:
        out["ca"] = ca.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        pass
    return out


def _reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, NotADirectoryError):
        return "a part of the path is a file, not a directory"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    return (exc.strerror or str(exc)).lower()


def write_bundle(path: str | Path, bundle: Mapping[str, Any]) -> Path:
    """Write ``bundle`` as JSON to a new file ``path`` with mode 0600 and return its
    absolute path. Missing parent directories are created with mode 0700. Refuses to
    replace an existing file. Raises BundleError."""
    target = Path(os.path.abspath(path))
    data = (json.dumps(dict(bundle), indent=2, ensure_ascii=True) + "\n").encode("ascii")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=BUNDLE_DIR_MODE)
    except FileExistsError:
        raise BundleError(f"cannot create directory {target.parent}: it is a file") from None
    except OSError as exc:
        raise BundleError(f"cannot create directory {target.parent}: {_reason(exc)}") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, BUNDLE_MODE)
    except FileExistsError:
        raise BundleExists(f"bundle file {target} already exists") from None
    except OSError as exc:
        raise BundleError(f"cannot write bundle file {target}: {_reason(exc)}") from None
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, BUNDLE_MODE)  # the mode stays 0600 whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        remove_bundle(target)
        raise BundleError(f"cannot write bundle file {target}: {_reason(exc)}") from None
    return target


def remove_bundle(path: str | Path) -> None:
    """Delete a bundle file if it is there (undoing a registration that failed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_bundle(path: str | Path) -> dict[str, Any]:
    """The bundle in ``path``, checked for the keys every bundle has. Raises BundleError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle file {p} does not exist") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle file {p}: {_reason(exc)}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError(f"bundle file {p} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"bundle file {p} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"bundle file {p} does not hold a JSON object")
    for key, kind in REQUIRED_KEYS.items():
        value = data.get(key)
        if value is None:
            raise BundleError(f"bundle file {p} has no {key!r}")
        # bool is an int subclass: created_ms must be a real number, v1 a real boolean
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BundleError(f"bundle file {p}: {key!r} has the wrong type")
    for key in ("gateway", "msg_server"):
        if not all(isinstance(a, str) for a in data[key]):
            raise BundleError(f"bundle file {p}: {key!r} must be a list of host:port strings")
    return data
