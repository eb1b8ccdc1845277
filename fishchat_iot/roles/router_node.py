"""``fishchat-iot run router``: the routers' process. It reads the inbox all routers
share (topic messages a msg_server handed over for members it does not hold) and routes
each envelope: to the node holding the member, or to its offline queue. And it empties
the inboxes of msg_servers that died: their entries (accepted messages, some perhaps
delivered but not acked) are routed again, so nothing accepted is lost; devices drop
the duplicates by id.

Any number of routers may run: the shared inbox is a consumer group, and a router that
dies has its unacked entries taken over by the others after ``bus.claim_idle``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from fishchat_iot.backends import describe_store, make_store, open_with_retry
from fishchat_iot.bus.base import BusUnavailable
from fishchat_iot.config import Settings
from fishchat_iot.core.envelope import KIND_POKE, Envelope
from fishchat_iot.crypto.atrest import AtRest, SealedStore, load_server_key
from fishchat_iot.roles.node import RoleNode
from fishchat_iot.roles.router import ROUTER_ROLE, Router
from fishchat_iot.stores.base import StoreUnavailable

log = logging.getLogger("fishchat.router")

CLAIM_PERIOD = 2.0


class RouterNode(RoleNode):
    role = ROUTER_ROLE

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.store = make_store(settings)
        # Bodies not sealed end to end are sealed at rest, as on the msg_servers.
        self.sealed = SealedStore(self.store)
        self.router = Router(self.bus, self.sealed.as_store(), settings.delivery.offline_max)
        self.routed = 0
        self.claimed = 0

    async def _start(self) -> None:
        self.sealed.atrest = AtRest(load_server_key(self.settings.server_key_path))
        await open_with_retry(self.store.open, describe_store(self.settings))
        await open_with_retry(
            lambda: self.bus.attach_role_inbox(ROUTER_ROLE, self.node_id, self.route),
            "the routers' inbox",
        )
        self.spawn(self._claim_forever(), "claim-dead-inboxes")

    async def _stop(self) -> None:
        await self.store.close()

    def stats(self) -> dict[str, Any]:
        return {"routed": self.routed, "claimed": self.claimed}

    async def route(self, envelopes: Sequence[Envelope]) -> None:
        """Route accepted messages until they are handed off; the bus acks the entry
        only when this returns, so an outage of MongoDB or Redis delays, never drops."""
        envs = [e for e in envelopes if e.kind != KIND_POKE]  # for a node that is gone
        delay = 0.05
        while envs:
            try:
                await self.router.route_elsewhere(envs, accepted=True)
                self.routed += len(envs)
                return
            except StoreUnavailable as exc:
                log.warning("cannot route %d accepted messages yet: %s", len(envs), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _claim_forever(self) -> None:
        # A node counts as dead when two looks in a row (CLAIM_PERIOD apart) find its
        # heartbeat expired: right after Redis restarted, every liveness key may have
        # expired during the outage, and the live nodes beat again within 2 s.
        suspects: set[str] = set()
        while True:
            await asyncio.sleep(CLAIM_PERIOD)
            try:
                expired = set(await self.bus.dead_nodes("msg_server"))
                dead, suspects = expired & suspects, expired
                for node_id in sorted(dead):
                    n = await self.bus.claim_inbox(node_id, self.route, consumer=self.node_id)
                    self.claimed += n
                    if n:
                        log.warning("msg_server %s is gone: re-routed %d messages", node_id, n)
            except BusUnavailable as exc:
                log.warning("cannot look for dead msg_servers: %s", exc)
