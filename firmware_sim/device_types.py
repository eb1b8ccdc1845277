"""What the device SDKs (``TcpDevice``, ``MqttDevice``, ``SerialDevice``) share as
vocabulary: the SDK's own error codes, :class:`DeviceError`, the delivered
:class:`Message`, the bounded inbox and address parsing."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fishchat_iot import errors

# Local error codes: never sent by a server, raised by the SDK itself.
CLOSED = "CLOSED"  # the device was closed, or lost its connection with reconnect=False
CONNECT_FAILED = "CONNECT_FAILED"  # no gateway / msg_server could be reached
TIMEOUT = "TIMEOUT"  # no answer in time (connect_timeout, request_timeout)
PROTOCOL = "PROTOCOL"  # the server sent something this SDK cannot make sense of
NOT_SUPPORTED = "NOT_SUPPORTED"  # e.g. leave_topic in a v1 session
LOGIN_REFUSED = "LOGIN_REFUSED"  # v1: the server closed the connection after SEND_CLIENT_ID
NO_KEY = "NO_KEY"  # end-to-end: no key to seal with (peer without public key, topic key)

# Errors after which reconnecting is pointless: the device stops.
FATAL_CODES = frozenset(
    {errors.AUTH_FAILED, errors.REVOKED, errors.SESSION_REPLACED, errors.V1_NOT_ALLOWED}
)

MAX_ID_LEN = 64


class DeviceError(Exception):
    """An error from the server (``ERROR [code, text, ref]``) or from the SDK.

    ``ref`` is the message id or topic name the error is about, when there is one."""

    def __init__(self, code: str, text: str, ref: str = "") -> None:
        super().__init__(f"{code}: {text}" if text else code)
        self.code = code
        self.text = text
        self.ref = ref

    def copy(self) -> DeviceError:
        return DeviceError(self.code, self.text, self.ref)


@dataclass(frozen=True, slots=True)
class Message:
    """A message delivered to this device.

    ``id`` is the sender's message id (server-assigned for v1 senders; ``""`` for topic
    messages in a v1 session, which carry none). ``ts`` is the server's timestamp in ms
    (for v1 sessions, which are not told one: the local receive time)."""

    kind: str  # "p2p" or "topic"
    id: str
    sender: str
    text: str
    topic: str = ""
    ts: int = 0
    enc: str = "none"  # how it was sealed on the wire; ``text`` is always the plaintext


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to ``(host, port)``; ValueError if malformed."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DeviceError) else errors.reason(exc)


class _Inbox:
    """A bounded FIFO of messages that can be closed with an error (receivers drain
    what is left, then get the error)."""

    __slots__ = ("_error", "_items", "_max", "_readable", "_writable")

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[Message] = collections.deque()
        self._max = max(1, maxsize)
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: DeviceError | None = None

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self._max

    async def put(self, item: Message) -> bool:
        """Wait for room; False if the inbox was closed (the item was not added)."""
        while len(self._items) >= self._max and self._error is None:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            return False
        self._items.append(item)
        self._readable.set()
        return True

    async def get(self) -> Message:
        while not self._items:
            if self._error is not None:
                raise self._error.copy()
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self, error: DeviceError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()


class _Fatal(Exception):
    def __init__(self, error: DeviceError) -> None:
        super().__init__(str(error))
        self.error = error
