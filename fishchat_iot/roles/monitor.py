"""The monitor role: a dashboard page, a JSON API, Prometheus ``/metrics`` and health
endpoints over HTTP (docs/monitor.md), reading a ``MonitorSource``: the roles of an
``EmbeddedApp`` (``EmbeddedSource``, in ``fishchat-iot up``) or the whole cluster
(``roles/monitor_cluster.py``, ``fishchat-iot run monitor``).

Access: operator tokens (``fishchat-iot operator add NAME``) kept as SHA-256 hashes in
``{data_dir}/operators.json`` (mode 0600), sent as ``Authorization: Bearer`` or, after
the login form, as a session cookie. No token exists by default: without an operator
nobody can log in. Wrong tokens lock the client address out for a growing time.
``fishchat-iot status`` on the same host reads ``{data_dir}/monitor.token`` (0600,
rewritten at every start) to ask the API.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishchat_iot import __version__, errors
from fishchat_iot.bus.base import BusUnavailable, NodeInfo
from fishchat_iot.config import Settings
from fishchat_iot.files import write_atomic
from fishchat_iot.roles.manager import now_ms
from fishchat_iot.roles.monitor_http import (
    HttpServer,
    Request,
    Response,
    error_response,
    json_response,
)
from fishchat_iot.roles.monitor_metrics import (
    Exposition,
    Histogram,
    Ring,
    Series,
    process_stats,
)
from fishchat_iot.stores.base import NotFound, Store, StoreUnavailable

if TYPE_CHECKING:
    from fishchat_iot.app import EmbeddedApp
    from fishchat_iot.core.session import Session

log = logging.getLogger("fishchat.monitor")

OPERATORS_FILE = "operators.json"
LOCAL_TOKEN_FILE = "monitor.token"
LOCAL_OPERATOR = "local-cli"
COOKIE = "fc_session"
SAMPLE_PERIOD = 1.0  # seconds between samples (charts, SSE updates)
QUEUE_PERIOD = 5.0  # seconds between reads of the offline queue depths (a store query)
NODE_STALE_MS = 10_000  # a node whose heartbeat is older than this is "stale"
# Wrong tokens: this many per client address are free, then a lock-out that doubles.
FREE_FAILURES = 5
LOCK_MAX = 300.0
MAX_PER_PAGE = 200
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


# -- operators file (shared with `fishchat-iot operator`) -------------------------------
def hash_operator_token(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough, nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def operators_path(data_dir: Path) -> Path:
    return data_dir / OPERATORS_FILE


def read_operators(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read {path}: {exc}") from None
    ops = doc.get("operators") if isinstance(doc, dict) else None
    return {str(k): v for k, v in ops.items() if isinstance(v, dict)} if ops else {}


def write_operators(path: Path, ops: dict[str, dict[str, Any]]) -> None:
    write_atomic(path, json.dumps({"operators": ops}, indent=1, sort_keys=True) + "\n", sync=True)


class _Operators:
    """The operators file, re-read when it changes (``operator add`` while running)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            ops = read_operators(self.path)
        except OSError as exc:
            log.warning("%s", exc)
            ops = {}
        self._by_hash = {
            str(v.get("token_sha256", "")): name for name, v in ops.items() if v.get("token_sha256")
        }

    def check(self, token: str) -> str | None:
        self._refresh()
        digest = hash_operator_token(token)
        found = None
        for h, name in self._by_hash.items():
            if hmac.compare_digest(h, digest):
                found = name
        return found

    def exists(self, name: str) -> bool:
        self._refresh()
        return name in self._by_hash.values()

    def count(self) -> int:
        self._refresh()
        return len(self._by_hash)


@dataclass
class Figures:
    """One msg_server's counters, as the totals and ``/metrics`` add them up."""

    sessions_by_transport: dict[str, int] = field(default_factory=dict)
    msgs_in: int = 0
    msgs_out: int = 0
    msgs_queued: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    auth_failures: int = 0


