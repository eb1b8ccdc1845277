"""``fishchat-iot run manager``: the registry's housekeeping in the distributed mode.
It expires offline messages past ``delivery.offline_max_age`` (logged with their count;
the MongoDB TTL index is only the safety net), and turns revocations written by the
CLI or the monitor into ``revoke`` events on the bus, so every msg_server cuts the
device's sessions at once (they also find it by polling the registry version).
msg_servers read the registry themselves (cached) and write offline queues on their own
hot path; everything else the store needs is done here."""

from __future__ import annotations

import logging
from typing import Any

from fishchat_iot.backends import describe_store, make_store, open_with_retry
from fishchat_iot.config import Settings
from fishchat_iot.roles.manager import Manager
from fishchat_iot.roles.node import RoleNode

log = logging.getLogger("fishchat.manager")


class ManagerNode(RoleNode):
    role = "manager"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.store = make_store(settings)
        self.manager = Manager(self.store, settings.delivery.offline_max_age, purge=True)
        self.manager.on_revoked.append(self._revoked)
        self.revocations = 0

    async def _start(self) -> None:
        await open_with_retry(self.store.open, describe_store(self.settings))
        await self.manager.start()

    async def _stop(self) -> None:
        await self.manager.stop()
        await self.store.close()

    def stats(self) -> dict[str, Any]:
        return {"revocations": self.revocations, "expired": self.manager.expired}

    def _revoked(self, device_id: str) -> None:
        self.revocations += 1
        self.spawn(self.bus.publish_event({"kind": "revoke", "device": device_id}), "revoke")
