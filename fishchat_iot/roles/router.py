"""The router role: decides where each accepted message goes — a live session on this
node (the synchronous fast path, in ``MsgServer._offer``), another node's inbox
(distributed mode), or the recipient's durable offline queue — and fans topic messages
out to their members.

The same ``Router`` runs inside every msg_server (p2p messages and the members a
topic message's node holds) and as the ``run router`` process, which reads the routers'
shared inbox (topic messages for members on other nodes) and empties the inboxes of
msg_servers that died (``roles/router_node.py``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fishchat_iot.bus.base import Bus, BusUnavailable
from fishchat_iot.core.envelope import KIND_POKE, Envelope
from fishchat_iot.stores.base import Enqueued, Store, StoreUnavailable

if TYPE_CHECKING:
    from fishchat_iot.roles.msg_server import MsgServer

log = logging.getLogger("fishchat.router")

# Messages already accepted (re-stored when a session ends) must never bounce off the
# queue bound: the bound is for new messages only.
NO_LIMIT = sys.maxsize
ROUTER_ROLE = "router"


def poke(device_id: str) -> Envelope:
    """An envelope that carries no message: it tells the node holding ``device_id`` to
    read the device's offline queue again (something was stored there after the device
    logged in on that node)."""
    return Envelope("", "", device_id, "", 0, 0, KIND_POKE)


class Router:
    def __init__(self, bus: Bus, store: Store, offline_max: int) -> None:
        self.bus = bus
        self.store = store
        self.offline_max = offline_max
        self.node: MsgServer | None = None
        self.routers_alive = False  # refreshed by the msg_server's heartbeat

    async def route_elsewhere(
        self, envelopes: Sequence[Envelope], accepted: bool = False, via_router: bool = False
    ) -> list[Enqueued]:
        """Route messages that no live local session took. Returns, per envelope,
        STORED when the hand-off is durable (another node's inbox, the routers' inbox
        or the offline queue), or why it was not. ``accepted`` marks messages that
        were accepted before (they ignore the queue bound). ``via_router``: hand
        them to the router processes when one is alive (topic fan-out to members on
        other nodes). Raises StoreUnavailable when the store or the bus is down."""
        try:
            if via_router and self.routers_alive:
                try:
                    await self.bus.send_to_role(ROUTER_ROLE, envelopes)
                    return [Enqueued.STORED] * len(envelopes)
                except LookupError:
                    pass
            return await self._route(envelopes, accepted)
        except BusUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _route(self, envelopes: Sequence[Envelope], accepted: bool) -> list[Enqueued]:
        node_id = self.node.node_id if self.node is not None else ""
        results: list[Enqueued | None] = [None] * len(envelopes)
        remote: dict[str, list[int]] = {}
        local: list[int] = []
        offline: set[str] = set()  # recipients with no live session anywhere just now
        devices = list(dict.fromkeys(env.to for env in envelopes))
        at = dict(zip(devices, await self.bus.where_many(devices), strict=True))
        for i, env in enumerate(envelopes):
            where = at[env.to]
            if where is None:
                local.append(i)
                offline.add(env.to)
            elif where == node_id:
                local.append(i)  # held here, not live: MsgServer._drain keeps the order
            else:
                remote.setdefault(where, []).append(i)
        for target, idxs in remote.items():
            try:
                await self.bus.send_to_node(target, [envelopes[i] for i in idxs])
            except LookupError:
                local.extend(idxs)  # the node is gone: its devices are offline
                offline.update(envelopes[i].to for i in idxs)
                continue
            for i in idxs:
                results[i] = Enqueued.STORED
        if local:
            local.sort()
            stored = await self.store.enqueue(
                [envelopes[i] for i in local], NO_LIMIT if accepted else self.offline_max
            )
            for i, r in zip(local, stored, strict=True):
                results[i] = r
            stored_for = {envelopes[i].to for i, r in zip(local, stored, strict=True)}
            await self._poke_arrived(offline & stored_for, node_id)
        return [r if r is not None else Enqueued.STORED for r in results]

    async def _poke_arrived(self, devices: set[str], node_id: str) -> None:
        """A device may have logged in on another node while its message was on its way
        to the queue, after that node read the queue: tell that node to read it again.
        (A login on this node needs no poke: the hand-off was counted before it, and
        the new session's feed waits for it, ``MsgServer._drain``.)"""
        listed = sorted(devices)
        for device, where in zip(listed, await self.bus.where_many(listed), strict=True):
            if where is None or where == node_id:
                continue
            try:
                await self.bus.send_to_node(where, [poke(device)])
            except LookupError:
                pass  # that node died: the device logs in again and reads its queue
