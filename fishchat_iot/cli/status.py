"""``fishchat-iot status``: is the server running, where does it listen, how loaded are
its nodes, and what does the registry hold.

The running server (``fishchat-iot up``) rewrites ``{data_dir}/status.json`` about
every 2 s. It counts as running when the pid in it is alive and the file was updated
within ``FRESH_MS``. Exit code: 0 running, 3 not running (as LSB ``status`` does, so
``fishchat-iot status >/dev/null && ...`` works), 1 when the store cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishchat_iot.backends import describe_store
from fishchat_iot.cli.context import run_with_store, settings_from_args, store_exists
from fishchat_iot.cli.output import (
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    CliError,
    cell,
    format_age,
    format_ms,
    now_ms,
    print_error,
    print_fields,
    print_json,
    print_table,
)
from fishchat_iot.config import Settings
from fishchat_iot.stores.base import Store

STATUS_FILE = "status.json"
FRESH_MS = 10_000  # a status file older than this means the server is not running
READ_ATTEMPTS = 3  # a writer that does not rename atomically may be caught mid-write

RUNNING = "running"
STOPPED = "stopped"  # no status file, or its pid has exited
NOT_RESPONDING = "not_responding"  # pid alive, file not updated for FRESH_MS
UNKNOWN = "unknown"  # status file unreadable


def status_path(settings: Settings) -> Path:
    return settings.data_dir / STATUS_FILE


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False  # 0 and negatives would address process groups
    if os.name == "nt":
        return True  # signal 0 means CTRL_C_EVENT there: rely on freshness alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OSError:
        return False
    return True


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def read_status_file(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The status document, or None and why not ("" when the file is just absent)."""
    problem = ""
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(0.05)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, ""
        except OSError as exc:
            return None, f"cannot read {path}: {(exc.strerror or str(exc)).lower()}"
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = f"{path} is not valid JSON"
            continue
        if isinstance(doc, dict):
            return doc, ""
        problem = f"{path} does not hold a JSON object"
    return None, problem


@dataclass
class ServerState:
    state: str
    detail: str
    doc: dict[str, Any] | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.state == RUNNING


def _node(raw: object) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    return {
        "node_id": _str(raw.get("node_id")),
        "role": _str(raw.get("role")),
        "address": _str(raw.get("address")),
        "sessions": _int(raw.get("sessions")) or 0,
        "msgs_in": _int(raw.get("msgs_in")) or 0,
        "msgs_out": _int(raw.get("msgs_out")) or 0,
    }


def server_state(path: Path, now: int) -> ServerState:
    doc, problem = read_status_file(path)
    if doc is None:
        if problem:
            return ServerState(UNKNOWN, f"{problem}; cannot tell whether a server is running")
        return ServerState(
            STOPPED, f"no status file {path}: no server is running on this data directory"
        )
    pid = _int(doc.get("pid"))
    updated = _int(doc.get("updated_ms"))
    raw_nodes = doc.get("nodes")
    nodes = [n for n in map(_node, raw_nodes) if n] if isinstance(raw_nodes, list) else []
    last = f"last status {format_ms(updated)} UTC" if updated else "no update time in it"
    if pid is None or not pid_alive(pid):
        who = f"pid {pid} has exited" if pid is not None else f"{path} names no pid"
        return ServerState(STOPPED, f"{who} ({last})", doc)
    if updated is None or now - updated > FRESH_MS:
        age = f"for {format_age(now - updated)}" if updated else "ever"
        return ServerState(
            NOT_RESPONDING,
            f"pid {pid} is alive but has not updated {path} {age}: the server may be stuck, "
            "or the pid now belongs to another process",
            doc,
        )
    return ServerState(RUNNING, f"pid {pid}, updated {format_age(now - updated)} ago", doc, nodes)


MONITOR_TIMEOUT = 2.0  # seconds to wait for the monitor's API before using status.json


