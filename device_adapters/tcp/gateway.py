"""The gateway's TCP listener: answers ``REQ_MSG_SERVER`` with
``SELECT_MSG_SERVER_FOR_CLIENT [addr]`` and closes, as FishChatServer v1 did."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from device_adapters.tcp.framing import FrameDecoder, FrameError, append_frame
from device_adapters.tcp.listener import TcpListener
from fishchat_iot import errors
from fishchat_iot.roles.gateway import Gateway

log = logging.getLogger("fishchat.gateway")

# A gateway conversation is one small frame; anything bigger is not a device asking.
GATEWAY_MAX_FRAME = 4096


class GatewayConnection(asyncio.Protocol):
    def __init__(self, listener: TcpListener, gateway: Gateway, timeout: float) -> None:
        self.listener = listener
        self.gateway = gateway
        self.timeout = timeout
        self.decoder = FrameDecoder(GATEWAY_MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self.transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.timer = asyncio.get_running_loop().call_later(self.timeout, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.listener.connections.discard(self.transport)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.task is not None or self.transport is None or self.transport.is_closing():
            return
        for item in self.decoder.feed(data):
            if isinstance(item, FrameError):
                self._fail(item.code, item.text)
                return
            cmd, args = item
            if cmd == "REQ_MSG_SERVER":
                tls = bool(args) and args[0] == "tls"
                self.task = asyncio.get_running_loop().create_task(self._answer(tls))
            else:
                self._fail(
                    errors.UNKNOWN_COMMAND,
                    f"the gateway answers only REQ_MSG_SERVER, not {cmd[:40]!r}",
                )
            return

    async def _answer(self, tls: bool = False) -> None:
        # ["tls"]: the TLS msg_server, never the plain one in its place (no downgrade).
        addr = await self.gateway.pick_msg_server(tls)
        if self.transport is None or self.transport.is_closing():
            return
        if addr is None:
            what = "no TLS msg_server is up (tls.enabled is off)" if tls else "no msg_server is up"
            self._fail(errors.UNAVAILABLE, f"{what}: retry later")
            return
        out = bytearray()
        append_frame(out, "SELECT_MSG_SERVER_FOR_CLIENT", [addr])
        self.transport.write(out)
        self.transport.close()

    def _fail(self, code: str, text: str) -> None:
        log.warning("gateway refused %s: %s: %s", self.peer, code, text)
        assert self.transport is not None
        out = bytearray()
        append_frame(out, "ERROR", [code, text])
        self.transport.write(out)
        self.transport.close()
