"""``fishchat-iot run gateway``: the REQ_MSG_SERVER listener on its own, answering from
the node registry on the bus (``roles/gateway.py`` picks the msg_server)."""

from __future__ import annotations

from typing import Any

from device_adapters.tcp.gateway import GatewayConnection
from device_adapters.tcp.listener import TcpListener
from fishchat_iot.config import Settings
from fishchat_iot.roles.gateway import Gateway
from fishchat_iot.roles.node import RoleNode


class GatewayNode(RoleNode):
    role = "gateway"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gateway = Gateway(self.bus)
        tcp = settings.tcp
        self.listener = TcpListener(
            "gateway",
            "tcp.gateway_port",
            lambda lst: GatewayConnection(lst, self.gateway, tcp.login_timeout),
            tcp.host,
            tcp.gateway_port,
        )

    async def _start(self) -> None:
        await self.listener.start()
        self.address = f"{self.settings.node.advertise_host}:{self.listener.port}"

    async def _stop(self) -> None:
        await self.listener.stop()

    def stats(self) -> dict[str, Any]:
        return {"answered": self.gateway.answered}
