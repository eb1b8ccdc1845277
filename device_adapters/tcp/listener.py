"""A TCP listener that remembers its connections, so stopping it closes them too."""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Callable


class ListenError(Exception):
    """A listener could not bind; the text names the option to change."""


class TcpListener:
    def __init__(
        self,
        name: str,
        option: str,
        factory: Callable[[TcpListener], asyncio.Protocol],
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.tls = tls  # a TLS listener: sessions see the verified client certificate
        self.handshake_timeout = handshake_timeout
        self.option = option  # the setting that picks the port, for error messages
        self._factory = factory
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.tls is None:
                self.server = await loop.create_server(
                    lambda: self._factory(self),
                    self.host,
                    self.port,
                    reuse_address=True,
                    backlog=1024,
                )
            else:
                self.server = await loop.create_server(
                    lambda: self._factory(self),
                    self.host,
                    self.port,
                    reuse_address=True,
                    backlog=1024,
                    ssl=self.tls,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"{self.name} port {self.port} on {self.host} is already in use: "
                    f"stop what uses it or pick another port with {self.option} (0 = any free)"
                ) from None
            raise ListenError(
                f"cannot listen for {self.name} on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for transport in list(self.connections):
            transport.close()
        if self.server is not None:
            await self.server.wait_closed()
