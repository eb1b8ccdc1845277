"""The gateway role: tells a device which msg_server to use, picking the least-loaded
live one from the node registry (with one node, that node names itself).

Load is the session count of each msg_server's last heartbeat (every 2 s) plus the
devices this gateway sent it since that heartbeat: a burst of logins between two
heartbeats is spread instead of all going to the node that looked emptiest."""

from __future__ import annotations

import logging

from fishchat_iot.bus.base import Bus, BusUnavailable

log = logging.getLogger("fishchat.gateway")


class Gateway:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._turn = 0
        self.answered = 0  # msg_servers named since start
        # node id -> (updated_ms of the heartbeat counted from, devices sent since)
        self._sent: dict[str, tuple[int, int]] = {}

    async def pick_msg_server(self, tls: bool = False) -> str | None:
        """Address of the live msg_server with the least load; ties take turns. None
        when none is alive or the registry cannot be read. ``tls``: the TLS listener
        of the least loaded msg_server that has one (REQ_MSG_SERVER ["tls"],
        docs/protocol.md), never a plain one in its place."""
        try:
            nodes = await self.bus.live_nodes("msg_server")
        except BusUnavailable as exc:
            log.warning("cannot read the node registry: %s", exc)
            return None
        if tls:
            nodes = [n for n in nodes if n.tls_address]
        if not nodes:
            return None
        sent = {}
        for n in nodes:
            since, count = self._sent.get(n.node_id, (n.updated_ms, 0))
            sent[n.node_id] = (n.updated_ms, count if since == n.updated_ms else 0)
        self._sent = sent
        load = {n.node_id: n.sessions + sent[n.node_id][1] for n in nodes}
        least = min(load.values())
        tied = sorted((n for n in nodes if load[n.node_id] == least), key=lambda n: n.node_id)
        self._turn += 1
        chosen = tied[self._turn % len(tied)]
        updated, count = sent[chosen.node_id]
        self._sent[chosen.node_id] = (updated, count + 1)
        self.answered += 1
        return chosen.tls_address if tls else chosen.address
