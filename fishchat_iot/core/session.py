"""A logged-in device session as the core sees it. Adapters subclass ``Session`` and
encode its ``emit_*`` calls in their own wire format; the core never sees frames."""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
from typing import TYPE_CHECKING, Literal

from fishchat_iot.core.envelope import Envelope

if TYPE_CHECKING:
    from fishchat_iot.roles.msg_server import MsgServer

log = logging.getLogger("fishchat.session")


class Mode(enum.Enum):
    # Messages for the device are written to it as they arrive.
    LIVE = "live"
    # Messages for the device go to its durable queue and are fed from there: used at
    # login (until the queue is drained), when its transport is backed up, and when its
    # window of unacked messages is full. This keeps memory bounded and order intact.
    BACKLOG = "backlog"
    CLOSED = "closed"


# Module-level names for the hot path: an enum member read through its class costs
# ~0.3 us more per access than a global (Python 3.11).
LIVE = Mode.LIVE
BACKLOG = Mode.BACKLOG
CLOSED = Mode.CLOSED


class _NoInflight(dict[str, "tuple[Envelope, bool]"]):
    """The in-flight table every session shares while nothing is in flight (an idle
    session then holds no table of its own). Reads, ``pop`` and ``clear`` work as on an
    empty dict; ``Session.push`` gives the session its own dict before inserting."""

    __slots__ = ()

    def __setitem__(self, key: str, value: tuple[Envelope, bool]) -> None:
        raise TypeError("the shared empty in-flight table is read-only")

    def setdefault(self, key: str, default: tuple[Envelope, bool]) -> tuple[Envelope, bool]:
        raise TypeError("the shared empty in-flight table is read-only")

    def update(self, *args: object, **kwargs: object) -> None:
        raise TypeError("the shared empty in-flight table is read-only")


NO_INFLIGHT: dict[str, tuple[Envelope, bool]] = _NoInflight()


class Session(abc.ABC):
    """State the core keeps per session. Not thread-safe; lives on the event loop.

    Slotted (no ``__dict__``): thousands of idle sessions are the common case, and a
    slotted session is ~1.3 KiB smaller (docs/benchmarks.md). Subclasses that do not
    declare ``__slots__`` get a ``__dict__`` as usual.
    """

    __slots__ = (
        "cursor",
        "device_id",
        "dirty",
        "drain_task",
        "idle_timeout",
        "inflight",
        "last_seen",
        "logged_in_ms",
        "mode",
        "node",
        "out",
        "pending_receipts",
        "psk",
        "v1",
    )

    transport_name = "?"

    def __init__(self) -> None:
        self.device_id = ""
        self.v1 = False
        self.mode = Mode.CLOSED
        self.node: MsgServer | None = None
        # Delivered and not yet acked: id -> (envelope, came from the durable queue);
        # the shared empty NO_INFLIGHT while there is none.
        self.inflight: dict[str, tuple[Envelope, bool]] = NO_INFLIGHT
        self.cursor = 0  # highest okey read from the durable queue in this session
        self.last_seen = 0.0
        # Seconds of silence after which the node closes the session; 0 = the node's
        # [tcp] keepalive, math.inf = never (an MQTT CONNECT with keepalive 0).
        self.idle_timeout = 0.0
        self.logged_in_ms = 0
        self.pending_receipts = 0  # sends waiting for the store before ACCEPTED
        self.drain_task: asyncio.Task[None] | None = None
        self.out = bytearray()
        self.dirty = False
        # A gateway-terminated device's pre-shared key (crypto/gateway.py, PskKeys):
        # None when it has none, False until looked up.
        self.psk: bytes | Literal[False] | None = False

    # -- what the transport provides -----------------------------------------
    @abc.abstractmethod
    def emit_message(self, env: Envelope) -> None:
        """Append a delivery of ``env`` to ``self.out``."""

    @abc.abstractmethod
    def emit_accepted(self, msg_id: str) -> None: ...

    @abc.abstractmethod
    def emit_error(self, code: str, text: str, ref: str = "") -> None:
        """Tell the device about an error (v1 sessions cannot be told: log it)."""

    @abc.abstractmethod
    def emit_ok(self, command: str, name: str) -> None: ...

    @abc.abstractmethod
    def emit_located(self, address: str, topic: str) -> None: ...

    @abc.abstractmethod
    def write_out(self) -> None:
        """Write ``self.out`` to the device in one call and clear it."""

    @abc.abstractmethod
    def can_write(self) -> bool:
        """False while the transport's buffer is above its high-water mark."""

    @abc.abstractmethod
    def drop(self, code: str, text: str) -> None:
        """Close the connection (after telling the device why, where it can be told)."""

    def pause_input(self) -> None:  # noqa: B027 - optional for transports that cannot
        """Stop reading from the device (too many sends waiting for the store)."""

    def resume_input(self) -> None:  # noqa: B027
        """Start reading again."""

    # -- helpers ---------------------------------------------------------------
    def push(self, env: Envelope, stored: bool) -> None:
        """Write a delivery and remember it until acked. v1 sessions cannot ack topic
        messages, so those count as delivered once written; sealed (E2E) bodies are
        not written to v1 sessions at all (docs/protocol.md, E2E)."""
        self.emit_message(env)
        if not (self.v1 and (env.kind == "topic" or env.enc != "none")):
            inflight = self.inflight
            if inflight is NO_INFLIGHT:
                inflight = self.inflight = {}
            inflight[env.id] = (env, stored)
        if not self.dirty:
            self.mark_dirty()

    def mark_dirty(self) -> None:
        if not self.dirty and self.node is not None:
            self.dirty = True
            self.node.schedule_flush(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device_id or '-'} {self.mode.value}>"
