"""The bus interface the roles talk to (DESIGN section 1): which nodes are alive and how
loaded, which node holds which device, and a durable inbox per node for messages routed
to it from elsewhere."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fishchat_iot.core.envelope import Envelope

InboxHandler = Callable[[Sequence[Envelope]], Awaitable[None]]
EventCallback = Callable[[dict[str, Any]], None]


class BusUnavailable(Exception):
    """The bus (Redis) cannot be reached or refused the operation: nothing was handed
    off. Callers treat it like a store outage: the sender gets an error and retries."""


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    role: str  # "msg_server", "gateway", ...
    address: str  # host:port devices are told to connect to
    started_ms: int
    updated_ms: int = 0
    sessions: int = 0
    msgs_in: int = 0  # messages accepted from devices on this node, since start
    msgs_out: int = 0  # messages written to devices on this node, since start
    stats: dict[str, Any] = field(default_factory=dict)  # role-specific figures (monitor)
    tls_address: str = ""  # msg_server: host:port of its TLS listener, "" = none


class Bus(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- node registry ---------------------------------------------------------
    @abc.abstractmethod
    async def heartbeat(self, node: NodeInfo) -> None:
        """Register or refresh a node with its current load."""

    @abc.abstractmethod
    async def remove_node(self, node_id: str) -> None: ...

    @abc.abstractmethod
    async def live_nodes(self, role: str) -> list[NodeInfo]:
        """Nodes of this role whose last heartbeat is recent enough to call them alive."""

    # -- presence --------------------------------------------------------------
    @abc.abstractmethod
    async def set_presence(self, device_id: str, node_id: str) -> None: ...

    @abc.abstractmethod
    async def clear_presence(self, device_id: str, node_id: str) -> None:
        """Clear only if the device is still recorded on ``node_id`` (a newer login
        elsewhere wins)."""

    @abc.abstractmethod
    async def where(self, device_id: str) -> str | None:
        """The node holding the device's live session, if any."""

    def on_presence_restored(self, callback: Callable[[list[str]], None]) -> None:  # noqa: B027
        """Call ``callback`` with devices whose presence had expired (an outage of the
        bus) and was set again for this process: messages for them may have gone to
        their offline queues meanwhile. The embedded bus never loses presence."""

    async def where_many(self, device_ids: Sequence[str]) -> list[str | None]:
        """``where`` for several devices (one round trip on a remote bus)."""
        return [await self.where(d) for d in device_ids]

    # -- node inboxes ----------------------------------------------------------
    @abc.abstractmethod
    async def attach_inbox(self, node_id: str, handler: InboxHandler) -> None:
        """Deliver envelopes sent to ``node_id`` to ``handler``."""

    @abc.abstractmethod
    async def send_to_node(self, node_id: str, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to another node's inbox; returns once the hand-off is durable."""

    async def dead_nodes(self, role: str | None = None) -> list[str]:
        """Registered nodes whose heartbeat stopped: their inboxes may hold entries for
        ``claim_inbox``. The embedded bus has none."""
        return []

    async def claim_inbox(self, node_id: str, handler: InboxHandler, consumer: str = "") -> int:
        """Hand what is left in a dead node's inbox to ``handler``; how many envelopes."""
        return 0

    # -- role inboxes: one inbox shared by every process of a role (the routers) ----
    async def send_to_role(self, role: str, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to the shared inbox of a role; durable once it returns.
        LookupError when this bus has no such inbox (the embedded bus)."""
        raise LookupError(f"no {role} inbox on this bus")

    async def attach_role_inbox(self, role: str, consumer: str, handler: InboxHandler) -> None:
        """Read the shared inbox of ``role`` as ``consumer`` (one of its processes)."""
        raise NotImplementedError("role inboxes need the distributed bus")

    # -- registry-change and operator events ------------------------------------------
    @abc.abstractmethod
    async def publish_event(self, event: dict[str, Any]) -> None:
        """Tell every process (this one included) about e.g. ``{"kind": "revoke",
        "device": "d1"}`` or ``{"kind": "kick", "device": "d1"}``. Fire and forget."""

    @abc.abstractmethod
    def on_event(self, callback: EventCallback) -> None:
        """Call ``callback`` on the event loop with every event published."""
