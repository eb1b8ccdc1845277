"""The monitor as its own process in the distributed mode (``fishchat-iot run monitor``):
the dashboard, JSON API and ``/metrics`` of ``roles/monitor.py`` for the whole cluster,
read from the bus (node registry heartbeats, presence, events) and the store (devices,
topics, offline queues). See docs/monitor.md, "Cluster mode".

Two halves:

- ``MonitorNode(settings)``: the process (``ClusterSource`` + ``Monitor``), which also
  heartbeats itself into the node registry as role ``monitor``;
- ``attach_cluster_reporting(msg_server, bus)``, called once in each msg_server
  process: its heartbeats then carry ``NodeInfo.stats`` (``node_stats``) and it
  publishes ``login_refused`` and ``error`` events for the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fishchat_iot import __version__
from fishchat_iot.backends import (
    describe_bus,
    describe_store,
    make_store,
    open_with_retry,
)
from fishchat_iot.bus.base import Bus, BusUnavailable, NodeInfo
from fishchat_iot.config import Settings
from fishchat_iot.files import PUBLIC, write_atomic
from fishchat_iot.roles.manager import now_ms
from fishchat_iot.roles.monitor import (
    QUEUE_PERIOD,
    Figures,
    Monitor,
    MonitorSource,
    node_row,
)
from fishchat_iot.roles.monitor_metrics import Exposition, Histogram, Series
from fishchat_iot.roles.node import RoleNode
from fishchat_iot.stores.base import Store, StoreUnavailable

if TYPE_CHECKING:
    from fishchat_iot.core.session import Session
    from fishchat_iot.roles.msg_server import MsgServer

log = logging.getLogger("fishchat.monitor")

ROLES = ("gateway", "msg_server", "router", "manager", "monitor")
MONITOR_ROLE = "monitor"
STATUS_FILE = "status.json"  # what `fishchat-iot status` reads (cli/status.py)
# Events msg_servers publish for the monitor (the monitor publishes "revoke", "kick").
EVENT_LOGIN_REFUSED = "login_refused"
EVENT_ERROR = "error"
ERROR_EVENTS_BURST = 20  # error events a node may publish at once ...
ERROR_EVENTS_PER_S = 2.0  # ... and per second after that; the rest are only counted
TOPICS_REPORTED = 200  # the busiest topics a node reports in its stats
PRESENCE_CONCURRENCY = 64  # presence reads at once
QUEUE_LOOKUPS = 1000  # devices with the deepest queues whose node is looked up


# -- the msg_server side -----------------------------------------------------------
class _Reporter:
    """What one msg_server process publishes for the cluster monitor."""

    def __init__(self, msg_server: MsgServer, bus: Bus) -> None:
        self.ms = msg_server
        self.bus = bus
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.allowance = float(ERROR_EVENTS_BURST)
        self.refilled = time.monotonic()
        self.suppressed = 0
        self.handler = _EventLogHandler(self)

    def publish(self, event: dict[str, Any]) -> None:
        """Fire and forget from synchronous code on the event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another thread: hand it to the loop
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.publish, event)
            return
        self.loop = loop
        task = loop.create_task(self._publish(event), name="monitor-event")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _publish(self, event: dict[str, Any]) -> None:
        # No log line on failure: this runs for log records, and the bus logs outages.
        with contextlib.suppress(BusUnavailable):
            await self.bus.publish_event(event)

    def login_refused(self, s: Session, device_id: str, code: str, text: str) -> None:
        self.publish(
            {
                "kind": EVENT_LOGIN_REFUSED,
                "node": self.ms.node_id,
                "device": device_id[:64],
                "code": code,
                "text": text[:200],
                "transport": s.transport_name,
                "at_ms": now_ms(),
            }
        )

    def error_allowed(self) -> bool:
        now = time.monotonic()
        self.allowance = min(
            float(ERROR_EVENTS_BURST),
            self.allowance + (now - self.refilled) * ERROR_EVENTS_PER_S,
        )
        self.refilled = now
        if self.allowance < 1.0:
            self.suppressed += 1
            return False
        self.allowance -= 1.0
        return True


class _EventLogHandler(logging.Handler):
    """Warnings and errors of a msg_server process, as ``error`` events (rate-limited)."""

    def __init__(self, reporter: _Reporter) -> None:
        super().__init__(logging.WARNING)
        self.reporter = reporter
        self._inside = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._inside or not self.reporter.error_allowed():
            return
        self._inside = True
        try:
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            self.reporter.publish(
                {
                    "kind": EVENT_ERROR,
                    "node": self.reporter.ms.node_id,
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": message[:500],
                    "at_ms": int(record.created * 1000),
                }
            )
        finally:
            self._inside = False


