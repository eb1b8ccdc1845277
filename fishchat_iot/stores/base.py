"""The store interface the core and the CLI talk to (DESIGN section 5).

Everything durable goes through it: the device registry, topics and members, and the
offline queues (messages accepted for a device and not yet acked by it). Every
implementation passes the one contract suite in ``tests/stores/``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Self

from fishchat_iot.core.envelope import Envelope

NO_META: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True)
class DeviceRecord:
    id: str
    token_hash: bytes  # SHA-256 of the token; the token itself is never stored
    v1: bool = False  # may log in without a token (FishChat v1 clients)
    revoked: bool = False
    created_ms: int = 0
    revoked_ms: int = 0
    public_key: str = ""  # base64 X25519 public key, for end-to-end encryption
    # Gateway-terminated devices: their pre-shared key, sealed at rest under the server
    # key (crypto/atrest.py ``seal_psk``); never the key itself. "" = no PSK.
    psk: str = ""
    rotated_ms: int = 0  # when token and keys were last replaced (``device rotate``)
    # Read-only; records without any share one empty mapping (a registry cache of
    # thousands of records need not hold an empty dict each).
    meta: Mapping[str, str] = field(default_factory=lambda: NO_META)


@dataclass(slots=True)
class TopicRecord:
    name: str
    owner: str  # device id of the creator ("" when an operator created it alone)
    open: bool = True  # any registered device may join (v1 behaviour)
    created_ms: int = 0
    members: frozenset[str] = frozenset()


class Enqueued(enum.Enum):
    """What happened to one envelope handed to ``Store.enqueue``."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same sender's message with this id is already queued
    CONFLICT = "conflict"  # another sender's message with this id is queued for the device
    FULL = "full"  # the device's queue is at its bound; nothing was stored


class StoreUnavailable(Exception):
    """The store cannot take the operation now (down, or its work queue is full).
    Nothing was written; the caller reports UNAVAILABLE and the sender retries."""


class AlreadyExists(Exception):
    """A device or topic with that name exists."""


class NotFound(Exception):
    """No device or topic with that name."""


class Store(abc.ABC):
    """Registry plus offline queues. Every method is safe to call from the event loop:
    implementations never block it."""

    # -- lifecycle -------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create tables/indexes. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued writes and release the connection."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def on_registry_change(self, callback: Callable[[], None]) -> None:  # noqa: B027
        """Ask to be called (on the event loop) when devices, topics or members may
        have been changed by another process (the CLI, another node). Optional."""

    # -- devices ---------------------------------------------------------------
    @abc.abstractmethod
    async def add_device(self, device: DeviceRecord) -> None:
        """Raises AlreadyExists."""

    @abc.abstractmethod
    async def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    async def list_devices(self) -> list[DeviceRecord]:
        """Sorted by id."""

    @abc.abstractmethod
    async def revoke_device(self, device_id: str, at_ms: int) -> None:
        """Raises NotFound. Revoking twice keeps the first time."""

    @abc.abstractmethod
    async def set_credentials(
        self, device_id: str, token_hash: bytes, public_key: str, psk: str | None = None
    ) -> None:
        """Replace token hash and public key (``device rotate``), and the sealed
        pre-shared key unless ``psk`` is None; stamps ``rotated_ms`` with the time.
        Raises NotFound."""

    @abc.abstractmethod
    async def revoked_since(self, since_ms: int) -> list[str]:
        """Ids of devices revoked at or after ``since_ms``."""

    @abc.abstractmethod
    async def rotated_since(self, since_ms: int) -> list[tuple[str, int]]:
        """(id, rotated_ms) of devices whose credentials were replaced at or after
        ``since_ms``: their sessions logged in before that must end."""

    # -- topics ----------------------------------------------------------------
    @abc.abstractmethod
    async def create_topic(self, topic: TopicRecord) -> None:
        """Creates the topic with ``topic.members`` (the owner is added as a member when
        it is a device id). Raises AlreadyExists."""

    @abc.abstractmethod
    async def get_topic(self, name: str) -> TopicRecord | None:
        """With its members."""

    @abc.abstractmethod
    async def list_topics(self) -> list[TopicRecord]:
        """Sorted by name, with members."""

    @abc.abstractmethod
    async def add_member(self, name: str, device_id: str) -> bool:
        """False if it was a member already. Raises NotFound for an unknown topic."""

    @abc.abstractmethod
    async def remove_member(self, name: str, device_id: str) -> bool:
        """False if it was not a member. Raises NotFound for an unknown topic."""

    # -- offline queues --------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, envelopes: Sequence[Envelope], max_len: int) -> list[Enqueued]:
        """Durably store each envelope in its recipient's queue, atomically for the
        batch, and return one result per envelope in order. A queue holding
        ``max_len`` messages takes no more (FULL). Raises StoreUnavailable."""

    @abc.abstractmethod
    async def pending(self, device_id: str, after_okey: int, limit: int) -> list[Envelope]:
        """Queued envelopes of the device with okey > after_okey, in okey order."""

    @abc.abstractmethod
    async def ack(self, device_id: str, ids: Sequence[str]) -> int:
        """Remove the device's queued messages with these ids; returns how many went."""

    @abc.abstractmethod
    async def queue_depth(self, device_id: str) -> int: ...

    @abc.abstractmethod
    async def queue_depths(self) -> dict[str, int]:
        """Depth of every non-empty queue."""

    @abc.abstractmethod
    async def purge_expired(self, older_than_ms: int) -> int:
        """Drop queued messages stored before ``older_than_ms``; returns how many."""