class MonitorSource(abc.ABC):
    """Where the monitor's figures come from: the roles of this process
    (``EmbeddedSource``) or the whole cluster through the bus and the store
    (``roles/monitor_cluster.ClusterSource``). The HTTP server, access control, the
    API's paging and the metrics format are the monitor's, the same for both."""

    settings: Settings
    store: Store
    started_ms: int
    mon: Monitor

    async def start(self, mon: Monitor) -> None:
        """Begin feeding ``mon.refused`` (and ``mon.errors``, beyond this process's log)."""
        self.mon = mon

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop what ``start`` began."""

    @abc.abstractmethod
    async def sample(self, series: Series) -> bool:
        """Refresh the figures (once a second) and add a point to ``series`` (msgs/s in
        and out, sessions: the charts); False when there was nothing to sample (no
        msg_server yet, the bus unreachable)."""

    @abc.abstractmethod
    def figures(self) -> list[tuple[dict[str, str], Figures]]:
        """Per msg_server: its ``/metrics`` labels and its counters."""

    def latency(self) -> Histogram | None:
        return None

    @abc.abstractmethod
    def online_count(self) -> int: ...

    @abc.abstractmethod
    async def sessions_for(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The live sessions of these devices: id -> ``{node, address, since_ms,
        transport, last_seen_ms, inflight}`` (``None`` for what is not known)."""

    def last_seen(self, device_id: str) -> int | None:
        """When an offline device was last seen, if known."""
        return None

    def topic_traffic(self) -> dict[str, int]:
        return {}

    @abc.abstractmethod
    async def nodes(self) -> list[dict[str, Any]]:
        """Every node, for ``/api/nodes`` (may read the registry)."""

    @abc.abstractmethod
    def status_base(self) -> dict[str, Any]:
        """``/api/status`` without the monitor's own fields: pid, version, listeners,
        ``nodes`` (from the last sample)."""

    @abc.abstractmethod
    def ready(self) -> tuple[bool, dict[str, Any]]: ...

    @abc.abstractmethod
    async def revoke(self, device_id: str) -> None:
        """Revoke in the registry and close its sessions; raises NotFound,
        StoreUnavailable."""

    @abc.abstractmethod
    async def kick(self, device_id: str) -> str | None:
        """Close the device's session; the node it was on, or None if it has none."""

    def extra_metrics(self, ex: Exposition) -> None:  # noqa: B027 - optional hook
        """Families only this source has."""


def node_row(n: NodeInfo, now: int, local: bool = False) -> dict[str, Any]:
    """A node of the registry as ``/api/nodes`` shows it; rates and queue are the
    caller's to fill in (None: not known from here)."""
    age = now - n.updated_ms if n.updated_ms else 0
    return {
        "node_id": n.node_id,
        "role": n.role,
        "address": n.address,
        "started_ms": n.started_ms,
        "updated_ms": n.updated_ms,
        "sessions": n.sessions,
        "msgs_in": n.msgs_in,
        "msgs_out": n.msgs_out,
        "msgs_in_per_s": None,
        "msgs_out_per_s": None,
        "queued": None,
        "health": "stale" if age > NODE_STALE_MS else "ok",
        "local": local,
    }