_attached: weakref.WeakKeyDictionary[MsgServer, _Reporter] = weakref.WeakKeyDictionary()


def attach_cluster_reporting(msg_server: MsgServer, bus: Bus) -> None:
    """Make a msg_server process report to the cluster monitor: its heartbeats carry
    ``NodeInfo.stats`` (``node_stats``), refused logins are published as
    ``{"kind": "login_refused", "node", "device", "code", "text", "transport",
    "at_ms"}`` and its log's warnings and errors as ``{"kind": "error", "node", "level",
    "logger", "message", "at_ms"}`` (at most ``ERROR_EVENTS_BURST``, then
    ``ERROR_EVENTS_PER_S``). Call once, before ``msg_server.start()``. The monitor
    publishes ``revoke`` and ``kick`` events, which the msg_server acts on itself."""
    if msg_server in _attached:
        return
    reporter = _Reporter(msg_server, bus)
    with contextlib.suppress(RuntimeError):  # called on the loop: log records of other
        reporter.loop = asyncio.get_running_loop()  # threads are handed to it
    _attached[msg_server] = reporter
    msg_server.on_login_refused.append(reporter.login_refused)
    logging.getLogger().addHandler(reporter.handler)


def detach_cluster_reporting(msg_server: MsgServer) -> None:
    """Undo ``attach_cluster_reporting`` (tests; a process that stops needs nothing)."""
    reporter = _attached.pop(msg_server, None)
    if reporter is None:
        return
    logging.getLogger().removeHandler(reporter.handler)
    with contextlib.suppress(ValueError):
        msg_server.on_login_refused.remove(reporter.login_refused)


def cluster_stats(msg_server: MsgServer) -> dict[str, Any]:
    """``NodeInfo.stats`` for ``MsgServer.node_info``: ``node_stats`` once attached,
    else nothing (the embedded mode has no use for it)."""
    return node_stats(msg_server) if msg_server in _attached else {}


def node_stats(ms: MsgServer) -> dict[str, Any]:
    """What a msg_server's heartbeat carries for the monitor (all since the node
    started): sessions by transport, messages stored offline, sends refused by error
    code, refused logins, unacked deliveries now, the busiest topics' message counts
    and the delivery latency histogram (ms)."""
    by_transport: dict[str, int] = {}
    inflight = 0
    for s in ms.sessions.values():
        by_transport[s.transport_name] = by_transport.get(s.transport_name, 0) + 1
        inflight += len(s.inflight)
    topics = ms.topic_msgs
    if len(topics) > TOPICS_REPORTED:
        topics = dict(heapq.nlargest(TOPICS_REPORTED, topics.items(), key=lambda kv: kv[1]))
    h = ms.latency
    return {
        "sessions_by_transport": by_transport,
        "msgs_queued": ms.msgs_queued,
        "dropped": dict(ms.dropped),
        "auth_failures": ms.auth_failures,
        "inflight": inflight,
        "topic_msgs": dict(topics),
        "latency_ms": {
            "bounds": list(h.bounds),
            "counts": list(h.counts),
            "sum": h.total,
            "count": h.count,
        },
    }


# -- the monitor side ----------------------------------------------------------------
def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _counts(value: Any) -> dict[str, int]:
    return {str(k): _int(v) for k, v in value.items()} if isinstance(value, dict) else {}


class _Rate:
    """msgs/s of one node from its successive heartbeats."""

    __slots__ = ("at_ms", "msgs_in", "msgs_out", "rate_in", "rate_out")

    def __init__(self, n: NodeInfo) -> None:
        self.at_ms, self.msgs_in, self.msgs_out = n.updated_ms, n.msgs_in, n.msgs_out
        self.rate_in: float | None = None
        self.rate_out: float | None = None

    def update(self, n: NodeInfo) -> None:
        if n.updated_ms <= self.at_ms:
            return
        dt = (n.updated_ms - self.at_ms) / 1000.0
        if n.msgs_in >= self.msgs_in and n.msgs_out >= self.msgs_out:
            self.rate_in = (n.msgs_in - self.msgs_in) / dt
            self.rate_out = (n.msgs_out - self.msgs_out) / dt
        else:  # the node restarted under the same id: its counters began again
            self.rate_in = self.rate_out = None
        self.at_ms, self.msgs_in, self.msgs_out = n.updated_ms, n.msgs_in, n.msgs_out


