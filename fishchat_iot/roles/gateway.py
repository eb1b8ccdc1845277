"""The gateway role: tells a device which msg_server to use, picking the least-loaded
live one from the node registry (with one node, that node names itself)."""

from __future__ import annotations

from fishchat_iot.bus.base import Bus


class Gateway:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._turn = 0
        # The TLS msg_server listener of this deployment ("" = none): the answer to a
        # device that asks for TLS (REQ_MSG_SERVER ["tls"], docs/protocol.md).
        self.tls_address = ""

    async def pick_msg_server(self) -> str | None:
        """Address of the live msg_server with the fewest sessions; ties take turns."""
        nodes = await self.bus.live_nodes("msg_server")
        if not nodes:
            return None
        fewest = min(n.sessions for n in nodes)
        tied = sorted((n for n in nodes if n.sessions == fewest), key=lambda n: n.node_id)
        self._turn += 1
        return tied[self._turn % len(tied)].address