class EmbeddedSource(MonitorSource):
    """The roles of one ``EmbeddedApp`` (``fishchat-iot up``): its msg_server's sessions
    and counters, read directly."""

    def __init__(self, app: EmbeddedApp) -> None:
        self.app = app
        self.settings = app.settings
        self.store = app.store
        self.started_ms = app.started_ms
        self._last_seen: dict[str, int] = {}

    async def start(self, mon: Monitor) -> None:
        await super().start(mon)
        if self.app.msg_server is not None:
            self.app.msg_server.on_login_refused.append(self._login_refused)

    def _login_refused(self, s: Session, device_id: str, code: str, text: str) -> None:
        self.mon.refused.add(
            device_id=device_id[:64], code=code, text=text, transport=s.transport_name
        )

    async def sample(self, series: Series) -> bool:
        ms = self.app.msg_server
        if ms is None:
            return False
        series.sample(ms.msgs_in, ms.msgs_out, len(ms.sessions))
        now_mono, now = time.monotonic(), now_ms()
        for device_id, s in ms.sessions.items():
            self._last_seen[device_id] = now - int((now_mono - s.last_seen) * 1000)
        return True

    def figures(self) -> list[tuple[dict[str, str], Figures]]:
        ms = self.app.msg_server
        if ms is None:
            return []
        by_transport: dict[str, int] = {}
        for s in ms.sessions.values():
            by_transport[s.transport_name] = by_transport.get(s.transport_name, 0) + 1
        return [
            (
                {},
                Figures(
                    by_transport,
                    ms.msgs_in,
                    ms.msgs_out,
                    ms.msgs_queued,
                    dict(ms.dropped),
                    ms.auth_failures,
                ),
            )
        ]

    def latency(self) -> Histogram | None:
        return self.app.msg_server.latency if self.app.msg_server is not None else None

    def online_count(self) -> int:
        return len(self.app.msg_server.sessions) if self.app.msg_server is not None else 0

    async def sessions_for(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        ms = self.app.msg_server
        if ms is None:
            return {}
        now_mono, now = time.monotonic(), now_ms()
        out = {}
        for device_id in device_ids:
            s = ms.sessions.get(device_id)
            if s is not None:
                out[device_id] = {
                    "node": ms.node_id,
                    "address": ms.address,
                    "since_ms": s.logged_in_ms,
                    "transport": s.transport_name,
                    "last_seen_ms": now - int((now_mono - s.last_seen) * 1000),
                    "inflight": len(s.inflight),
                }
        return out

    def last_seen(self, device_id: str) -> int | None:
        return self._last_seen.get(device_id)

    def topic_traffic(self) -> dict[str, int]:
        return self.app.msg_server.topic_msgs if self.app.msg_server is not None else {}

    def local_node(self) -> dict[str, Any] | None:
        ms = self.app.msg_server
        if ms is None:
            return None
        rate_in, rate_out = self.mon.series.last()
        return {
            "node_id": ms.node_id,
            "role": "msg_server",
            "address": ms.address,
            "started_ms": ms.started_ms,
            "updated_ms": now_ms(),
            "sessions": len(ms.sessions),
            "msgs_in": ms.msgs_in,
            "msgs_out": ms.msgs_out,
            "msgs_in_per_s": round(rate_in, 2),
            "msgs_out_per_s": round(rate_out, 2),
            "queued": sum(self.mon.queue_depths.values()),
            "health": "ok",
            "local": True,
        }

    async def nodes(self) -> list[dict[str, Any]]:
        """This process's node, then every other live node in the node registry."""
        out = []
        local = self.local_node()
        if local is not None:
            out.append(local)
        try:
            others = await self.app.bus.live_nodes("msg_server")
        except Exception as exc:
            log.warning("monitor: cannot read the node registry: %s", exc)
            others = []
        now = now_ms()
        for n in others:
            if local is not None and n.node_id == local["node_id"]:
                continue
            out.append(node_row(n, now))
        return out

    def status_base(self) -> dict[str, Any]:
        doc = self.app.status()
        doc["nodes"] = [n for n in [self.local_node()] if n is not None]
        return doc

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ready = self.app.msg_server is not None and self.app.msg_listener.port > 0
        return ready, {"msg_server": ready}

    async def revoke(self, device_id: str) -> None:
        await self.store.revoke_device(device_id, now_ms())
        self.app.manager.invalidate()
        if self.app.msg_server is not None:
            self.app.msg_server.revoked(device_id)

    async def kick(self, device_id: str) -> str | None:
        ms = self.app.msg_server
        s = ms.sessions.get(device_id) if ms is not None else None
        if ms is None or s is None:
            return None
        s.drop(errors.UNAVAILABLE, "session closed by an operator")
        ms.session_closed(s)
        return ms.node_id


class Monitor:
    """The monitor's HTTP side on a ``MonitorSource``; ``Monitor(app)`` is the embedded
    one (an ``EmbeddedApp`` is wrapped in an ``EmbeddedSource``)."""

    def __init__(self, source: MonitorSource | EmbeddedApp) -> None:
        if not isinstance(source, MonitorSource):
            source = EmbeddedSource(source)
        self.source = source
        self.settings = source.settings.monitor
        self.data_dir = source.settings.data_dir
        self.operators = _Operators(operators_path(self.data_dir))
        self.local_token = secrets.token_urlsafe(32)
        self.http = HttpServer(self.handle, self.settings.host, self.settings.port)
        self.metrics_http: HttpServer | None = None
        if self.settings.metrics_port >= 0:
            host = self.settings.metrics_host or self.settings.host
            self.metrics_http = HttpServer(
                self.handle_open, host, self.settings.metrics_port, "metrics"
            )
        self.series = Series(SAMPLE_PERIOD)
        self.errors = Ring(200)  # warnings and errors from the log (and other nodes)
        self.refused = Ring(200)  # refused device logins
        self.actions = Ring(100)  # operator actions
        self.operator_failures = 0
        self.queue_depths: dict[str, int] = {}  # device -> offline queue depth
        self._sessions: dict[str, tuple[str, float]] = {}  # cookie -> (operator, expires)
        self._failures: dict[str, tuple[int, float]] = {}  # peer -> (count, locked until)
        self._queues_read = -QUEUE_PERIOD
        self._devices_cache: tuple[float, list[Any]] = (0.0, [])
        self._tick: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_handler = _RingHandler(self.errors)
        self.started_ms = now_ms()

    # -- lifecycle -----------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.http.address

    @property
    def metrics_address(self) -> str:
        return self.metrics_http.address if self.metrics_http is not None else ""

    async def start(self) -> None:
        await self.http.start()
        try:
            if self.metrics_http is not None:
                await self.metrics_http.start()
        except BaseException:
            await self.http.stop()
            raise
        write_atomic(self.data_dir / LOCAL_TOKEN_FILE, self.local_token + "\n")
        logging.getLogger().addHandler(self._log_handler)
        await self.source.start(self)
        self._tick = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._sampler(), name="monitor")

    async def stop(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.source.stop()
        await self.http.stop()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        with contextlib.suppress(OSError):
            (self.data_dir / LOCAL_TOKEN_FILE).unlink()

    async def _sampler(self) -> None:
        while True:
            try:
                await self._sample()
            except Exception as exc:  # keep sampling; the page shows stale data meanwhile
                log.warning("monitor sample failed: %s", exc)
            tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
            if tick is not None and not tick.done():
                tick.set_result(None)
            await asyncio.sleep(SAMPLE_PERIOD)

    async def _sample(self) -> None:
        # Queues first: the cluster source splits them over the nodes as it samples.
        now_mono = time.monotonic()
        if now_mono - self._queues_read >= QUEUE_PERIOD:
            self._queues_read = now_mono
            with contextlib.suppress(StoreUnavailable):
                self.queue_depths = await self.source.store.queue_depths()
        await self.source.sample(self.series)

    # -- auth ----------------------------------------------------------------------
    def _locked(self, peer: str) -> float:
        _, until = self._failures.get(peer, (0, 0.0))
        return max(0.0, until - time.monotonic())

    def _failed(self, peer: str) -> None:
        self.operator_failures += 1
        count, _ = self._failures.get(peer, (0, 0.0))
        count += 1
        until = 0.0
        if count >= FREE_FAILURES:
            until = time.monotonic() + min(LOCK_MAX, 2.0 ** (count - FREE_FAILURES + 1))
        self._failures[peer] = (count, until)
        if len(self._failures) > 10000:  # bounded: forget the oldest entries
            for key in list(self._failures)[:5000]:
                del self._failures[key]
        log.warning("monitor: wrong operator token from %s (%d in a row)", peer, count)

    def _check_token(self, token: str) -> str | None:
        if hmac.compare_digest(token, self.local_token):
            return LOCAL_OPERATOR
        return self.operators.check(token)

    def _operator(self, req: Request) -> tuple[str | None, Response | None]:
        """(operator name, None) or (None, the response to send instead)."""
        auth = req.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token:
            wait = self._locked(req.peer)
            if wait:
                return None, _throttled(wait)
            name = self._check_token(token)
            if name is None:
                self._failed(req.peer)
                return None, error_response(
                    401,
                    "wrong operator token",
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            self._failures.pop(req.peer, None)
            return name, None
        sid = req.cookie(COOKIE)
        entry = self._sessions.get(sid) if sid else None
        if entry is not None:
            name, expires = entry
            if time.time() < expires and (name == LOCAL_OPERATOR or self.operators.exists(name)):
                return name, None
            self._sessions.pop(sid, None)
        return None, error_response(
            401,
            "an operator token is needed: Authorization: Bearer TOKEN "
            "(fishchat-iot operator add NAME), or log in at /login",
            {"WWW-Authenticate": 'Bearer realm="fishchat-monitor"'},
        )

    async def _login(self, req: Request) -> Response:
        wait = self._locked(req.peer)
        if wait:
            return _page_response(_login_page("Too many wrong tokens: wait and retry."), 429)
        token = req.form().get("token", "").strip()
        name = self._check_token(token) if token else None
        if name is None:
            if token:
                self._failed(req.peer)
            return _page_response(_login_page("Wrong token."), 401)
        self._failures.pop(req.peer, None)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = (name, time.time() + self.settings.session_hours * 3600)
        if len(self._sessions) > 1000:
            now = time.time()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
        cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
        return Response(303, b"", headers={"Location": "/", "Set-Cookie": cookie})

    # -- routing -------------------------------------------------------------------
    async def handle_open(self, req: Request) -> Response:
        """The separate metrics bind: /metrics and health, no token."""
        if req.path == "/metrics":
            return Response(200, self.metrics_text().encode(), PROM_TYPE)
        if req.path in ("/healthz", "/readyz"):
            return self._health(req.path)
        return error_response(404, "only /metrics, /healthz and /readyz are served here")

    async def handle(self, req: Request) -> Response:
        path, method = req.path, req.method
        if path in ("/healthz", "/readyz"):
            return self._health(path)
        if path.startswith("/static/"):
            return _static(path[len("/static/") :])
        if path == "/login":
            if method == "POST":
                return await self._login(req)
            return _page_response(_login_page(""), 200)
        if path == "/logout" and method == "POST":
            self._sessions.pop(req.cookie(COOKIE), None)
            expired = f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
            return Response(303, b"", headers={"Location": "/login", "Set-Cookie": expired})
        operator, refusal = self._operator(req)
        if operator is None:
            assert refusal is not None
            if path in ("/", "/index.html") and refusal.status == 401:
                return Response(303, b"", headers={"Location": "/login"})
            return refusal
        if path in ("/", "/index.html"):
            return _static("index.html")
        if path == "/metrics":
            return Response(200, self.metrics_text().encode(), PROM_TYPE)
        if method == "POST":
            # Cookie sessions: a cross-site form cannot send JSON without a CORS preflight.
            if not req.headers.get("content-type", "").startswith("application/json"):
                return error_response(415, "POST with Content-Type: application/json")
            return await self._action(req, operator)
        if method not in ("GET", "HEAD"):
            return error_response(405, "method not allowed")
        try:
            return await self._api_get(req, operator)
        except BusUnavailable as exc:  # the cluster monitor asks the bus for presence
            return error_response(503, f"bus unavailable: {exc}")

    def _health(self, path: str) -> Response:
        if path == "/healthz":
            return json_response({"status": "ok"})
        ready, parts = self.source.ready()
        doc = {"status": "ready" if ready else "starting", **parts}
        return json_response(doc, 200 if ready else 503)

    async def _api_get(self, req: Request, operator: str) -> Response:
        path = req.path.rstrip("/")
        if path == "/api/status":
            return json_response(self.status_doc())
        if path == "/api/whoami":
            return json_response({"operator": operator})
        if path == "/api/nodes":
            return json_response({"nodes": await self.source.nodes()})
        if path == "/api/devices":
            return json_response(await self.devices(req.query))
        if path == "/api/topics":
            return json_response(await self.topics(req.query))
        if path == "/api/events":
            limit = _int_arg(req.query, "limit", 50, 1, 200)
            return json_response(
                {
                    "errors": self.errors.recent(limit),
                    "refused_logins": self.refused.recent(limit),
                    "actions": self.actions.recent(limit),
                }
            )
        if path == "/api/series":
            since = _int_arg(req.query, "since", 0, 0, 2**62)
            return json_response(
                {
                    "period_s": SAMPLE_PERIOD,
                    "columns": ["at_ms", "msgs_in_per_s", "msgs_out_per_s", "sessions"],
                    "points": self.series.since(since),
                }
            )
        if path == "/api/stream":
            return Response(
                200,
                content_type="text/event-stream",
                headers={"X-Accel-Buffering": "no"},
                stream=self._stream(),
            )
        return error_response(404, f"no such endpoint {req.path}")

    async def _action(self, req: Request, operator: str) -> Response:
        parts = req.path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "revoke":
            device_id = parts[2]
            try:
                await self.source.revoke(device_id)
            except NotFound:
                return error_response(404, f"no device {device_id!r}")
            except StoreUnavailable as exc:
                return error_response(503, f"store unavailable: {exc}")
            except BusUnavailable as exc:
                return error_response(503, f"bus unavailable: {exc}")
            self._devices_cache = (0.0, [])
            self.actions.add(operator=operator, action="revoke", device_id=device_id)
            log.warning("operator %s revoked device %s", operator, device_id)
            return json_response({"revoked": device_id})
        if len(parts) == 4 and parts[:2] == ["api", "sessions"] and parts[3] == "kick":
            device_id = parts[2]
            try:
                node = await self.source.kick(device_id)
            except BusUnavailable as exc:
                return error_response(503, f"bus unavailable: {exc}")
            if node is None:
                return error_response(404, f"device {device_id!r} has no session here")
            self.actions.add(operator=operator, action="kick", device_id=device_id)
            log.info("operator %s closed the session of %s", operator, device_id)
            return json_response({"kicked": device_id, "node": node})
        return error_response(404, f"no such action {req.path}")

    async def _stream(self) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        yield _sse("status", self.status_doc())
        while True:
            tick = self._tick
            if tick is None:
                return
            try:
                await asyncio.wait_for(asyncio.shield(tick), 15)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            yield _sse("status", self.status_doc())

    # -- the data --------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        rows = self.source.figures()
        if not rows:
            return {}
        by_transport: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for _, f in rows:
            for t, n in f.sessions_by_transport.items():
                by_transport[t] = by_transport.get(t, 0) + n
            for r, n in f.dropped.items():
                dropped[r] = dropped.get(r, 0) + n
        rate_in, rate_out = self.series.last()
        return {
            "sessions": sum(by_transport.values()),
            "sessions_by_transport": by_transport,
            "msgs_in": sum(f.msgs_in for _, f in rows),
            "msgs_out": sum(f.msgs_out for _, f in rows),
            "msgs_queued": sum(f.msgs_queued for _, f in rows),
            "dropped": dropped,
            "auth_failures": sum(f.auth_failures for _, f in rows),
            "operator_auth_failures": self.operator_failures,
            "msgs_in_per_s": round(rate_in, 2),
            "msgs_out_per_s": round(rate_out, 2),
            "queued_now": sum(self.queue_depths.values()),
            "refused_logins": self.refused.total,
            "errors": self.errors.total,
        }

    def status_doc(self) -> dict[str, Any]:
        doc = self.source.status_base()
        doc["totals"] = self.totals()
        doc["monitor"] = self.address
        doc["source"] = "monitor"
        doc["operators"] = self.operators.count()
        doc["process"] = process_stats()
        return doc

    async def _device_records(self) -> list[Any]:
        at, cached = self._devices_cache
        if time.monotonic() - at < 1.0 and cached:
            return cached
        records = await self.source.store.list_devices()
        self._devices_cache = (time.monotonic(), records)
        return records

    async def devices(self, query: dict[str, str]) -> dict[str, Any]:
        q = query.get("q", "").strip().lower()
        only = query.get("state", "")  # "", "online", "offline", "revoked"
        page = _int_arg(query, "page", 1, 1, 10**9)
        per_page = _int_arg(query, "per_page", 50, 1, MAX_PER_PAGE)
        try:
            records = await self._device_records()
        except StoreUnavailable as exc:
            return {"error": f"store unavailable: {exc}", "devices": [], "total": 0}
        rows = [rec for rec in records if not q or q in rec.id.lower()]
        live: dict[str, dict[str, Any]] = {}
        if only in ("online", "offline"):
            # The filter needs every candidate's presence (the cluster asks the bus).
            live = await self.source.sessions_for([r.id for r in rows if not r.revoked])
        if only:
            rows = [r for r in rows if _state(r, live) == only]
        total = len(rows)
        start = (page - 1) * per_page
        shown = rows[start : start + per_page]
        if only not in ("online", "offline"):
            live = await self.source.sessions_for([r.id for r in shown])
        out = []
        for rec in shown:
            s = live.get(rec.id)
            out.append(
                {
                    "id": rec.id,
                    "state": _state(rec, live),
                    "online": s is not None,
                    "node": s["node"] if s is not None else None,
                    "address": s["address"] if s is not None else None,
                    "since_ms": s["since_ms"] if s is not None else None,
                    "transport": s["transport"] if s is not None else None,
                    "v1": rec.v1,
                    "last_seen_ms": s["last_seen_ms"]
                    if s is not None
                    else self.source.last_seen(rec.id),
                    "queued": self.queue_depths.get(rec.id, 0),
                    "inflight": (s["inflight"] or 0) if s is not None else 0,
                    "revoked": rec.revoked,
                    "revoked_ms": rec.revoked_ms or None,
                    "created_ms": rec.created_ms,
                }
            )
        return {
            "total": total,
            "registered": len(records),
            "online": self.source.online_count(),
            "page": page,
            "per_page": per_page,
            "pages": max(1, -(-total // per_page)),
            "devices": out,
        }

    async def topics(self, query: dict[str, str]) -> dict[str, Any]:
        traffic = self.source.topic_traffic()
        q = query.get("q", "").strip().lower()
        page = _int_arg(query, "page", 1, 1, 10**9)
        per_page = _int_arg(query, "per_page", 50, 1, MAX_PER_PAGE)
        try:
            topics = await self.source.store.list_topics()
        except StoreUnavailable as exc:
            return {"error": f"store unavailable: {exc}", "topics": [], "total": 0}
        rows = [t for t in topics if not q or q in t.name.lower()]
        start = (page - 1) * per_page
        shown = rows[start : start + per_page]
        members = sorted({m for t in shown for m in t.members})
        live = await self.source.sessions_for(members)
        return {
            "total": len(rows),
            "page": page,
            "per_page": per_page,
            "pages": max(1, -(-len(rows) // per_page)),
            "topics": [
                {
                    "name": t.name,
                    "owner": t.owner,
                    "open": t.open,
                    "members": len(t.members),
                    "members_online": sum(1 for m in t.members if m in live),
                    "messages": traffic.get(t.name, 0),
                    "created_ms": t.created_ms,
                }
                for t in shown
            ],
        }

    def metrics_text(self) -> str:
        ex = Exposition()
        rows = self.source.figures()
        ex.family("fishchat_up", "gauge", "1 while the server runs.", [({}, 1)])
        ex.family(
            "fishchat_build_info",
            "gauge",
            "Version of this server.",
            [({"version": __version__}, 1)],
        )
        self.source.extra_metrics(ex)
        ex.family(
            "fishchat_sessions",
            "gauge",
            "Logged-in device sessions, by transport.",
            [
                ({**labels, "transport": t}, n)
                for labels, f in rows
                for t, n in sorted(f.sessions_by_transport.items())
            ]
            or [(labels, 0) for labels, _ in rows]
            or [({}, 0)],
        )
        ex.family(
            "fishchat_messages_accepted_total",
            "counter",
            "Messages accepted from devices (ACCEPTED sent).",
            [(labels, f.msgs_in) for labels, f in rows] or [({}, 0)],
        )
        ex.family(
            "fishchat_messages_delivered_total",
            "counter",
            "Deliveries written to device sessions (live or from the offline queue).",
            [(labels, f.msgs_out) for labels, f in rows] or [({}, 0)],
        )
        ex.family(
            "fishchat_messages_queued_total",
            "counter",
            "Messages stored in offline queues (including unacked ones put back).",
            [(labels, f.msgs_queued) for labels, f in rows] or [({}, 0)],
        )
        ex.family(
            "fishchat_messages_dropped_total",
            "counter",
            "Sends refused, by reason (the error code the sender got).",
            [
                ({**labels, "reason": r}, n)
                for labels, f in rows
                for r, n in sorted(f.dropped.items())
            ]
            or [({**labels, "reason": errors.QUEUE_FULL}, 0) for labels, _ in rows]
            or [({"reason": errors.QUEUE_FULL}, 0)],
        )
        ex.family(
            "fishchat_offline_queue_messages",
            "gauge",
            "Messages waiting in offline queues now.",
            [({}, sum(self.queue_depths.values()))],
        )
        ex.family(
            "fishchat_auth_failures_total",
            "counter",
            "Refused logins, by who tried: devices or monitor operators.",
            [({**labels, "kind": "device"}, f.auth_failures) for labels, f in rows]
            + [({"kind": "operator"}, self.operator_failures)],
        )
        latency = self.source.latency()
        if latency is not None:
            ex.histogram(
                "fishchat_delivery_latency_seconds",
                "From accepted to written to the recipient (queued time included).",
                latency,
                scale=0.001,
            )
        proc = process_stats()
        start_s = self.source.started_ms / 1000.0
        ex.family(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time.",
            [({}, proc["cpu_seconds"])],
        )
        ex.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory.",
            [({}, proc["resident_memory_bytes"])],
        )
        if "open_fds" in proc:
            ex.family(
                "process_open_fds", "gauge", "Open file descriptors.", [({}, proc["open_fds"])]
            )
        if "max_fds" in proc:
            ex.family(
                "process_max_fds",
                "gauge",
                "Limit of open file descriptors.",
                [({}, proc["max_fds"])],
            )
        ex.family(
            "process_start_time_seconds", "gauge", "Start time, Unix seconds.", [({}, start_s)]
        )
        return ex.text()


def _state(rec: Any, live: dict[str, dict[str, Any]]) -> str:
    if rec.revoked:
        return "revoked"
    return "online" if rec.id in live else "offline"


PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RingHandler(logging.Handler):
    """Warnings and errors from the log, for "recent errors" on the page."""

    def __init__(self, ring: Ring) -> None:
        super().__init__(logging.WARNING)
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        self.ring.add(
            at_ms=int(record.created * 1000),
            level=record.levelname.lower(),
            logger=record.name,
            message=msg[:500],
        )


def _sse(event: str, doc: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def _throttled(wait: float) -> Response:
    secs = max(1, int(wait + 0.999))
    return error_response(
        429, f"too many wrong tokens: retry in {secs} s", {"Retry-After": str(secs)}
    )


def _int_arg(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    try:
        return min(hi, max(lo, int(query.get(name, default))))
    except ValueError:
        return default


def _static(name: str) -> Response:
    if "/" in name or name.startswith(".") or not name:
        return error_response(404, "no such file")
    ext = os.path.splitext(name)[1]
    ctype = STATIC_TYPES.get(ext)
    if ctype is None:
        return error_response(404, "no such file")
    try:
        data = resources.files("fishchat_iot.roles").joinpath("monitor_static", name).read_bytes()
    except (FileNotFoundError, OSError):
        return error_response(404, "no such file")
    return Response(200, data, ctype)


def _page_response(html: str, status: int) -> Response:
    return Response(status, html.encode(), "text/html; charset=utf-8")


def _login_page(message: str) -> str:
    import html

    note = f'<p class="err" role="alert">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FishChat IoT monitor: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/monitor.css"></head>
<body class="login"><main class="card">
<h1>FishChat IoT monitor</h1>{note}
<form method="post" action="/login">
<label for="token">Operator token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button>
</form>
<p class="hint">No token yet? On the server: <code>fishchat-iot operator add NAME</code></p>
</main></body></html>
"""