class ClusterSource(MonitorSource):
    """The whole cluster: nodes from the node registry, devices and topics from the
    store, presence and events from the bus (see ``MonitorSource``)."""

    def __init__(self, settings: Settings, bus: Bus, store: Store, node_id: str = "") -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.node_id = node_id  # this monitor's own entry in the registry
        self.started_ms = now_ms()
        self.live: list[NodeInfo] = []  # from the last sample
        self.rows: list[dict[str, Any]] = []  # /api/nodes, from the last sample
        self.registry: dict[str, int] = {}  # devices, revoked, topics (every 5 s)
        self.listeners: dict[str, str] = {}
        self._known: dict[str, NodeInfo] = {}  # last heartbeat seen of every node
        self._rates: dict[str, _Rate] = {}
        self._node_queued: dict[str, int] | None = None
        self._depths_seen: dict[str, int] | None = None
        self._registry_read = -QUEUE_PERIOD
        self.events_seen = 0  # events heard on the bus, of every kind
        self._bus_ok = False
        self._store_ok = False
        self._lookups = asyncio.Semaphore(PRESENCE_CONCURRENCY)

    async def start(self, mon: Monitor) -> None:
        await super().start(mon)
        self.bus.on_event(self._event)

    def _event(self, event: dict[str, Any]) -> None:
        self.events_seen += 1
        kind = event.get("kind")
        node = str(event.get("node", ""))[:128]
        at = _int(event.get("at_ms")) or now_ms()
        if kind == EVENT_LOGIN_REFUSED:
            self.mon.refused.add(
                at_ms=at,
                device_id=str(event.get("device", ""))[:64],
                code=str(event.get("code", ""))[:64],
                text=str(event.get("text", ""))[:200],
                transport=str(event.get("transport", ""))[:32],
                node=node,
            )
        elif kind == EVENT_ERROR:
            self.mon.errors.add(
                at_ms=at,
                level=str(event.get("level", "error"))[:16],
                logger=str(event.get("logger", ""))[:128],
                message=str(event.get("message", ""))[:500],
                node=node,
            )

    # -- sampling ----------------------------------------------------------------
    async def sample(self, series: Series) -> bool:
        try:
            live_by_role = await asyncio.gather(*(self.bus.live_nodes(r) for r in ROLES))
            dead_by_role = await asyncio.gather(*(self.bus.dead_nodes(r) for r in ROLES))
        except BusUnavailable as exc:
            if self._bus_ok:
                log.warning("cluster monitor: the bus is unreachable (%s); retrying", exc)
            self._bus_ok = False
            return False
        if not self._bus_ok and self.rows:
            log.warning("cluster monitor: the bus is reachable again")
        self._bus_ok = True
        live = [n for nodes in live_by_role for n in nodes]
        for n in live:
            self._known[n.node_id] = n
            rate = self._rates.get(n.node_id)
            if rate is None:
                self._rates[n.node_id] = _Rate(n)
            else:
                rate.update(n)
        self.live = live
        await self._read_queues()
        now = now_ms()
        rows = [self._row(n, now) for n in live]
        for role, dead in zip(ROLES, dead_by_role, strict=True):
            rows.extend(self._dead_row(node_id, role) for node_id in dead)
        self.rows = rows
        await self._read_registry()
        servers = self._servers()
        series.record(
            sum(self._rates[n.node_id].rate_in or 0.0 for n in servers),
            sum(self._rates[n.node_id].rate_out or 0.0 for n in servers),
            sum(n.sessions for n in servers),
        )
        return True

    def _servers(self) -> list[NodeInfo]:
        return [n for n in self.live if n.role == "msg_server"]

    def _row(self, n: NodeInfo, now: int) -> dict[str, Any]:
        rate = self._rates[n.node_id]
        server = n.role == "msg_server"
        stats = n.stats if isinstance(n.stats, dict) else {}
        queued = None
        if server and self._node_queued is not None:
            queued = self._node_queued.get(n.node_id, 0)
        row = node_row(n, now, local=n.node_id == self.node_id)
        row["queued"] = queued
        if server:
            row["msgs_in_per_s"] = _round(rate.rate_in)
            row["msgs_out_per_s"] = _round(rate.rate_out)
        row["inflight"] = _int(stats.get("inflight")) if server else None
        return row

    def _dead_row(self, node_id: str, role: str) -> dict[str, Any]:
        last = self._known.get(node_id)
        return {
            "node_id": node_id,
            "role": role,
            "address": last.address if last is not None else None,
            "started_ms": last.started_ms if last is not None else None,
            "updated_ms": last.updated_ms if last is not None else None,
            "sessions": 0,
            "msgs_in": last.msgs_in if last is not None else 0,
            "msgs_out": last.msgs_out if last is not None else 0,
            "msgs_in_per_s": None,
            "msgs_out_per_s": None,
            "queued": None,
            "inflight": None,
            "health": "down",
            "local": False,
        }

    async def _read_queues(self) -> None:
        """Per msg_server, the offline queues of the devices it holds now (their backlog
        it is feeding), when the monitor has read new queue depths: the deepest
        ``QUEUE_LOOKUPS`` queues' devices are looked up on the bus."""
        depths = self.mon.queue_depths
        if depths is self._depths_seen:
            return
        deepest = heapq.nlargest(QUEUE_LOOKUPS, depths.items(), key=lambda kv: kv[1])
        where = await self._where([d for d, _ in deepest])
        per_node: dict[str, int] = {}
        for device_id, depth in deepest:
            node = where.get(device_id)
            if node is not None:
                per_node[node] = per_node.get(node, 0) + depth
        self._node_queued = per_node
        self._depths_seen = depths

    async def _read_registry(self) -> None:
        if time.monotonic() - self._registry_read < QUEUE_PERIOD:
            return
        self._registry_read = time.monotonic()
        try:
            devices = await self.store.list_devices()
            topics = await self.store.list_topics()
        except StoreUnavailable as exc:
            if self._store_ok:
                log.warning("cluster monitor: the store is unreachable (%s)", exc)
            self._store_ok = False
            return
        self._store_ok = True
        self.registry = {
            "devices": len(devices),
            "revoked": sum(1 for d in devices if d.revoked),
            "topics": len(topics),
            "queued": sum(self.mon.queue_depths.values()),
        }

    async def _where(self, device_ids: Sequence[str]) -> dict[str, str]:
        """Presence of these devices: id -> node id, for those online."""

        async def one(device_id: str) -> tuple[str, str | None]:
            async with self._lookups:
                return device_id, await self.bus.where(device_id)

        found = await asyncio.gather(*(one(d) for d in device_ids))
        return {d: node for d, node in found if node is not None}

    # -- what the monitor asks ---------------------------------------------------------
    def figures(self) -> list[tuple[dict[str, str], Figures]]:
        out = []
        for n in self._servers():
            st = n.stats if isinstance(n.stats, dict) else {}
            out.append(
                (
                    {"node": n.node_id},
                    Figures(
                        _counts(st.get("sessions_by_transport")),
                        n.msgs_in,
                        n.msgs_out,
                        _int(st.get("msgs_queued")),
                        _counts(st.get("dropped")),
                        _int(st.get("auth_failures")),
                    ),
                )
            )
        return out

    def latency(self) -> Histogram | None:
        merged: Histogram | None = None
        for n in self._servers():
            lat = n.stats.get("latency_ms") if isinstance(n.stats, dict) else None
            if not isinstance(lat, dict):
                continue
            bounds, counts = lat.get("bounds"), lat.get("counts")
            if not isinstance(bounds, list) or not isinstance(counts, list):
                continue
            if len(counts) != len(bounds) + 1:
                continue
            if merged is None:
                merged = Histogram(bounds)
            elif list(merged.bounds) != bounds:
                continue  # another version's buckets: left out rather than mixed
            for i, c in enumerate(counts):
                merged.counts[i] += _int(c)
            merged.total += float(lat.get("sum") or 0.0)
        return merged

    def online_count(self) -> int:
        return sum(n.sessions for n in self._servers())

    async def sessions_for(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        where = await self._where(device_ids)
        addresses = {n.node_id: n.address for n in self.live}
        return {
            device_id: {
                "node": node,
                "address": addresses.get(node),
                "since_ms": None,
                "transport": None,
                "last_seen_ms": None,
                "inflight": None,
            }
            for device_id, node in where.items()
        }

    def topic_traffic(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for n in self._servers():
            st = n.stats if isinstance(n.stats, dict) else {}
            for name, count in _counts(st.get("topic_msgs")).items():
                total[name] = total.get(name, 0) + count
        return total

    async def nodes(self) -> list[dict[str, Any]]:
        return self.rows

    def status_base(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "updated_ms": now_ms(),
            "version": __version__,
            "listeners": dict(self.listeners),
            "nodes": self.rows,
            "cluster": {
                "node_id": self.node_id,
                "bus": describe_bus(self.settings),
                "store": describe_store(self.settings),
                "bus_ok": self._bus_ok,
                "store_ok": self._store_ok,
                "events": self.events_seen,
            },
            "registry": dict(self.registry),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self._bus_ok and self._store_ok, {"bus": self._bus_ok, "store": self._store_ok}

    async def revoke(self, device_id: str) -> None:
        await self.store.revoke_device(device_id, now_ms())
        try:
            await self.bus.publish_event({"kind": "revoke", "device": device_id})
        except BusUnavailable as exc:
            # Revoked in the registry: msg_servers also re-read it (the store's poll).
            log.warning("revoke of %s not broadcast (%s): sessions close later", device_id, exc)

    async def kick(self, device_id: str) -> str | None:
        node = await self.bus.where(device_id)
        if node is None:
            return None
        await self.bus.publish_event({"kind": "kick", "device": device_id})
        return node

    def extra_metrics(self, ex: Exposition) -> None:
        ex.family(
            "fishchat_node_up",
            "gauge",
            "1 for a node heartbeating into the registry, 0 for a registered dead one.",
            [
                (
                    {"node": str(r["node_id"]), "role": str(r["role"])},
                    0 if r["health"] == "down" else 1,
                )
                for r in self.rows
            ]
            or [({}, 0)],
        )


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


class MonitorNode(RoleNode):
    """``fishchat-iot run monitor``: the cluster monitor as a process. ``start`` waits
    for the bus and the store (roles start in any order), then serves HTTP and
    heartbeats into the node registry as role ``monitor`` every 2 s; it also rewrites
    ``{data_dir}/status.json`` for ``fishchat-iot status``. ``bus``/``store``: given
    ones (tests) instead of those the settings name; the node closes them either way."""

    role = MONITOR_ROLE

    def __init__(
        self, settings: Settings, bus: Bus | None = None, store: Store | None = None
    ) -> None:
        super().__init__(settings, bus)
        self.node_id = settings.node.id
        self.store = store if store is not None else make_store(settings)
        self.source = ClusterSource(settings, self.bus, self.store, settings.node.id)
        self.monitor = Monitor(self.source)

    @property
    def address(self) -> str:
        return self.monitor.address

    @address.setter
    def address(self, value: str) -> None:
        pass  # the monitor's HTTP listener decides

    @property
    def metrics_address(self) -> str:
        return self.monitor.metrics_address

    async def start(self) -> None:
        if self.settings.bus.backend != "redis":
            log.warning(
                "run monitor with bus.backend = %r sees only this process: set [bus] "
                'backend = "redis" to monitor a cluster',
                self.settings.bus.backend,
            )
        await super().start()

    async def _start(self) -> None:
        await open_with_retry(self.store.open, describe_store(self.settings))
        await self.monitor.start()
        if not self.node_id:
            self.node_id = f"monitor-{self.address}"
        self.source.node_id = self.node_id
        self.source.listeners = {"monitor": self.address}
        if self.metrics_address:
            self.source.listeners["metrics"] = self.metrics_address
        with contextlib.suppress(BusUnavailable):
            await self.bus.heartbeat(self.node_info())
        await self._after_beat()
        log.info("cluster monitor %s on http://%s/", self.node_id, self.address)

    def stats(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics_address,
            "operators": self.monitor.operators.count(),
            "bus_ok": self.source.ready()[1]["bus"],
            "store_ok": self.source.ready()[1]["store"],
        }

    def node_info(self) -> NodeInfo:
        info = super().node_info()
        info.started_ms = self.source.started_ms
        return info

    async def _after_beat(self) -> None:
        try:
            await asyncio.to_thread(self._write_status)
        except OSError as exc:
            log.warning("cannot write %s: %s", STATUS_FILE, exc)

    def _write_status(self) -> None:
        write_atomic(
            self.settings.data_dir / STATUS_FILE, json.dumps(self.source.status_base()), PUBLIC
        )

    async def _stop(self) -> None:
        await self.monitor.stop()
        with contextlib.suppress(OSError):
            (self.settings.data_dir / STATUS_FILE).unlink()
        with contextlib.suppress(Exception):
            await self.store.close()
