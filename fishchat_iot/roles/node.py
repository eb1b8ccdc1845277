"""What every role process of the distributed mode shares (``fishchat-iot run ROLE``):
its bus, opened whenever it becomes reachable (roles start in any order), a node id,
and a heartbeat into the node registry every 2 s so the gateway, the routers and the
monitor see it. Subclasses add their work in ``_start``/``_stop``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from typing import Any

from fishchat_iot.backends import describe_bus, make_bus, open_with_retry
from fishchat_iot.bus.base import Bus, BusUnavailable, NodeInfo
from fishchat_iot.config import Settings
from fishchat_iot.core.tasks import cancel_and_wait, spawn_owned
from fishchat_iot.roles.manager import now_ms

log = logging.getLogger("fishchat.node")

HEARTBEAT_PERIOD = 2.0


class RoleNode:
    role = "?"

    def __init__(self, settings: Settings, bus: Bus | None = None) -> None:
        self.settings = settings
        self.bus = bus if bus is not None else make_bus(settings)
        host = settings.node.advertise_host
        self.node_id = settings.node.id or f"{self.role}@{host}:{os.getpid()}"
        self._address = ""
        self.started_ms = now_ms()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await open_with_retry(self.bus.open, describe_bus(self.settings))
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.spawn(self._beat_forever(), "heartbeat")
        log.info("%s %s is up", self.role, self.node_id)

    @property
    def address(self) -> str:
        """host:port where the role listens, "" if it does not."""
        return self._address

    @address.setter
    def address(self, value: str) -> None:
        self._address = value

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks, log, f"{self.role} {self.node_id}")
        self._tasks.clear()
        await self._stop()
        with contextlib.suppress(Exception):
            await self.bus.remove_node(self.node_id)
        await self.bus.close()

    async def _start(self) -> None:
        """The role's own start (the bus is open)."""

    async def _stop(self) -> None:
        """The role's own stop (the bus is still open)."""

    async def _after_beat(self) -> None:
        """Run after every heartbeat, failed or not (the monitor's status file)."""

    def stats(self) -> dict[str, Any]:
        """Role-specific figures for the node registry (the monitor shows them)."""
        return {}

    def node_info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            role=self.role,
            address=self.address,
            started_ms=self.started_ms,
            stats=self.stats(),
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return spawn_owned(self._tasks, coro, name, log)

    async def _beat_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.bus.heartbeat(self.node_info())
                if failing:
                    log.warning("%s heartbeat: the bus is reachable again", self.node_id)
                failing = False
            except BusUnavailable as exc:
                if not failing:
                    log.warning("%s heartbeat failed: %s; retrying", self.node_id, exc)
                failing = True
            await self._after_beat()
            await asyncio.sleep(HEARTBEAT_PERIOD)
