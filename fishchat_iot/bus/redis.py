"""The distributed bus on Redis (redis.asyncio): node registry, presence, node inboxes
and registry-change events.

Keys (``prefix`` defaults to ``fc``), laid out for Redis Cluster: the part in braces is
the hash tag, so every key that one operation touches shares a slot.

======================================  ================================================
``fc:{nodes}``                          hash node id -> NodeInfo (JSON): the registry
``fc:{node:<id>}:alive``                string with a TTL (``node_ttl``), refreshed by
                                        every heartbeat: the node counts as alive while
                                        it exists
``fc:{node:<id>}:inbox``                stream: the node's inbox, consumer group ``fc``
``fc:{dev:<id>}:at``                    string node id with a TTL (``presence_ttl``):
                                        where the device's live session is
``fc:events``                           pub/sub channel: registry changes (revoke,
                                        membership) for every node
======================================  ================================================

A node's liveness key and its inbox share the ``{node:<id>}`` slot, so "hand this batch
to the node if it is alive" is one atomic Lua script: once a node's liveness key has
expired nothing more lands in its inbox, which is what lets another node take over a
dead inbox and empty it for good (``claim_inbox``). A device's keys share the
``{dev:<id>}`` slot (one key today; per-device counters or sequences added later belong
there too). The registry hash is one small key in one slot: a cluster holds tens of
nodes, not millions. Nothing here needs multi-key operations across slots.

Inboxes: one entry per ``send_to_node`` call, holding the whole batch as compact JSON
arrays (orjson). The owner reads with XREADGROUP (consumer name = node id, so a
restarted node first re-reads its own pending entries), calls the handler, then XACKs
and XDELs the entries: an inbox only holds what is not delivered yet. Entries the
handler failed on, or left pending by a consumer that died, are taken over with
XAUTOCLAIM once idle for ``claim_idle`` seconds. Delivery is at least once: an entry
whose XACK was lost is delivered again, and receivers drop duplicate ids.

Durability of a hand-off is Redis's: run it with ``appendonly yes`` (``appendfsync
always`` to survive a power loss; ``everysec`` risks the last second).

Presence is set on login and refreshed by this bus in the background for every device
this process set present and did not clear (``presence_ttl / 3``): when a node dies its
devices' presence expires within ``presence_ttl`` seconds. A refresh, like a clear,
only touches an entry still pointing at this node (a newer login elsewhere wins).

Connection loss: every operation raises ``BusUnavailable`` (redis-py first retries a
few times); background loops (inbox reader, presence refresher, event subscriber) log
once per outage, retry with backoff, and log again when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fishchat_iot.bus.base import Bus, BusUnavailable, InboxHandler, NodeInfo
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.core.tasks import cancel_and_wait

__all__ = ["BusUnavailable", "RedisBus"]

log = logging.getLogger(__name__)

T = TypeVar("T")

GROUP = "fc"
_FIELD = b"b"  # stream entry field holding the batch (format: list of envelope arrays)
_DELIVERING = 32  # batches of one inbox being handled at once

# Clear/refresh presence only while it still names this node.
_CLEAR_PRESENCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_REFRESH_PRESENCE = """
local at = redis.call('GET', KEYS[1])
if at == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not at then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
# KEYS: alive, inbox. Hand off only to a live node.
_SEND = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('XADD', KEYS[2], '*', 'b', ARGV[1])
end
return false
"""
# KEYS: alive, inbox. Drop an emptied inbox of a node that is (still) dead.
_DROP_INBOX = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('XLEN', KEYS[2]) == 0 then
  return redis.call('DEL', KEYS[2])
end
return 0
"""

# Errors meaning "Redis is not reachable now" (as opposed to a wrong command).
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _encode(envelopes: Sequence[Envelope]) -> bytes:
    return orjson.dumps(
        [[e.id, e.sender, e.to, e.body, e.ts, e.okey, e.kind, e.topic, e.enc] for e in envelopes]
    )


def _decode(data: bytes) -> list[Envelope]:
    return [Envelope(*row) for row in orjson.loads(data)]


