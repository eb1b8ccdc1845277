"""The router role: decides where each accepted message goes — a live session on this
node (the synchronous fast path), another node's inbox (distributed mode), or the
recipient's durable offline queue — and fans topic messages out to their members."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fishchat_iot.bus.base import Bus
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.stores.base import Enqueued, Store

if TYPE_CHECKING:
    from fishchat_iot.roles.msg_server import MsgServer

# Messages already accepted (re-stored when a session ends) must never bounce off the
# queue bound: the bound is for new messages only.
NO_LIMIT = sys.maxsize


class Router:
    def __init__(self, bus: Bus, store: Store, offline_max: int) -> None:
        self.bus = bus
        self.store = store
        self.offline_max = offline_max
        self.node: MsgServer | None = None

    async def route_elsewhere(
        self, envelopes: Sequence[Envelope], accepted: bool = False
    ) -> list[Enqueued]:
        """Route messages that no live local session took. Returns, per envelope,
        STORED when the hand-off is durable (another node's inbox or the offline
        queue), or why it was not. ``accepted`` marks messages that were accepted
        before (they ignore the queue bound)."""
        node_id = self.node.node_id if self.node is not None else ""
        results: list[Enqueued | None] = [None] * len(envelopes)
        remote: dict[str, list[int]] = {}
        local: list[int] = []
        for i, env in enumerate(envelopes):
            where = await self.bus.where(env.to)
            if where is None or where == node_id:
                local.append(i)
            else:
                remote.setdefault(where, []).append(i)
        for target, idxs in remote.items():
            try:
                await self.bus.send_to_node(target, [envelopes[i] for i in idxs])
            except LookupError:
                local.extend(idxs)  # the node is gone: its devices are offline
                continue
            for i in idxs:
                results[i] = Enqueued.STORED
        if local:
            stored = await self.store.enqueue(
                [envelopes[i] for i in local], NO_LIMIT if accepted else self.offline_max
            )
            for i, r in zip(local, stored, strict=True):
                results[i] = r
        return [r if r is not None else Enqueued.STORED for r in results]