def monitor_status(settings: Settings, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The running server's live status from its monitor's API (docs/monitor.md), with
    the local token the monitor leaves in the data directory; None when there is no
    monitor or it does not answer (then status.json is what we have)."""
    import urllib.request

    listeners = doc.get("listeners")
    addr = listeners.get("monitor") if isinstance(listeners, dict) else None
    if not isinstance(addr, str) or ":" not in addr:
        return None
    host, _, port = addr.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    try:
        token = (settings.data_dir / "monitor.token").read_text().strip()
        req = urllib.request.Request(
            f"http://{host}:{port}/api/status", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=MONITOR_TIMEOUT) as res:
            live = json.loads(res.read())
    except (OSError, ValueError):
        return None
    return live if isinstance(live, dict) else None


@dataclass
class StoreCounts:
    devices: int = 0
    revoked: int = 0
    topics: int = 0
    queued: int = 0


def store_counts(settings: Settings) -> StoreCounts:
    async def work(store: Store) -> StoreCounts:
        devices = await store.list_devices()
        topics = await store.list_topics()
        depths = await store.queue_depths()
        return StoreCounts(
            devices=len(devices),
            revoked=sum(1 for d in devices if d.revoked),
            topics=len(topics),
            queued=sum(depths.values()),
        )

    return run_with_store(settings, work) if store_exists(settings) else StoreCounts()


NO_REMOTE_COUNTS = "counts come from the cluster monitor, which did not answer"


def registry_counts(live: dict[str, Any] | None) -> StoreCounts | None:
    """The registry counts in a cluster monitor's status (``registry``), if any."""
    raw = live.get("registry") if live is not None else None
    if not isinstance(raw, dict) or _int(raw.get("devices")) is None:
        return None
    return StoreCounts(
        devices=_int(raw.get("devices")) or 0,
        revoked=_int(raw.get("revoked")) or 0,
        topics=_int(raw.get("topics")) or 0,
        queued=_int(raw.get("queued")) or 0,
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    now = now_ms()
    server = server_state(status_path(settings), now)
    source = "status_file"
    live = monitor_status(settings, server.doc or {}) if server.running else None
    if live is not None:
        raw = live.get("nodes")
        nodes = [n for n in map(_node, raw) if n] if isinstance(raw, list) else []
        server = ServerState(server.state, server.detail, live, nodes)
        source = "monitor"
    counts: StoreCounts | None = None
    store_problem = ""
    remote = settings.store.backend != "sqlite"
    if remote:  # MongoDB: the counts the cluster monitor read (docs/monitor.md)
        counts = registry_counts(server.doc if source == "monitor" else None)
    else:
        try:
            counts = store_counts(settings)
        except CliError as exc:  # still report the server: that is what status is for
            store_problem = exc.message
    doc = server.doc or {}
    raw_listeners = doc.get("listeners") if server.running else None
    listeners: dict[str, str] = {}
    if isinstance(raw_listeners, dict):
        listeners = {str(k): str(v) for k, v in raw_listeners.items()}
    sessions = sum(n["sessions"] for n in server.nodes)
    code = EXIT_OK if server.running else EXIT_NOT_RUNNING
    if store_problem:
        code = EXIT_ERROR

    if args.json:
        store_doc: dict[str, Any] = (
            {"backend": settings.store.backend, "location": describe_store(settings)}
            if remote
            else {"path": str(settings.sqlite_path), "exists": store_exists(settings)}
        )
        if counts is not None:
            store_doc.update(vars(counts))
        else:
            store_doc["error"] = store_problem or NO_REMOTE_COUNTS
        if store_problem:
            print_error(store_problem)
        print_json(
            {
                "running": server.running,
                "state": server.state,
                "detail": server.detail,
                "status_file": str(status_path(settings)),
                "source": source,  # "monitor" (its API) or "status_file"
                "pid": _int(doc.get("pid")),
                "version": _str(doc.get("version")) or None,
                "started_ms": _int(doc.get("started_ms")),
                "updated_ms": _int(doc.get("updated_ms")),
                "listeners": listeners,
                "nodes": server.nodes,
                "sessions": sessions,
                "store": store_doc,
            }
        )
        return code

    words = {
        RUNNING: "running",
        STOPPED: "not running",
        NOT_RESPONDING: "not running (not responding)",
        UNKNOWN: "unknown",
    }
    fields: list[tuple[str, object]] = [("server", f"{words[server.state]}: {server.detail}")]
    if server.running:
        started = _int(doc.get("started_ms"))
        if version := _str(doc.get("version")):
            fields.append(("version", version))
        if started:
            fields.append(("started", f"{format_ms(started)} UTC (up {format_age(now - started)})"))
        listening = ", ".join(f"{k} {v}" for k, v in sorted(listeners.items()))
        fields.append(("listeners", listening or "-"))
        fields.append(("sessions", sessions))
    if remote:
        fields.append(("store", describe_store(settings)))
    if counts is not None:
        if not remote:
            where = "" if store_exists(settings) else " (not created yet)"
            fields.append(("store", f"{settings.sqlite_path}{where}"))
        fields.append(("devices", f"{counts.devices} ({counts.revoked} revoked)"))
        fields.append(("topics", counts.topics))
        fields.append(("queued", f"{counts.queued} messages"))
    elif remote:
        fields.append(("registry", NO_REMOTE_COUNTS))
    else:
        fields.append(("store", "unreadable (see the error below)"))
    print_fields(fields)
    if server.running and server.nodes:
        print()
        print_table(
            ("NODE", "ROLE", "ADDRESS", "SESSIONS", "MSGS IN", "MSGS OUT"),
            (
                (
                    cell(n["node_id"]) or "-",
                    n["role"] or "-",
                    n["address"] or "-",
                    n["sessions"],
                    n["msgs_in"],
                    n["msgs_out"],
                )
                for n in server.nodes
            ),
            right={3, 4, 5},
        )
    if store_problem:
        print_error(store_problem)
    return code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="is the server running; listeners, nodes, sessions and registry counts",
        description="Report the running server (from DATA_DIR/status.json) and the "
        "registry. Exit code 0: running; 3: not running; 1: the store cannot be read.",
    )
    p.set_defaults(func=cmd_status)
