"""A small HTTP/1.1 server on asyncio streams, enough for the monitor: keep-alive,
Content-Length bodies (no chunked uploads), bounded headers and bodies, and streaming
responses for server-sent events. No framework: the monitor serves a handful of
routes to a few operators, and this keeps the dependency list as it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger("fishchat.monitor")

MAX_HEAD = 16384  # bytes of request line + headers
MAX_BODY = 65536
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for its next request


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer: str

    def cookie(self, name: str) -> str:
        for part in self.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return ""

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return None

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode("utf-8", "replace")))


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # A streaming body (server-sent events): chunks written as they come, then close.
    stream: AsyncIterator[bytes] | None = None


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status,
        json.dumps(doc, separators=(",", ":")).encode(),
        "application/json",
        dict(headers or {}),
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message, "status": status}, status, headers)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, host: str, port: int, name: str = "monitor") -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        peer_host = str(peer[0]) if isinstance(peer, tuple) else "local"
        try:
            while True:
                try:
                    req = await asyncio.wait_for(self._read(reader, peer_host), IDLE_TIMEOUT)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                except _BadRequest as exc:
                    await self._write(writer, error_response(exc.status, str(exc)), False)
                    return
                if req is None:
                    return
                try:
                    resp = await self.handler(req)
                except Exception:
                    log.exception("%s: %s %s failed", self.name, req.method, req.path)
                    resp = error_response(500, "internal error (see the server log)")
                keep = req.headers.get("connection", "").lower() != "close"
                if resp.stream is not None:
                    await self._write_stream(writer, resp)
                    return
                await self._write(writer, resp, keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, peer: str) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            raise
        if len(head) > MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "bad request line")
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "bad header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise _BadRequest(413, "request body too large")
        body = await reader.readexactly(length) if length else b""
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = urllib.parse.unquote(url.path) or "/"
        return Request(method.upper(), path, query, headers, body, peer)

    @staticmethod
    def _head(resp: Response, length: int | None, keep: bool) -> bytes:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Status"
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        lines.append("X-Content-Type-Options: nosniff")
        lines.append("Cache-Control: no-store")
        for k, v in resp.headers.items():
            lines.append(f"{k}: {v}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        writer.write(self._head(resp, len(resp.body), keep) + resp.body)
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, resp: Response) -> None:
        assert resp.stream is not None
        writer.write(self._head(resp, None, False))
        await writer.drain()
        try:
            async for chunk in resp.stream:
                writer.write(chunk)
                await writer.drain()
        finally:
            aclose = getattr(resp.stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
