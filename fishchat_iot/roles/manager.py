"""The manager role: the registry (devices, topics, members) in front of the store, with
an in-memory cache the hot path reads, and the housekeeping of the offline queues.

The cache is dropped whenever the store reports a change from another process (the CLI,
another node) and after this process's own registry writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal, TypeVar

from fishchat_iot.core.tasks import cancel_and_wait
from fishchat_iot.stores.base import DeviceRecord, Store, TopicRecord

log = logging.getLogger("fishchat.manager")


# Registry records kept in memory at most (the oldest cached goes first): a node with
# a large fleet must not hold a record of every device it ever looked up. Logins and
# look-ups of devices not cached read the store; topic sends read the topic cache.
DEVICE_CACHE_MAX = 4096
TOPIC_CACHE_MAX = 8192

K = TypeVar("K")
V = TypeVar("V")


def now_ms() -> int:
    return int(time.time() * 1000)


def _remember(cache: dict[K, V], key: K, value: V, most: int) -> None:
    """Cache ``value``, dropping the oldest entry beyond ``most`` (dicts keep insertion
    order)."""
    cache[key] = value
    if len(cache) > most:
        del cache[next(iter(cache))]


class Manager:
    def __init__(
        self, store: Store, offline_max_age: float = 7 * 86400.0, purge: bool = True
    ) -> None:
        self.store = store
        self.offline_max_age = offline_max_age
        # Expire old queued messages here (embedded); in the distributed mode only the
        # manager process does (roles/manager_node.py), not every msg_server.
        self.purge = purge
        self.expired = 0  # queued messages expired since start
        self._devices: dict[str, DeviceRecord | None] = {}
        self._topics: dict[str, TopicRecord | None] = {}
        self._generation = 0
        self._listeners: list[asyncio.Event] = []
        self._revoke_checked_ms = now_ms()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_revoked: list = []  # callables(device_id) run when a device is revoked
        # callables(device_id) run once per ``device rotate`` of a device, when seen
        self.on_rotated: list = []
        self._rotations: dict[str, int] = {}  # device id -> rotated_ms already handled

    async def start(self) -> None:
        self.store.on_registry_change(self.invalidate)
        self._tasks.add(asyncio.create_task(self._housekeeping(), name="manager-housekeeping"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks, log, "manager")
        self._tasks.clear()

    # -- cache -----------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget cached registry entries; also look for newly revoked devices."""
        self._generation += 1
        self._devices.clear()
        self._topics.clear()
        task = asyncio.get_running_loop().create_task(self._check_revoked())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def device(self, device_id: str, remember: bool = True) -> DeviceRecord | None:
        """The device's record (None: not registered). ``remember=False``: a record
        not cached is read without caching it (a login: an idle device's session
        need not keep its record in memory; senders' look-ups cache it)."""
        if device_id in self._devices:
            return self._devices[device_id]
        gen = self._generation
        rec = await self.store.get_device(device_id)
        if remember and gen == self._generation:
            _remember(self._devices, device_id, rec, DEVICE_CACHE_MAX)
        return rec

    def cached_topic(self, name: str) -> TopicRecord | Literal[False] | None:
        """The cached topic, None if known not to exist, False if not cached."""
        return self._topics.get(name, False)

    async def topic(self, name: str) -> TopicRecord | None:
        cached = self._topics.get(name, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        gen = self._generation
        rec = await self.store.get_topic(name)
        if gen == self._generation:
            _remember(self._topics, name, rec, TOPIC_CACHE_MAX)
        return rec

    # -- registry writes from devices (CREATE_TOPIC, JOIN_TOPIC, LEAVE_TOPIC) --
    async def create_topic(self, name: str, owner: str) -> None:
        await self.store.create_topic(
            TopicRecord(name=name, owner=owner, open=True, created_ms=now_ms())
        )
        self._forget_topic(name)

    async def add_member(self, name: str, device_id: str) -> bool:
        added = await self.store.add_member(name, device_id)
        self._forget_topic(name)
        return added

    async def remove_member(self, name: str, device_id: str) -> bool:
        removed = await self.store.remove_member(name, device_id)
        self._forget_topic(name)
        return removed

    def _forget_topic(self, name: str) -> None:
        self._generation += 1
        self._topics.pop(name, None)

    # -- housekeeping ----------------------------------------------------------
    async def _check_revoked(self) -> None:
        since = self._revoke_checked_ms
        self._revoke_checked_ms = now_ms()
        try:
            revoked = await self.store.revoked_since(since - 1000)
        except Exception as exc:  # the next change or sweep tries again
            log.warning("could not read revoked devices: %s", exc)
            return
        for device_id in revoked:
            for callback in self.on_revoked:
                callback(device_id)
        try:
            rotated = await self.store.rotated_since(since - 1000)
        except Exception as exc:
            log.warning("could not read rotated devices: %s", exc)
            return
        # The look-back overlaps the previous check: each rotation is acted on once.
        self._rotations = {d: at for d, at in self._rotations.items() if at >= since - 1000}
        for device_id, at_ms in rotated:
            if self._rotations.get(device_id) != at_ms:
                self._rotations[device_id] = at_ms
                for callback in self.on_rotated:
                    callback(device_id)

    async def _housekeeping(self) -> None:
        """Expire queued messages past their age bound (logged: nothing disappears
        silently) and re-check revocations every few seconds as a safety net."""
        last_purge = 0.0
        while True:
            await asyncio.sleep(2.0)
            await self._check_revoked()
            if self.purge and time.monotonic() - last_purge >= 60.0:
                last_purge = time.monotonic()
                try:
                    n = await self.store.purge_expired(now_ms() - int(self.offline_max_age * 1000))
                except Exception as exc:
                    log.warning("offline queue purge failed: %s", exc)
                    continue
                self.expired += n
                if n:
                    log.warning(
                        "expired %d queued messages older than %.0f s (delivery.offline_max_age)",
                        n,
                        self.offline_max_age,
                    )