def _entries(resp: Any) -> list[Any]:
    """The entries of an XREADGROUP reply on one stream: [[stream, [entry, ...]]]."""
    return list(resp[0][1]) if resp else []


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, _OUTAGE_ERRORS):
        return True
    # A restarting server answers LOADING until its data is back.
    return isinstance(exc, ResponseError) and str(exc).startswith("LOADING")


class _Outage:
    """Log a background loop's outage once when it starts and once when it ends."""

    def __init__(self, what: str, backoff_max: float) -> None:
        self.what = what
        self.since: float | None = None
        self.delay = 0.05
        self.backoff_max = backoff_max

    async def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: Redis unreachable (%s); retrying", self.what, exc)
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.backoff_max)

    def ok(self) -> None:
        if self.since is not None:
            log.info(
                "%s: Redis reachable again after %.1f s", self.what, time.monotonic() - self.since
            )
            self.since = None
        self.delay = 0.05


class RedisBus(Bus):
    """``Bus`` on one Redis (or Redis Cluster, see the module docstring for keys).

    ``node_ttl``: a node is alive this long after its last heartbeat. ``presence_ttl``:
    a device's presence expires this long after its node last refreshed it.
    ``claim_idle``: an inbox entry pending (read, not acked) this long is taken over.
    ``timeout``: socket timeout of every Redis call.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fc",
        node_ttl: float = 10.0,
        presence_ttl: float = 30.0,
        claim_idle: float = 30.0,
        timeout: float = 5.0,
        block: float = 1.0,
        batch: int = 256,
        backoff_max: float = 2.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._node_ttl_ms = max(1, int(node_ttl * 1000))
        self._presence_ttl_ms = max(1, int(presence_ttl * 1000))
        self._claim_idle_ms = max(0, int(claim_idle * 1000))
        self._timeout = timeout
        self._block_ms = max(1, int(block * 1000))
        self._batch = batch
        self._backoff_max = backoff_max
        self._redis: Redis | None = None
        self._inboxes: dict[str, asyncio.Task[None]] = {}
        self._owned: dict[str, str] = {}  # device -> node: presence this process keeps
        self._tasks: set[asyncio.Task[None]] = set()
        self._event_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._restored_callbacks: list[Callable[[list[str]], None]] = []
        self._events_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- keys --------------------------------------------------------------------
    def _nodes_key(self) -> str:
        return f"{self._prefix}:{{nodes}}"

    def _alive_key(self, node_id: str) -> str:
        return f"{self._prefix}:{{node:{node_id}}}:alive"

    def _inbox_key(self, node_id: str) -> str:
        return f"{self._prefix}:{{node:{node_id}}}:inbox"

    def _role_inbox_key(self, role: str) -> str:
        return f"{self._prefix}:{{role:{role}}}:inbox"

    def _presence_key(self, device_id: str) -> str:
        return f"{self._prefix}:{{dev:{device_id}}}:at"

    def _events_channel(self) -> str:
        return f"{self._prefix}:events"

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        """Connect and check Redis answers. Idempotent; raises BusUnavailable."""
        if self._redis is not None:
            return
        redis = Redis.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            health_check_interval=30,
            protocol=2,  # the reply shapes parsed here (RESP3 maps differ)
        )
        try:
            await redis.ping()
        except RedisError as exc:
            await redis.aclose()
            raise BusUnavailable(f"Redis bus at {self._url}: {exc}") from exc
        self._redis = redis
        self._clear_script = redis.register_script(_CLEAR_PRESENCE)
        self._refresh_script = redis.register_script(_REFRESH_PRESENCE)
        self._send_script = redis.register_script(_SEND)
        self._drop_inbox_script = redis.register_script(_DROP_INBOX)
        self._spawn(self._refresh_presence_loop(), "redis-bus-presence")
        if self._event_callbacks:
            self._start_events()

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._inboxes.values(), *self._tasks]
        if self._events_task is not None:
            tasks.append(self._events_task)
        self._inboxes.clear()
        self._tasks.clear()
        self._events_task = None
        await cancel_and_wait(tasks, log, "Redis bus")
        redis, self._redis = self._redis, None
        self._owned.clear()
        if redis is not None:
            await redis.aclose()
        self._closing = False

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _r(self) -> Redis:
        if self._redis is None:
            raise BusUnavailable("Redis bus is not open")
        return self._redis

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except RedisError as exc:
            raise BusUnavailable(f"Redis bus ({what}): {exc}") from exc
        except OSError as exc:
            raise BusUnavailable(f"Redis bus ({what}): {exc}") from exc

    # -- node registry -----------------------------------------------------------
    async def heartbeat(self, node: NodeInfo) -> None:
        node.updated_ms = _now_ms()
        pipe = self._r().pipeline(transaction=False)
        pipe.hset(self._nodes_key(), node.node_id, orjson.dumps(node))
        pipe.set(self._alive_key(node.node_id), node.updated_ms, px=self._node_ttl_ms)
        await self._call("heartbeat", pipe.execute())

    async def remove_node(self, node_id: str) -> None:
        """The node leaves: it is no longer alive. Its registry entry goes too unless
        its inbox still holds entries, which ``dead_nodes``/``claim_inbox`` then find."""
        reader = self._inboxes.pop(self._inbox_key(node_id), None)
        if reader is not None:  # this process stops reading it first
            await cancel_and_wait([reader], log, "Redis bus")
        r = self._r()
        await self._call("remove_node", r.delete(self._alive_key(node_id)))
        if await self._call("remove_node", r.xlen(self._inbox_key(node_id))) == 0:
            await self._call("remove_node", r.hdel(self._nodes_key(), node_id))
            await self._call(
                "remove_node",
                self._drop_inbox_script(keys=[self._alive_key(node_id), self._inbox_key(node_id)]),
            )

    async def _registry(self) -> list[NodeInfo]:
        raw = await self._call("registry", self._r().hgetall(self._nodes_key()))
        nodes = []
        for value in raw.values():
            try:
                nodes.append(NodeInfo(**orjson.loads(value)))
            except (orjson.JSONDecodeError, TypeError):
                log.warning("node registry: unreadable entry %r", value[:200])
        nodes.sort(key=lambda n: n.node_id)
        return nodes

    async def _alive(self, node_ids: Sequence[str]) -> list[bool]:
        if not node_ids:
            return []
        pipe = self._r().pipeline(transaction=False)
        for node_id in node_ids:
            pipe.exists(self._alive_key(node_id))
        return [bool(n) for n in await self._call("liveness", pipe.execute())]

    async def live_nodes(self, role: str) -> list[NodeInfo]:
        nodes = [n for n in await self._registry() if n.role == role]
        alive = await self._alive([n.node_id for n in nodes])
        return [n for n, ok in zip(nodes, alive, strict=True) if ok]

    async def dead_nodes(self, role: str | None = None) -> list[str]:
        """Registered nodes (of ``role``, or any) whose liveness key has expired: their
        inboxes may hold entries for ``claim_inbox``."""
        nodes = [n for n in await self._registry() if role is None or n.role == role]
        alive = await self._alive([n.node_id for n in nodes])
        return [n.node_id for n, ok in zip(nodes, alive, strict=True) if not ok]

    # -- presence ----------------------------------------------------------------
    async def set_presence(self, device_id: str, node_id: str) -> None:
        await self._call(
            "set_presence",
            self._r().set(self._presence_key(device_id), node_id, px=self._presence_ttl_ms),
        )
        self._owned[device_id] = node_id

    async def clear_presence(self, device_id: str, node_id: str) -> None:
        if self._owned.get(device_id) == node_id:
            del self._owned[device_id]
        await self._call(
            "clear_presence",
            self._clear_script(keys=[self._presence_key(device_id)], args=[node_id]),
        )

    async def where(self, device_id: str) -> str | None:
        value = await self._call("where", self._r().get(self._presence_key(device_id)))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def where_many(self, device_ids: Sequence[str]) -> list[str | None]:
        if not device_ids:
            return []
        if len(device_ids) == 1:
            return [await self.where(device_ids[0])]
        # One GET per key in one pipeline: the keys live in different cluster slots.
        pipe = self._r().pipeline(transaction=False)
        for d in device_ids:
            pipe.get(self._presence_key(d))
        values = await self._call("where", pipe.execute())
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    async def refresh_presence(self) -> int:
        """Refresh the presence of every device this process set present (done in the
        background every ``presence_ttl / 3``). Returns how many still point here."""
        owned = list(self._owned.items())
        kept = 0
        for start in range(0, len(owned), 1000):
            chunk = owned[start : start + 1000]
            pipe = self._r().pipeline(transaction=False)
            for device_id, node_id in chunk:
                await self._refresh_script(
                    keys=[self._presence_key(device_id)],
                    args=[node_id, self._presence_ttl_ms],
                    client=pipe,
                )
            results = await self._call("refresh_presence", pipe.execute())
            restored = []
            for (device_id, node_id), result in zip(chunk, results, strict=True):
                if result:
                    kept += 1
                    if result == 2:
                        restored.append(device_id)
                elif self._owned.get(device_id) == node_id:
                    del self._owned[device_id]  # a newer login elsewhere holds it
            if restored:
                for callback in list(self._restored_callbacks):
                    try:
                        callback(restored)
                    except Exception:
                        log.exception("presence-restored callback %r failed", callback)
        return kept

    def on_presence_restored(self, callback: Callable[[list[str]], None]) -> None:
        """``callback(devices)`` when a refresh found their presence expired (Redis was
        away longer than ``presence_ttl``, or restarted) and set it again: senders on
        other nodes may have queued messages for them meanwhile."""
        self._restored_callbacks.append(callback)

    async def _refresh_presence_loop(self) -> None:
        outage = _Outage("presence refresh", self._backoff_max)
        period = self._presence_ttl_ms / 3000
        while not self._closing:
            await asyncio.sleep(period)
            try:
                await self.refresh_presence()
            except BusUnavailable as exc:
                await outage.failed(exc)
                continue
            outage.ok()

    # -- node inboxes ------------------------------------------------------------
    async def attach_inbox(self, node_id: str, handler: InboxHandler) -> None:
        """Start reading ``node_id``'s inbox: first its own pending entries (left by a
        previous run of this node), then new ones; entries are acked once ``handler``
        returns. Raises BusUnavailable when Redis cannot be reached now."""
        await self._attach(self._inbox_key(node_id), node_id, f"inbox of {node_id}", handler)

    async def attach_role_inbox(self, role: str, consumer: str, handler: InboxHandler) -> None:
        """Read the inbox every process of ``role`` shares (the consumer group spreads
        its entries over them; one that dies has its pending entries taken over by the
        others after ``claim_idle``)."""
        await self._attach(self._role_inbox_key(role), consumer, f"{role} inbox", handler)

    async def send_to_role(self, role: str, envelopes: Sequence[Envelope]) -> None:
        """XADD the batch to the role's shared inbox (durable once this returns)."""
        if envelopes:
            await self._call(
                "send_to_role",
                self._r().xadd(self._role_inbox_key(role), {_FIELD: _encode(envelopes)}),
            )

    async def _attach(self, stream: str, consumer: str, label: str, handler: InboxHandler) -> None:
        await self._ensure_group(stream)
        old = self._inboxes.pop(stream, None)
        if old is not None:
            await cancel_and_wait([old], log, "Redis bus")
        task = asyncio.get_running_loop().create_task(
            self._inbox_loop(stream, consumer, label, handler), name=f"redis-{label}"
        )
        self._inboxes[stream] = task

    async def send_to_node(self, node_id: str, envelopes: Sequence[Envelope]) -> None:
        """XADD the batch to the node's inbox, atomically with checking that the node is
        alive. Raises LookupError for a dead or unknown node, BusUnavailable when Redis
        cannot take it (nothing was handed off then... or, if the reply was lost, the
        entry may still arrive: receivers drop duplicate ids)."""
        if not envelopes:
            return
        entry = await self._call(
            "send_to_node",
            self._send_script(
                keys=[self._alive_key(node_id), self._inbox_key(node_id)],
                args=[_encode(envelopes)],
            ),
        )
        if entry is None:
            raise LookupError(f"node {node_id} is not alive")

    async def claim_inbox(self, node_id: str, handler: InboxHandler, consumer: str = "") -> int:
        """Take over a dead node's inbox: every entry in it (pending with its dead
        consumer, or never read) goes to ``handler`` and is acked once it returns; the
        emptied inbox is dropped. Returns how many envelopes were handled; 0 and nothing
        touched when the node is alive. Raises BusUnavailable, or what handler raised
        (the entries it was given stay in the inbox)."""
        r = self._r()
        if await self._call("claim_inbox", r.exists(self._alive_key(node_id))):
            return 0
        stream = self._inbox_key(node_id)
        consumer = consumer or f"claim:{node_id}"
        if not await self._call("claim_inbox", r.exists(stream)):
            await self._forget(node_id)
            return 0
        await self._ensure_group(stream)
        handled = await self._autoclaim(stream, consumer, handler, min_idle_ms=0, raise_=True)
        while True:
            resp = await self._call(
                "claim_inbox",
                r.xreadgroup(GROUP, consumer, {stream: ">"}, count=self._batch),
            )
            entries = _entries(resp)
            if not entries:
                break
            handled += await self._deliver(stream, entries, handler, raise_=True)
        await self._forget(node_id)
        return handled

    async def _forget(self, node_id: str) -> None:
        dropped = await self._call(
            "claim_inbox",
            self._drop_inbox_script(keys=[self._alive_key(node_id), self._inbox_key(node_id)]),
        )
        r = self._r()
        if dropped or not await self._call("claim_inbox", r.exists(self._inbox_key(node_id))):
            await self._call("claim_inbox", r.hdel(self._nodes_key(), node_id))

    async def _ensure_group(self, stream: str) -> None:
        try:
            # From "0": entries added before the group existed are delivered too.
            await self._r().xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BusUnavailable(f"Redis bus (inbox group): {exc}") from exc
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"Redis bus (inbox group): {exc}") from exc

    async def _inbox_loop(
        self, stream: str, consumer: str, label: str, handler: InboxHandler
    ) -> None:
        """Read entries and hand each read's batch to ``handler`` in a task of its own
        (at most ``_DELIVERING`` at once), so a handler that waits for devices' acks does
        not hold up the next read. Each task starts in read order, and handlers do
        their ordering-relevant work before their first await."""
        outage = _Outage(label, self._backoff_max)
        setup = True
        next_claim = 0.0
        slots = asyncio.Semaphore(_DELIVERING)
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._closing:
                try:
                    if setup:
                        await self._ensure_group(stream)
                        await self._drain_own_pending(stream, consumer, handler)
                        setup = False
                    if time.monotonic() >= next_claim:
                        next_claim = time.monotonic() + max(0.1, self._claim_idle_ms / 2000)
                        await self._autoclaim(stream, consumer, handler, self._claim_idle_ms)
                    await slots.acquire()
                    try:
                        resp = await self._r().xreadgroup(
                            GROUP, consumer, {stream: ">"}, count=self._batch, block=self._block_ms
                        )
                    except BaseException:
                        slots.release()
                        raise
                    outage.ok()
                    entries = _entries(resp)
                    if not entries:
                        slots.release()
                        continue
                    task = asyncio.get_running_loop().create_task(
                        self._deliver_in_slot(stream, entries, handler, slots)
                    )
                    running.add(task)
                    task.add_done_callback(running.discard)
                except asyncio.CancelledError:
                    raise
                except (BusUnavailable, RedisError, OSError) as exc:
                    if self._closing:
                        return
                    setup = True
                    cause = exc.__cause__ if isinstance(exc, BusUnavailable) else exc
                    if isinstance(cause, ResponseError) and "NOGROUP" in str(cause):
                        # Redis lost the stream (restarted without its data): recreate it.
                        log.warning("%s: consumer group gone; recreating it", label)
                    elif cause is None or _is_outage(cause):
                        await outage.failed(exc)
                    else:
                        log.error("%s: %s", label, exc)
                        await asyncio.sleep(self._backoff_max)
        finally:
            await cancel_and_wait(list(running), log, "Redis bus")

    async def _deliver_in_slot(
        self,
        stream: str,
        entries: list[tuple[bytes, dict[bytes, bytes] | None]],
        handler: InboxHandler,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            await self._deliver(stream, entries, handler)
        except BusUnavailable as exc:
            # Not acked: the entries stay pending and are taken over after claim_idle.
            log.warning("%s: could not ack delivered entries (%s); they come again", stream, exc)
        finally:
            slots.release()

    async def _drain_own_pending(self, stream: str, consumer: str, handler: InboxHandler) -> None:
        """Entries this consumer read before and never acked (a restart of this node)."""
        start = "0"
        while True:
            resp = await self._r().xreadgroup(GROUP, consumer, {stream: start}, count=self._batch)
            entries = _entries(resp)
            if not entries:
                return
            await self._deliver(stream, entries, handler)
            start = entries[-1][0]

    async def _autoclaim(
        self,
        stream: str,
        consumer: str,
        handler: InboxHandler,
        min_idle_ms: int,
        raise_: bool = False,
    ) -> int:
        """Take over entries pending longer than ``min_idle_ms`` with any consumer (a
        dead one, or this one when its handler failed) and deliver them."""
        r = self._r()
        cursor: Any = "0-0"
        handled = 0
        while True:
            resp = await self._call(
                "autoclaim",
                r.xautoclaim(
                    stream, GROUP, consumer, min_idle_ms, start_id=cursor, count=self._batch
                ),
            )
            cursor, entries = resp[0], list(resp[1])
            if entries:
                handled += await self._deliver(stream, entries, handler, raise_=raise_)
            if cursor in (b"0-0", "0-0"):
                return handled

    async def _deliver(
        self,
        stream: str,
        entries: list[tuple[bytes, dict[bytes, bytes] | None]],
        handler: InboxHandler,
        raise_: bool = False,
    ) -> int:
        """Hand the entries' envelopes to ``handler`` in one call; ack (and delete) the
        entries once it returned. Returns how many envelopes were handled."""
        envelopes: list[Envelope] = []
        ids: list[bytes] = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:
                continue  # deleted while pending: nothing to deliver
            try:
                envelopes.extend(_decode(fields[_FIELD]))
            except (KeyError, TypeError, ValueError):
                log.error("inbox %s: dropping unreadable entry %r: %r", stream, entry_id, fields)
        if envelopes:
            try:
                await handler(envelopes)
            except asyncio.CancelledError:
                raise
            except Exception:
                if raise_:
                    raise
                log.exception(
                    "inbox %s: handler failed on %d envelopes; they stay pending and are"
                    " retried after %.0f s",
                    stream,
                    len(envelopes),
                    self._claim_idle_ms / 1000,
                )
                return 0
        if ids:
            pipe = self._r().pipeline(transaction=True)
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            await self._call("ack", pipe.execute())
        return len(envelopes)

    # -- registry-change events --------------------------------------------------
    async def publish_event(self, event: dict[str, Any]) -> None:
        """Tell every node about a registry change, e.g. ``{"kind": "revoke",
        "device": "d1"}``. Pub/sub is fire-and-forget: a node that was away re-reads
        the registry (the store's ``on_registry_change`` poll) rather than rely on it."""
        await self._call(
            "publish_event", self._r().publish(self._events_channel(), orjson.dumps(event))
        )

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback`` (on the event loop) with every event published by any node,
        this one included."""
        self._event_callbacks.append(callback)
        if self._redis is not None:
            self._start_events()

    def _start_events(self) -> None:
        if self._events_task is None or self._events_task.done():
            self._events_task = asyncio.get_running_loop().create_task(
                self._events_loop(), name="redis-bus-events"
            )

    async def _events_loop(self) -> None:
        outage = _Outage("registry events", self._backoff_max)
        while not self._closing:
            pubsub = self._r().pubsub()
            try:
                await pubsub.subscribe(self._events_channel())
                outage.ok()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self._block_ms / 1000
                    )
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        event = orjson.loads(message["data"])
                    except orjson.JSONDecodeError:
                        log.warning("registry events: unreadable %r", message["data"][:200])
                        continue
                    for callback in list(self._event_callbacks):
                        try:
                            callback(event)
                        except Exception:
                            log.exception("event callback %r failed", callback)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                await outage.failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
