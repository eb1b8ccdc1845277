"""The bus interface the roles talk to (DESIGN section 1): which nodes are alive and how
loaded, which node holds which device, and a durable inbox per node for messages routed
to it from elsewhere."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fishchat_iot.core.envelope import Envelope

InboxHandler = Callable[[Sequence[Envelope]], Awaitable[None]]


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

    # -- node inboxes ----------------------------------------------------------
    @abc.abstractmethod
    async def attach_inbox(self, node_id: str, handler: InboxHandler) -> None:
        """Deliver envelopes sent to ``node_id`` to ``handler``."""

    @abc.abstractmethod
    async def send_to_node(self, node_id: str, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to another node's inbox; returns once the hand-off is durable."""
