"""The embedded bus: every role in one process, so presence and the node registry are
dictionaries and an inbox is a direct call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fishchat_iot.bus.base import Bus, EventCallback, InboxHandler, NodeInfo
from fishchat_iot.core.envelope import Envelope


class LocalBus(Bus):
    def __init__(self, node_ttl: float = 10.0) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        self._presence: dict[str, str] = {}
        self._inboxes: dict[str, InboxHandler] = {}
        self._node_ttl_ms = int(node_ttl * 1000)
        self._event_callbacks: list[EventCallback] = []

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._inboxes.clear()

    async def heartbeat(self, node: NodeInfo) -> None:
        node.updated_ms = int(time.time() * 1000)
        self._nodes[node.node_id] = node

    async def remove_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    async def live_nodes(self, role: str) -> list[NodeInfo]:
        cutoff = int(time.time() * 1000) - self._node_ttl_ms
        return [n for n in self._nodes.values() if n.role == role and n.updated_ms >= cutoff]

    async def set_presence(self, device_id: str, node_id: str) -> None:
        self._presence[device_id] = node_id

    async def clear_presence(self, device_id: str, node_id: str) -> None:
        if self._presence.get(device_id) == node_id:
            del self._presence[device_id]

    async def where(self, device_id: str) -> str | None:
        return self._presence.get(device_id)

    async def attach_inbox(self, node_id: str, handler: InboxHandler) -> None:
        self._inboxes[node_id] = handler

    async def send_to_node(self, node_id: str, envelopes: Sequence[Envelope]) -> None:
        handler = self._inboxes.get(node_id)
        if handler is None:
            raise LookupError(f"node {node_id} has no inbox")
        await handler(envelopes)

    async def publish_event(self, event: dict[str, Any]) -> None:
        for callback in list(self._event_callbacks):
            callback(event)

    def on_event(self, callback: EventCallback) -> None:
        self._event_callbacks.append(callback)
