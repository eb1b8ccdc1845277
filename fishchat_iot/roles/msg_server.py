"""The msg_server role: holds device sessions (login, keepalive, replacement) and carries
out what devices ask — send p2p and topic messages, ack deliveries, manage topics — on
top of the router and the manager. Transport-independent: adapters call these methods
with decoded commands and implement ``Session``'s ``emit_*``.

Delivery guarantee (DESIGN section 2): a message is ACCEPTED only once it was written
to the recipient's live session or durably stored; a delivered message stays in the
session's in-flight table until acked, and goes back to the durable queue if the session
ends first. Per sender->receiver order holds because a recipient with anything on its
way to its durable queue is fed only from that queue (``Mode.BACKLOG``) until the
queue is empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fishchat_iot import errors
from fishchat_iot.auth import token_matches
from fishchat_iot.backends import open_with_retry
from fishchat_iot.bus.base import Bus, BusUnavailable, NodeInfo
from fishchat_iot.config import Settings
from fishchat_iot.core.batcher import Batcher
from fishchat_iot.core.envelope import KIND_P2P, KIND_POKE, KIND_TOPIC, Envelope
from fishchat_iot.core.receipt import AckWait, Receipt
from fishchat_iot.core.session import LIVE, NO_INFLIGHT, Mode, Session
from fishchat_iot.core.tasks import cancel_and_wait, spawn_owned
from fishchat_iot.crypto.gateway import ENC_PSK, PskKeys, open_from_device
from fishchat_iot.crypto.seal import CryptoError
from fishchat_iot.ids import IdGenerator, OrderKeys
from fishchat_iot.roles.manager import Manager, now_ms
from fishchat_iot.roles.monitor_metrics import Histogram
from fishchat_iot.roles.router import ROUTER_ROLE, Router
from fishchat_iot.stores.base import (
    AlreadyExists,
    Enqueued,
    NotFound,
    StoreUnavailable,
    TopicRecord,
)

log = logging.getLogger("fishchat.msg_server")

MAX_ID_LEN = 64
MAX_NAME_LEN = 128
DRAIN_BATCH = 256


class Offer(enum.Enum):
    LIVE = "live"  # written to the recipient's session
    DUPLICATE = "duplicate"  # the same message is already in flight to it
    CONFLICT = "conflict"  # another sender's message with this id is in flight to it


_OFFER_LIVE = Offer.LIVE  # the hot path compares with a global, not a class attribute


class _Hold:
    """What arrives for one recipient while it catches up or is a window behind
    (``MsgServer._hold``): the messages with their receipts, the senders on this node
    held back meanwhile, and the timer that stores it all after ``hold_wait``."""

    __slots__ = ("items", "senders", "timer")

    def __init__(self) -> None:
        self.items: list[tuple[Envelope, Receipt | None, bool]] = []
        self.senders: list[Session] = []
        self.timer: asyncio.TimerHandle | None = None


class MsgServer:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        manager: Manager,
        router: Router,
        node_id: str,
        address: str,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.manager = manager
        self.router = router
        router.node = self
        self.node_id = node_id
        self.address = address  # host:port devices connect to
        self.tls_address = ""  # host:port of the TLS listener, when there is one
        self.sessions: dict[str, Session] = {}
        self.started_ms = now_ms()
        self.msgs_in = 0
        self.msgs_out = 0
        # For the monitor (roles/monitor.py): messages stored in offline queues, sends
        # refused by error code, refused logins, topic messages, delivery latency (ms).
        self.msgs_queued = 0
        self.dropped: dict[str, int] = {}
        self.auth_failures = 0
        self.topic_msgs: dict[str, int] = {}
        self.latency = Histogram()
        self.on_login_refused: list[Callable[[Session, str, str, str], None]] = []
        self.ids = IdGenerator()
        self.okeys = OrderKeys()
        self.window = settings.delivery.inflight_window
        # Per recipient: store hand-offs under way, and a counter of all ever started.
        # Per recipient: order key -> how many hand-offs with that key are under way.
        self._pending: dict[str, dict[int, int]] = {}
        self._arrivals: dict[str, int] = {}
        self._settled: dict[str, asyncio.Event] = {}
        self._dirty: list[Session] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when the latest hand-off has passed its registry check (see _hand_off).
        self._handoff_gate: asyncio.Future[None] | None = None
        # delivery.receipt = "acked": live deliveries whose ack a receipt waits for,
        # by (recipient, id), oldest first.
        self.receipt_after_ack = settings.delivery.receipt == "acked"
        self._ack_waits: dict[tuple[str, str], AckWait] = {}
        # Devices whose queue got something behind their feed's position (a poke).
        self._reread: set[str] = set()
        # Per device: ids acked whose queued copies the store has not deleted yet.
        self._acking: dict[str, collections.Counter[str]] = {}
        # Per device catching up (its feed has read everything below the hand-offs still
        # under way): messages arriving for it meanwhile, held here instead of going to
        # the store, with their receipts and whether they were accepted before.
        self._held: dict[str, _Hold] = {}
        # Sessions whose reading is paused for too many pending receipts.
        self._receipts_paused: set[Session] = set()
        # Group commit of hand-offs (per kind of routing) and of acks of stored copies.
        self._routing: dict[tuple[bool, bool], Batcher[Envelope, Enqueued]] = {}
        self._acks: Batcher[tuple[str, str], None] = Batcher(
            self._ack_batch, lambda coro: self.spawn(coro, "hand-off-acks")
        )
        manager.on_revoked.append(self.revoked)
        manager.on_rotated.append(self.rotated)
        self.psk = PskKeys(manager)  # gateway-terminated devices (crypto/gateway.py)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await open_with_retry(
            lambda: self.bus.attach_inbox(self.node_id, self.deliver_from_bus),
            f"the inbox of {self.node_id}",
        )
        self.bus.on_presence_restored(self._presence_restored)
        try:
            await self.heartbeat()
            self.router.routers_alive = bool(await self.bus.live_nodes(ROUTER_ROLE))
        except BusUnavailable as exc:  # the watchdog beats again every 2 s
            log.warning("node heartbeat failed: %s", exc)
        self.spawn(self._watchdog(), "watchdog")

    async def stop(self) -> None:
        """Close every session (their in-flight messages go back to the durable queue)
        and wait for every write the node started."""
        for s in list(self.sessions.values()):
            s.drop(errors.UNAVAILABLE, "server shutting down")
            self.session_closed(s)
        self._flush()
        for task in list(self._tasks):
            if task.get_name().startswith(("hand-off", "send")):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), 10)
        await cancel_and_wait(self._tasks, log, f"msg_server {self.node_id}")
        with contextlib.suppress(Exception):
            await self.bus.remove_node(self.node_id)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return spawn_owned(self._tasks, coro, name, log)

    def node_info(self) -> NodeInfo:
        # stats: for the cluster monitor, once attach_cluster_reporting was called.
        from fishchat_iot.roles.monitor_cluster import cluster_stats

        return NodeInfo(
            node_id=self.node_id,
            role="msg_server",
            address=self.address,
            started_ms=self.started_ms,
            sessions=len(self.sessions),
            msgs_in=self.msgs_in,
            msgs_out=self.msgs_out,
            stats=cluster_stats(self),
            tls_address=self.tls_address,
        )

    async def heartbeat(self) -> None:
        await self.bus.heartbeat(self.node_info())

    async def _watchdog(self) -> None:
        """Close sessions silent for longer than the keepalive, and refresh this node's
        entry in the node registry."""
        keepalive = self.settings.tcp.keepalive
        period = max(0.05, min(1.0, keepalive / 4))
        last_beat = 0.0
        bus_down = False
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            # A session may bring its own limit (MQTT: 1.5 x the keepalive of its CONNECT).
            silent = [
                s
                for s in self.sessions.values()
                if now - s.last_seen > (s.idle_timeout or keepalive)
            ]
            for s in silent:
                limit = s.idle_timeout or keepalive
                log.info("session %s silent for %.0f s: closing", s.device_id, now - s.last_seen)
                s.drop(errors.KEEPALIVE_TIMEOUT, f"no traffic for {limit:g} s")
                self.session_closed(s)
            if self._ack_waits:
                self._store_unacked(now - self.settings.delivery.ack_wait)
            if now - last_beat >= 2.0:
                last_beat = now
                try:
                    await self.heartbeat()
                    self.router.routers_alive = bool(await self.bus.live_nodes(ROUTER_ROLE))
                except Exception as exc:
                    if not bus_down:
                        log.warning("node heartbeat failed: %s", exc)
                    bus_down = True
                    continue
                if bus_down:
                    bus_down = False
                    log.warning("node heartbeat: the bus is reachable again")
                    self.spawn(self._reread_queued(), "after-outage")

    def _presence_restored(self, devices: list[str]) -> None:
        """Their presence had expired while they were connected here: others may have
        queued messages for them meanwhile (and could not poke a node they did not
        see): read their queues again."""
        for device_id in devices:
            if device_id in self.sessions:
                self.poked(device_id)

    async def _reread_queued(self) -> None:
        """After a bus outage: messages for devices held here may have gone to their
        offline queues meanwhile (this node looked dead to its peers, and pokes could
        not reach it): feed every session with a non-empty queue from it again."""
        try:
            depths = await self.manager.store.queue_depths()
        except StoreUnavailable as exc:
            log.warning("cannot look for queued messages after the outage: %s", exc)
            return
        for device_id, depth in depths.items():
            if depth and device_id in self.sessions:
                self.poked(device_id)

    # -- output batching -----------------------------------------------------------
    def schedule_flush(self, s: Session) -> None:
        """Called by ``Session.mark_dirty``: every session written to during this turn of
        the event loop gets exactly one transport write at its end."""
        self._dirty.append(s)
        if self._flush_handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for s in dirty:
            s.dirty = False
            if s.out:
                s.write_out()

    # -- sessions ------------------------------------------------------------------
    async def login(
        self, s: Session, device_id: str, token: str | None, cert: bool = False
    ) -> tuple[str, str] | None:
        """Authenticate and register the session. Returns None, or (error code, text).
        ``cert``: the transport verified a client certificate whose CN is ``device_id``
        (a token session without a token; docs/security.md)."""
        refused = await self._login(s, device_id, token, cert)
        if refused is not None:
            self.auth_failures += 1
            for callback in self.on_login_refused:
                callback(s, device_id, *refused)
        return refused

    async def _login(
        self, s: Session, device_id: str, token: str | None, cert: bool
    ) -> tuple[str, str] | None:
        try:
            rec = await self.manager.device(device_id, remember=False)
        except StoreUnavailable:
            return errors.UNAVAILABLE, "registry unavailable, retry later"
        if rec is None:
            return errors.AUTH_FAILED, f"unknown device {device_id!r} or wrong token"
        if cert:
            pass
        elif token is None:
            if not self.settings.tcp.allow_v1 or not rec.v1:
                return errors.V1_NOT_ALLOWED, f"device {device_id!r} must log in with a token"
        elif not token_matches(token, rec.token_hash):
            return errors.AUTH_FAILED, f"unknown device {device_id!r} or wrong token"
        if rec.revoked:
            return errors.REVOKED, f"device {device_id!r} is revoked"
        old = self.sessions.get(device_id)
        if old is not None:
            log.info("device %s logged in again: replacing its previous session", device_id)
            old.drop(errors.SESSION_REPLACED, "this device logged in on another connection")
            self.session_closed(old)
        s.device_id = device_id
        s.v1 = token is None and not cert
        if not rec.psk:
            s.psk = None  # no pre-shared key to look up before its first delivery
        s.node = self
        s.mode = Mode.BACKLOG  # fed from its durable queue until that is empty
        s.last_seen = time.monotonic()
        s.logged_in_ms = now_ms()
        self.sessions[device_id] = s
        try:
            await self.bus.set_presence(device_id, self.node_id)
        except BusUnavailable as exc:
            log.warning("login of %s refused: presence not recorded: %s", device_id, exc)
            if self.sessions.get(device_id) is s:
                del self.sessions[device_id]
            s.mode = Mode.CLOSED
            return errors.UNAVAILABLE, "routing unavailable, retry later"
        if s.mode is not Mode.CLOSED:
            # Whatever arrives from now on is newer than everything queued or on its way
            # to the queue: hold it while the feed catches up, rather than queue it too.
            self._held[device_id] = _Hold()
            self._start_drain(s)
        return None

    def touch(self, s: Session) -> None:
        s.last_seen = time.monotonic()

    def session_closed(self, s: Session) -> None:
        """The session ended (disconnect, logout, replacement, timeout, revocation).
        Idempotent. Unacked live deliveries go back to the durable queue."""
        if s.mode is Mode.CLOSED or s.node is not self:
            return
        s.mode = Mode.CLOSED
        self._receipts_paused.discard(s)
        if s.drain_task is not None:
            s.drain_task.cancel()
            s.drain_task = None
        held: list[tuple[Envelope, Receipt | None, bool]] = []
        if self.sessions.get(s.device_id) is s:
            del self.sessions[s.device_id]
            self.spawn(self.bus.clear_presence(s.device_id, self.node_id), "presence")
            held = self._end_hold(s.device_id)
            self._reread.discard(s.device_id)  # a new session reads from the start anyway
        unstored = [env for env, stored in s.inflight.values() if not stored]
        s.inflight.clear()
        if unstored:
            unstored.sort(key=lambda e: e.okey)
            self._hand_off(unstored, None, accepted=True, holdable=False)
        if held:
            self._spill(held)

    def revoked(self, device_id: str) -> None:
        s = self.sessions.get(device_id)
        if s is not None:
            log.warning("device %s revoked: closing its session", device_id)
            s.drop(errors.REVOKED, f"device {device_id!r} was revoked")
            self.session_closed(s)

    def kick(self, device_id: str) -> bool:
        """An operator closed the device's session (it may log in again)."""
        s = self.sessions.get(device_id)
        if s is None:
            return False
        log.warning("device %s kicked by an operator: closing its session", device_id)
        s.drop(errors.UNAVAILABLE, "session closed by an operator")
        self.session_closed(s)
        return True

    def on_event(self, event: dict[str, Any]) -> None:
        """Registry and operator events from the bus (any process may publish them)."""
        kind, device = event.get("kind"), event.get("device")
        if not isinstance(device, str):
            return
        if kind == "revoke":
            self.manager.invalidate()
            self.revoked(device)
        elif kind == "kick":
            self.kick(device)

    def rotated(self, device_id: str) -> None:
        """``device rotate``: the session logged in with credentials that are void now.
        Not a final error: a device that has its new bundle logs in again."""
        s = self.sessions.get(device_id)
        if s is not None:
            log.warning("device %s has new credentials: closing its session", device_id)
            s.drop(errors.CREDENTIALS_CHANGED, f"the credentials of {device_id!r} were replaced")
            self.session_closed(s)

    # -- sending -------------------------------------------------------------------
    def _offer(self, env: Envelope, now: int = 0) -> Offer | None:
        """Write ``env`` to its recipient's live session on this node, if it has one
        that can take it now; None means it must go through the router. ``now``: the
        caller's wall clock in ms, if it has just read it."""
        r = self.sessions.get(env.to)
        if r is None or r.mode is not LIVE:
            return None
        inflight = r.inflight
        if inflight:
            prev = inflight.get(env.id)
            if prev is not None:
                return Offer.DUPLICATE if prev[0].sender == env.sender else Offer.CONFLICT
        if len(inflight) >= self.window or not r.can_write():
            # Resumes when acks or the socket allow. Until then what arrives is held in
            # memory (``_hold``, up to a window more; its receipts wait): a full window
            # is mostly a moment's lag, and the store path costs ~10x the live one.
            r.mode = Mode.BACKLOG
            if env.to not in self._held:
                self._held[env.to] = _Hold()
            return None
        r.push(env, False)
        self.msgs_out += 1
        self.latency.observe((now or now_ms()) - env.ts)
        return _OFFER_LIVE

    def _check_id(self, s: Session, msg_id: str) -> str | None:
        if not msg_id:
            return self.ids.next()
        if len(msg_id) > MAX_ID_LEN:
            s.emit_error(errors.BAD_ARGS, f"message id longer than {MAX_ID_LEN} characters")
            s.mark_dirty()
            return None
        return msg_id

    def send_p2p(
        self, s: Session, to: str, body: str, msg_id: str = "", enc: str = "none", ts: int = 0
    ) -> asyncio.Task[None] | None:
        """``ts``: the wall clock (ms) the adapter read for this batch of commands; 0 =
        read it here. Returns a task when the body must be opened first (a PSK-sealed
        body): the adapter holds the session's next commands until it is done."""
        mid = msg_id if msg_id and len(msg_id) <= MAX_ID_LEN else self._check_id(s, msg_id)
        if mid is None:
            return None
        if enc == ENC_PSK:
            return self._psk_send(s, KIND_P2P, to, body, mid)
        if not ts:
            ts = now_ms()
        if enc == "none" and self.send_live(s, to, body, mid, ts):
            return None
        env = Envelope(mid, s.device_id, to, body, ts, self.okeys.next(), KIND_P2P)
        if enc != "none":
            env.enc = enc
            r = self.sessions.get(to)
            if r is not None and r.v1:
                # A v1 session is never sent a sealed body (it could not open it).
                s.emit_error(errors.E2E_UNSUPPORTED, f"{to!r} is on a v1 session", mid)
                s.mark_dirty()
                return None
        offer = self._offer(env, ts)
        if offer is _OFFER_LIVE or offer is Offer.DUPLICATE:
            if offer is _OFFER_LIVE:
                self.msgs_in += 1
            if self.receipt_after_ack:
                receipt = self._receipt(s, mid)
                self._wait_for_ack(env, receipt)
                receipt.release()
                return None
            s.emit_accepted(mid)
            if not s.dirty:
                s.mark_dirty()
        elif offer is Offer.CONFLICT:
            self._refuse_duplicate(s, mid, to)
        else:
            receipt = self._receipt(s, mid, p2p=True)
            self._hand_off([env], receipt, accepted=False, check_recipient=True)
            receipt.release()
        return None

    def send_live(self, s: Session, to: str, body: str, mid: str, ts: int) -> bool:
        """The usual send in one step: a plaintext message ``mid`` (a valid id) for a
        device live on this node with room in its window, its receipt at acceptance.
        Writes the delivery and the ``ACCEPTED`` and returns True; returns False having
        done nothing otherwise: ``send_p2p`` then does the rest (duplicates, held
        messages, the queue, the router)."""
        r = self.sessions.get(to)
        if r is None or r.mode is not LIVE or self.receipt_after_ack:
            return False
        inflight = r.inflight
        if inflight and (mid in inflight or len(inflight) >= self.window):
            return False
        if not r.can_write():
            return False
        r.push(Envelope(mid, s.device_id, to, body, ts, self.okeys.next(), KIND_P2P), False)
        self.msgs_in += 1
        self.msgs_out += 1
        self.latency.counts[0] += 1  # stamped with this batch's clock: 0 ms, the first bucket
        s.emit_accepted(mid)
        if not s.dirty:
            s.mark_dirty()
        return True

    def _psk_send(self, s: Session, kind: str, to: str, body: str, mid: str) -> asyncio.Task[None]:
        """A body sealed under the sender's pre-shared key (gateway-terminated device,
        docs/crypto.md section 7): open it, then send the plaintext like any other (it
        is sealed at rest if it is queued). A body that does not open is refused with
        BAD_SEAL and goes nowhere."""
        self._begin_receipt(s)
        return self.spawn(self._psk_open_and_send(s, kind, to, body, mid), "send-psk")

    async def _psk_open_and_send(self, s: Session, kind: str, to: str, body: str, mid: str) -> None:
        try:
            key = await self.psk.load(s)
        except StoreUnavailable:
            s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", mid)
            s.mark_dirty()
            return
        except CryptoError as exc:
            log.error("cannot use the pre-shared key of %s: %s", s.device_id, exc)
            s.emit_error(errors.UNAVAILABLE, "the gateway cannot use this device's key", mid)
            s.mark_dirty()
            return
        finally:
            self._end_receipt(s)
        if s.mode is Mode.CLOSED:
            return  # not accepted: the device sends it again in its next session
        if key is None:
            s.emit_error(
                errors.E2E_UNSUPPORTED,
                f"device {s.device_id!r} has no pre-shared key (registered without --psk)",
                mid,
            )
            s.mark_dirty()
            return
        try:
            text = open_from_device(key, s.device_id, to, kind, mid, body)
        except CryptoError as exc:
            log.warning("PSK-sealed message %s from %s does not open: %s", mid, s.device_id, exc)
            s.emit_error(
                errors.BAD_SEAL,
                f"the body does not open under this device's pre-shared key ({exc}): not accepted",
                mid,
            )
            s.mark_dirty()
            return
        if kind == KIND_P2P:
            self.send_p2p(s, to, text, mid)
        else:
            task = self.send_topic(s, to, text, mid)
            if task is not None:
                await task

    def send_topic(
        self, s: Session, name: str, body: str, msg_id: str = "", enc: str = "none"
    ) -> asyncio.Task[None] | None:
        """Returns the task when the topic must be looked up first: the adapter holds
        the session's next commands until it is done (per-pair order)."""
        mid = self._check_id(s, msg_id)
        if mid is None:
            return None
        if enc == ENC_PSK:
            return self._psk_send(s, KIND_TOPIC, name, body, mid)
        topic = self.manager.cached_topic(name)
        if topic is False:  # not cached: look it up first
            self._begin_receipt(s)
            return self.spawn(self._send_topic_uncached(s, name, body, mid, enc), "send-topic")
        self._send_topic_to(s, name, body, mid, topic, enc)
        return None

    async def _send_topic_uncached(
        self, s: Session, name: str, body: str, mid: str, enc: str = "none"
    ) -> None:
        try:
            topic = await self.manager.topic(name)
        except StoreUnavailable:
            s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", mid)
            s.mark_dirty()
            return
        finally:
            self._end_receipt(s)
        self._send_topic_to(s, name, body, mid, topic, enc)

    def _send_topic_to(
        self,
        s: Session,
        name: str,
        body: str,
        mid: str,
        topic: TopicRecord | None,
        enc: str = "none",
    ) -> None:
        if topic is None:
            s.emit_error(errors.UNKNOWN_TOPIC, f"no topic {name!r}", mid)
            s.mark_dirty()
            return
        if s.device_id not in topic.members:
            s.emit_error(errors.NOT_A_MEMBER, f"not a member of topic {name!r}", mid)
            s.mark_dirty()
            return
        ts = now_ms()
        slow: list[Envelope] = []  # members held here, not live now
        elsewhere: list[Envelope] = []  # members not held here: the routers' job
        waits: list[Envelope] = []
        conflict = ""
        sessions = self.sessions
        for member in topic.members:
            if member == s.device_id:
                continue
            env = Envelope(
                mid, s.device_id, member, body, ts, self.okeys.next(), KIND_TOPIC, name, enc
            )
            if member not in sessions:
                elsewhere.append(env)
                continue
            offer = self._offer(env)
            if offer is None:
                slow.append(env)
            elif offer is Offer.CONFLICT:
                conflict = member
            elif self.receipt_after_ack:
                waits.append(env)
        self.msgs_in += 1
        self.topic_msgs[name] = self.topic_msgs.get(name, 0) + 1
        if conflict:
            self._refuse_duplicate(s, mid, conflict)
            return
        if not (slow or elsewhere or waits):
            s.emit_accepted(mid)
            s.mark_dirty()
            return
        receipt = self._receipt(s, mid)
        for env in waits:
            self._wait_for_ack(env, receipt)
        if slow:
            self._hand_off(slow, receipt, accepted=False)
        if elsewhere:
            self._hand_off(elsewhere, receipt, accepted=False, via_router=True)
        receipt.release()

    def _refuse_duplicate(self, s: Session, mid: str, to: str) -> None:
        s.emit_error(
            errors.DUPLICATE_ID,
            f"another sender's message {mid!r} is pending for {to!r}: use a new id",
            mid,
        )
        s.mark_dirty()

    def _receipt(self, s: Session, mid: str, p2p: bool = False) -> Receipt:
        """The receipt of message ``mid`` from ``s``: ACCEPTED (or the first error)
        once everything it holds is done. Counts towards the session's pending
        receipts (reading pauses when too many wait)."""
        self._begin_receipt(s)

        def done(code: str, text: str) -> None:
            self._end_receipt(s)
            if code:
                s.emit_error(code, text, mid)
            else:
                s.emit_accepted(mid)
                if p2p:
                    self.msgs_in += 1
            s.mark_dirty()

        return Receipt(done)

    def _wait_for_ack(self, env: Envelope, receipt: Receipt) -> None:
        """``receipt`` waits for the recipient to ack this live delivery (when the
        session keeps it in flight: v1 topic deliveries count as delivered once
        written), or for it to be stored (session ends, or ``ack_wait`` passes)."""
        r = self.sessions.get(env.to)
        if r is None or env.id not in r.inflight:
            return
        key = (env.to, env.id)
        wait = self._ack_waits.get(key)
        if wait is None:
            self._ack_waits[key] = AckWait(receipt, time.monotonic())
        else:
            wait.receipts.append(receipt)
        receipt.hold()

    def _ack_arrived(self, device_id: str, mid: str) -> None:
        wait = self._ack_waits.pop((device_id, mid), None)
        if wait is not None:
            wait.release()

    def _store_unacked(self, older_than: float) -> None:
        """Live deliveries waited on for longer than ``ack_wait``: store them (they stay
        in flight, now marked stored), so their receipts do not wait on a slow device."""
        expired: list[tuple[str, str]] = []
        for key, wait in self._ack_waits.items():
            if wait.since > older_than:
                break  # oldest first
            expired.append(key)
        envs: list[Envelope] = []
        for key in expired:
            device_id, mid = key
            r = self.sessions.get(device_id)
            entry = r.inflight.get(mid) if r is not None else None
            if r is not None and entry is not None and not entry[1]:
                r.inflight[mid] = (entry[0], True)
                envs.append(entry[0])
            else:
                self._ack_arrived(device_id, mid)  # no longer in flight here
        if envs:
            envs.sort(key=lambda e: e.okey)
            self._hand_off(envs, None, accepted=True, holdable=False)

    def _begin_receipt(self, s: Session) -> None:
        s.pending_receipts += 1
        if (
            s.pending_receipts >= self.settings.delivery.max_pending_receipts
            and s not in self._receipts_paused
        ):
            self._receipts_paused.add(s)
            s.pause_input()

    def _end_receipt(self, s: Session) -> None:
        s.pending_receipts -= 1
        if (
            s.pending_receipts <= self.settings.delivery.max_pending_receipts // 2
            and s in self._receipts_paused
        ):
            # Only a session paused above: one that reached half the bound on its way
            # up was never paused (it used to be resumed here all the same, and its
            # pause count went below zero: later pauses did not pause it).
            self._receipts_paused.discard(s)
            s.resume_input()

    def _hand_off(
        self,
        envs: list[Envelope],
        receipt: Receipt | None,
        accepted: bool,
        check_recipient: bool = False,
        via_router: bool = False,
        holdable: bool = True,
    ) -> None:
        """Start the durable hand-off of messages no live session took. Counted per
        recipient *now*, before any await, so a recipient logging in meanwhile waits
        for it before going live (that is what keeps per-pair order). Messages for a
        recipient catching up are held for it instead (``holdable``: they may be)."""
        if self._held and holdable:
            envs = self._hold(envs, receipt, accepted)
            if not envs:
                return
        for env in envs:
            keys = self._pending.setdefault(env.to, {})
            keys[env.okey] = keys.get(env.okey, 0) + 1
            self._arrivals[env.to] = self._arrivals.get(env.to, 0) + 1
        if receipt is not None:
            receipt.hold()
        # Hand-offs reach the store in the order they were started (order-key order), so
        # the queue bound or a crash cuts a sender's stream at one point: never a later
        # message stored and an earlier one refused or lost (then resent after it). Only
        # a registry look-up (recipient not cached) makes a hand-off wait before it
        # submits; each hand-off lets the next one go once it is past that point.
        prev, gate = self._handoff_gate, asyncio.get_running_loop().create_future()
        self._handoff_gate = gate
        self.spawn(
            self._hand_off_task(envs, receipt, accepted, check_recipient, via_router, prev, gate),
            "hand-off",
        )

    def _hold(
        self, envs: list[Envelope], receipt: Receipt | None, accepted: bool
    ) -> list[Envelope]:
        """Hold the messages whose recipient is catching up or a window behind; return
        the others. A full hold (``inflight_window`` messages), or one whose first
        message has waited ``delivery.hold_wait``, goes to the store, in order, and its
        recipient is fed from there."""
        rest: list[Envelope] = []
        for env in envs:
            hold = self._held.get(env.to)
            if hold is not None and len(hold.items) >= self.window:
                self._spill(self._end_hold(env.to))
                hold = None
            if hold is None:
                rest.append(env)
                continue
            if receipt is not None:
                receipt.hold()
            if hold.timer is None:
                hold.timer = asyncio.get_running_loop().call_later(
                    self.settings.delivery.hold_wait, self._hold_expired, env.to, hold
                )
            hold.items.append((env, receipt, accepted))
            sender = self.sessions.get(env.sender)
            if sender is not None and sender.mode is LIVE and not sender.inflight:
                # Read no more from it until the recipient catches up: a sender faster
                # than its recipient waits (at most hold_wait) instead of sending the
                # rest of its stream through the store. Not a sender with deliveries of
                # its own to ack: its acks come on the same connection.
                if sender not in hold.senders:
                    hold.senders.append(sender)
                    sender.pause_input()
        return rest

    def _end_hold(self, device_id: str) -> list[tuple[Envelope, Receipt | None, bool]]:
        """Forget the device's hold and read again from the senders it held back; what
        it held (nothing when there was no hold)."""
        hold = self._held.pop(device_id, None)
        if hold is None:
            return []
        if hold.timer is not None:
            hold.timer.cancel()
        for sender in hold.senders:
            sender.resume_input()
        return hold.items

    def _hold_expired(self, device_id: str, hold: _Hold) -> None:
        """The first message of this hold has waited ``delivery.hold_wait``: the recipient
        is not acking (or not reading). Store what is held; its senders get their receipts."""
        if self._held.get(device_id) is hold:
            self._spill(self._end_hold(device_id))

    def _spill(self, held: list[tuple[Envelope, Receipt | None, bool]]) -> None:
        """Held messages to the store after all (their recipient left, or too many)."""
        for env, receipt, accepted in held:
            self._hand_off([env], receipt, accepted, holdable=False)
            if receipt is not None:
                receipt.release()

    def _go_live(self, s: Session) -> None:
        """The feed has caught up: write what was held for the session, in the order
        it came, and deliver live from now on."""
        s.mode = LIVE
        self._arrivals.pop(s.device_id, None)
        held = self._end_hold(s.device_id)
        if not held:
            return
        now = now_ms()
        for env, receipt, _accepted in held:
            s.push(env, False)
            self.msgs_out += 1
            self.latency.observe(now - env.ts)
            if receipt is not None:
                if self.receipt_after_ack:
                    self._wait_for_ack(env, receipt)
                receipt.release()

    async def _hand_off_task(
        self,
        envs: list[Envelope],
        receipt: Receipt | None,
        accepted: bool,
        check_recipient: bool,
        via_router: bool,
        prev: asyncio.Future[None] | None,
        gate: asyncio.Future[None],
    ) -> None:
        code, text = "", ""
        try:
            try:
                if prev is not None and not prev.done():
                    await asyncio.shield(prev)
                if check_recipient:
                    rec = await self.manager.device(envs[0].to)
                    if rec is None:
                        code, text = errors.UNKNOWN_DEVICE, f"no device {envs[0].to!r}"
                    elif rec.revoked:
                        code, text = errors.UNKNOWN_DEVICE, f"device {envs[0].to!r} is revoked"
            finally:
                # The store call below is submitted before the next hand-off resumes.
                if not gate.done():
                    gate.set_result(None)
                if self._handoff_gate is gate:
                    self._handoff_gate = None
            if not code:
                results = await self._route_with_retry(envs, accepted, via_router)
                for env, r in zip(envs, results, strict=True):
                    if r is Enqueued.FULL:
                        code = errors.QUEUE_FULL
                        text = (
                            f"offline queue of {env.to!r} is full "
                            f"({self.settings.delivery.offline_max} messages): retry later"
                        )
                    elif r is Enqueued.CONFLICT:
                        code = errors.DUPLICATE_ID
                        text = f"another sender's message {env.id!r} is queued for {env.to!r}"
        except StoreUnavailable as exc:
            code, text = errors.UNAVAILABLE, f"store unavailable ({exc}): retry later"
        finally:
            for env in envs:
                self._settle(env.to, env.okey)
        if code:
            self.dropped[code] = self.dropped.get(code, 0) + 1
        else:
            self.msgs_queued += len(envs)
            for env in envs:
                holder = self.sessions.get(env.to)
                if holder is not None and env.okey <= holder.cursor:
                    # Stored behind the feed's position (its order key is older than what
                    # the feed read: a message accepted long ago, e.g. taken over from a
                    # dead node's inbox): read the queue again from the start.
                    self.poked(env.to)
            if self._ack_waits:
                for env in envs:  # durable now: receipts waiting for their acks are done
                    self._ack_arrived(env.to, env.id)
        if receipt is not None:
            receipt.release(code, text)

    async def _route_with_retry(
        self, envs: list[Envelope], accepted: bool, via_router: bool = False
    ) -> list[Enqueued]:
        """Messages being sent may fail back to their sender (it retries); messages
        accepted before have nobody to fail to, so they are retried until stored."""
        delay = 0.05
        while True:
            try:
                return list(await self._route_batcher(accepted, via_router).submit(envs))
            except StoreUnavailable:
                if not accepted:
                    raise
                log.error("store unavailable: %d accepted messages waiting to be stored", len(envs))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _route_batcher(self, accepted: bool, via_router: bool) -> Batcher[Envelope, Enqueued]:
        key = (accepted, via_router)
        batcher = self._routing.get(key)
        if batcher is None:

            async def run(envs: list[Envelope]) -> list[Enqueued]:
                return await self.router.route_elsewhere(envs, accepted, via_router)

            batcher = Batcher(run, lambda coro: self.spawn(coro, "hand-off-batch"))
            self._routing[key] = batcher
        return batcher

    def _settle(self, device_id: str, okey: int) -> None:
        keys = self._pending[device_id]
        n = keys[okey] - 1
        if n:
            keys[okey] = n
        else:
            del keys[okey]
        # Wake the feed of this recipient at every settled hand-off, not only the last:
        # under a steady stream there may never be a moment with none under way.
        ev = self._settled.pop(device_id, None)
        if ev is not None:
            ev.set()
        if keys:
            return
        del self._pending[device_id]
        if self.sessions.get(device_id) is None:
            self._arrivals.pop(device_id, None)

    async def deliver_from_bus(self, envs: Sequence[Envelope]) -> None:
        """Messages routed here by another node: live if possible, else queued. With
        ``receipt = "acked"`` this returns (and the bus acks the inbox entry) only once
        each is acked by its device or stored, so a node that dies loses none: its
        inbox entries are taken over (``roles/router_node.py``)."""
        done = asyncio.get_running_loop().create_future() if self.receipt_after_ack else None
        receipt = Receipt(lambda code, text: _resolve(done)) if done is not None else None
        slow: list[Envelope] = []
        for env in envs:
            if env.kind == KIND_POKE:
                self.poked(env.to)
                continue
            offer = self._offer(env)
            if offer is None:
                slow.append(env)
            elif receipt is not None:
                self._wait_for_ack(env, receipt)
        if slow:
            self._hand_off(slow, receipt, accepted=True)
        if receipt is not None and done is not None:
            receipt.release()
            await done

    def poked(self, device_id: str) -> None:
        """Something was stored in the device's queue after its feed read past it (it
        logged in here while the message was on its way to the queue): feed the
        session from its queue again, from the start."""
        s = self.sessions.get(device_id)
        if s is None:
            return
        self._reread.add(device_id)
        self._arrivals[device_id] = self._arrivals.get(device_id, 0) + 1
        if s.mode is Mode.LIVE:
            s.mode = Mode.BACKLOG
        if s.mode is Mode.BACKLOG and s.drain_task is None:
            self._start_drain(s)

    # -- acks and the durable queue feed ---------------------------------------------
    def ack(self, s: Session, ids: Sequence[str]) -> None:
        stored: list[str] | None = None
        pop = s.inflight.pop
        waits = self._ack_waits
        for mid in ids:
            if waits:
                self._ack_arrived(s.device_id, mid)
            entry = pop(mid, None)
            # Unknown ids may be acks of a delivery from an earlier session: the device
            # has the message, so its queued copy can go.
            if entry is None or entry[1]:
                if stored is None:
                    stored = [mid]
                else:
                    stored.append(mid)
        if not s.inflight:
            s.inflight = NO_INFLIGHT  # a dict keeps its table when emptied by pop
        if stored:
            self._delete_stored(s.device_id, stored)
        if s.mode is Mode.BACKLOG and s.drain_task is None:
            self._start_drain(s)

    def _delete_stored(self, device_id: str, ids: list[str]) -> None:
        """Delete the queued copies of delivered messages. Until the store has, a queue
        read may still return them: the feed skips these ids from now on."""
        acking = self._acking.setdefault(device_id, collections.Counter())
        acking.update(ids)
        self.spawn(self._ack_stored(device_id, ids, acking), "ack")

    async def _ack_stored(
        self, device_id: str, ids: list[str], acking: collections.Counter[str]
    ) -> None:
        try:
            await self._acks.submit([(device_id, mid) for mid in ids])
        except StoreUnavailable as exc:
            # Not lost, just delivered again on the next login (devices dedupe).
            log.warning("could not record acks of %s: %s", device_id, exc)
        finally:
            acking.subtract(ids)
            for mid in ids:
                if acking[mid] <= 0:
                    del acking[mid]
            if not acking and self._acking.get(device_id) is acking:
                del self._acking[device_id]

    async def _ack_batch(self, acks: list[tuple[str, str]]) -> list[None]:
        """Acks of stored copies from every session since the last call, one store call
        per device, all at once."""
        by_device: dict[str, list[str]] = {}
        for device_id, mid in acks:
            by_device.setdefault(device_id, []).append(mid)
        store = self.manager.store
        await asyncio.gather(*(store.ack(d, ids) for d, ids in by_device.items()))
        return [None] * len(acks)

    def writable_again(self, s: Session) -> None:
        """The transport drained below its low-water mark."""
        if s.mode is Mode.BACKLOG and s.drain_task is None:
            self._start_drain(s)

    def _start_drain(self, s: Session) -> None:
        s.drain_task = self.spawn(self._drain(s), f"drain-{s.device_id}")

    async def _drain(self, s: Session) -> None:
        """Feed a BACKLOG session from its durable queue until the queue is empty and
        nothing is on its way there; then the session goes LIVE."""
        device = s.device_id
        store = self.manager.store
        try:
            # A gateway-terminated device's deliveries are sealed under its PSK by the
            # transport (emit_message): know the key before anything is written to it.
            while s.psk is False and s.mode is Mode.BACKLOG:
                try:
                    await self.psk.load(s)
                except StoreUnavailable as exc:
                    log.warning("cannot read the key of %s: %s; retrying", device, exc)
                    await asyncio.sleep(0.5)
                except CryptoError as exc:
                    log.error("cannot use the pre-shared key of %s: %s", device, exc)
                    s.drop(errors.UNAVAILABLE, "the gateway cannot use this device's key")
                    self.session_closed(s)
                    return
            while s.mode is Mode.BACKLOG:
                room = self.window - len(s.inflight)
                if room <= 0 or not s.can_write():
                    return  # resumed by ack() or writable_again()
                # Every hand-off with an order key below the lowest one still under way
                # has reached the store before this read starts, so the queue below that
                # mark has no gaps: feed from it even while the sender keeps streaming.
                under_way = self._pending.get(device)
                mark = min(under_way) if under_way else None
                arrivals = self._arrivals.get(device, 0)
                if device in self._reread:
                    self._reread.discard(device)
                    s.cursor = 0  # entries still in flight are skipped below
                try:
                    fetched = await store.pending(device, s.cursor, min(room, DRAIN_BATCH))
                except StoreUnavailable as exc:
                    log.warning("cannot read the queue of %s: %s; retrying", device, exc)
                    await asyncio.sleep(0.5)
                    continue
                if s.mode is not Mode.BACKLOG:
                    return
                batch = fetched if mark is None else [e for e in fetched if e.okey < mark]
                written: list[str] = []
                acking = self._acking.get(device, ())
                for env in batch:
                    s.cursor = env.okey
                    if env.id in s.inflight or env.id in acking:
                        continue
                    s.push(env, True)
                    self.msgs_out += 1
                    self.latency.observe(now_ms() - env.ts)
                    if s.v1 and (env.kind == KIND_TOPIC or env.enc != "none"):
                        written.append(env.id)
                if written:
                    # v1 cannot ack topic messages (RESP_MESSAGE_TOPIC has no id): they
                    # count as delivered once written, so their queued copies go now,
                    # or they would come again at every login. Sealed (E2E) bodies are
                    # never written to a v1 session (TcpSession.emit_message drops them)
                    # and go the same way.
                    self._delete_stored(device, written)
                if batch:
                    continue
                if device not in self._held:
                    # Caught up below the hand-offs under way: hold what arrives from
                    # now on instead of queueing it behind them (a steady stream would
                    # otherwise keep the session on the store path for good).
                    self._held[device] = _Hold()
                if self._pending.get(device):
                    if mark is not None and mark in self._pending[device]:
                        # Nothing usable until the lowest hand-off settles.
                        ev = self._settled.setdefault(device, asyncio.Event())
                        await ev.wait()
                    continue
                if not fetched and self._arrivals.get(device, 0) == arrivals:
                    self._go_live(s)
                    return
        finally:
            if s.drain_task is asyncio.current_task():
                s.drain_task = None

    # -- end-to-end keys ---------------------------------------------------------------
    async def public_key(self, device_id: str) -> str | None:
        """The registered X25519 public key (base64) of a device, "" when it has none;
        None when it is not registered or revoked. StoreUnavailable propagates."""
        rec = await self.manager.device(device_id)
        if rec is None or rec.revoked:
            return None
        return rec.public_key

    # -- topics ----------------------------------------------------------------------
    async def topic_owner(self, s: Session, name: str) -> str | None:
        """The owner of a topic ``s``'s device is a member of (its SDK takes topic keys
        from the owner only, docs/crypto.md section 5); None after telling it why not."""
        try:
            topic = await self.manager.topic(name)
        except StoreUnavailable:
            s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", name)
            return None
        if topic is None:
            s.emit_error(errors.UNKNOWN_TOPIC, f"no topic {name!r}", name)
        elif s.device_id not in topic.members:
            s.emit_error(errors.NOT_A_MEMBER, f"not a member of topic {name!r}", name)
        else:
            return topic.owner
        return None

    async def create_topic(self, s: Session, name: str) -> None:
        if not valid_name(name):
            s.emit_error(errors.BAD_ARGS, f"invalid topic name {name!r}", name)
        else:
            try:
                await self.manager.create_topic(name, s.device_id)
                s.emit_ok("CREATE_TOPIC", name)
            except AlreadyExists:
                s.emit_error(errors.TOPIC_EXISTS, f"topic {name!r} exists: join it", name)
            except StoreUnavailable:
                s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", name)
        s.mark_dirty()

    async def join_topic(self, s: Session, name: str) -> None:
        try:
            topic = await self.manager.topic(name)
            if topic is None:
                s.emit_error(errors.UNKNOWN_TOPIC, f"no topic {name!r}", name)
            elif s.device_id not in topic.members and not topic.open:
                s.emit_error(
                    errors.FORBIDDEN, f"topic {name!r} is closed: its owner adds members", name
                )
            else:
                if s.device_id not in topic.members:
                    await self.manager.add_member(name, s.device_id)
                s.emit_located(self.address, name)
        except NotFound:
            s.emit_error(errors.UNKNOWN_TOPIC, f"no topic {name!r}", name)
        except StoreUnavailable:
            s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", name)
        s.mark_dirty()

    async def leave_topic(self, s: Session, name: str) -> None:
        try:
            if await self.manager.remove_member(name, s.device_id):
                s.emit_ok("LEAVE_TOPIC", name)
            else:
                s.emit_error(errors.NOT_A_MEMBER, f"not a member of topic {name!r}", name)
        except NotFound:
            s.emit_error(errors.UNKNOWN_TOPIC, f"no topic {name!r}", name)
        except StoreUnavailable:
            s.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", name)
        s.mark_dirty()


def _resolve(done: asyncio.Future[None] | None) -> None:
    if done is not None and not done.done():
        done.set_result(None)


def valid_name(name: str) -> bool:
    """Device ids and topic names end up in MQTT topics: no wildcards, separators or NUL."""
    return 0 < len(name) <= MAX_NAME_LEN and not any(c in name for c in "/+#\0")
