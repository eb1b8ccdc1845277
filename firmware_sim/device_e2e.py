"""End-to-end encryption on the device side, for every SDK (``DeviceBase`` mixes it in):
opening sealed deliveries, holding deliveries while a sender's key is fetched, and the
topic keys a topic's owner hands out. docs/crypto.md is the construction."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from firmware_sim.device_types import NO_KEY, NOT_SUPPORTED, DeviceError, Message
from fishchat_iot.crypto.device import DeviceCrypto, PskCrypto
from fishchat_iot.crypto.seal import ENC_PSK, CryptoError, b64d


class _E2E:
    """End-to-end encryption for the device SDKs (:class:`DeviceBase`): the
    opening of sealed deliveries, the deliveries held while a key is fetched, the topic
    keys an owner hands out. docs/crypto.md is the construction."""

    _log: ClassVar[logging.Logger]  # the SDK's own logger
    device_id: str
    crypto: DeviceCrypto | None
    psk: PskCrypto | None
    key_wait: float
    opened: int
    open_failed: int
    topic_keys_received: int
    _closing: bool
    _seen: collections.OrderedDict[tuple[str, str], bool]
    _acks: list[str]
    _held: dict[tuple[str, str], list[tuple[Message, str]]]
    _held_timers: dict[tuple[str, str], asyncio.TimerHandle]
    _topic_owners: dict[str, str]

    def _init_e2e(
        self, private_key: str | bytes | None, key_wait: float, psk: str | bytes | None = None
    ) -> None:
        self.crypto = None
        if private_key:
            raw = b64d(private_key) if isinstance(private_key, str) else private_key
            self.crypto = DeviceCrypto(self.device_id, raw)
        # Gateway-terminated mode (docs/crypto.md section 7): the pre-shared key.
        self.psk = None
        if psk:
            self.psk = PskCrypto(self.device_id, b64d(psk) if isinstance(psk, str) else psk)
        self.key_wait = key_wait
        # Sealed deliveries waiting for a key (a peer's public key, a topic epoch key),
        # unacked: ("peer", id) / ("topic", "name:epoch") -> [(message, enc)].
        self._held = {}
        self._held_timers = {}
        self.opened = 0  # sealed messages opened
        self.open_failed = 0  # sealed messages that did not open (tampered, no key): dropped
        self.topic_keys_received = 0
        self.topic_keys_refused = 0  # topic keys from a device that does not own the topic
        # topic -> its owner's device id: topic keys are taken from the owner only.
        self._topic_owners = {}

    def _clear_held(self) -> None:
        """A new session: held deliveries were not acked, the server sends them again."""
        for timer in self._held_timers.values():
            timer.cancel()
        self._held_timers.clear()
        self._held.clear()

    # -- what the SDK provides ---------------------------------------------------
    async def send(self, to: str, text: str, *, id: str | None = None, e2e: bool = True) -> str:
        raise NotImplementedError

    async def _deliver(self, msg: Message) -> None:
        raise NotImplementedError

    def _flush_acks(self) -> None:
        raise NotImplementedError

    def _ask_public_key(self, device_id: str) -> None:
        """Ask the server for a public key without waiting (the answer comes in order
        with the deliveries and ends in ``_got_public_key``)."""
        raise NotImplementedError

    def _ask_topic_owner(self, topic: str) -> bool:
        """Ask the server who owns ``topic`` without waiting (the answer ends in
        ``_got_topic_owner``); False when this transport cannot ask."""
        return False

    # -- topic owners ----------------------------------------------------------------
    def set_topic_owner(self, topic: str, owner: str) -> None:
        """Pin the owner of ``topic`` (from provisioning, say): topic keys are then taken
        from ``owner`` only, without asking the server. A device that creates a topic
        is its owner; otherwise the SDK asks the server (``GET_TOPIC_OWNER``) the first
        time a key for the topic arrives."""
        self._topic_owners[topic] = owner

    # -- topic keys --------------------------------------------------------------
    async def share_topic_key(self, topic: str, members: Sequence[str]) -> int:
        """Topic owner: start a new key epoch for ``topic`` (a fresh random group key)
        and hand it to every member, sealed under each pairwise key. Call it when the
        topic is created and whenever a member leaves or is removed (with the members
        that remain): the removed member cannot open anything sealed afterwards.
        Returns the new epoch."""
        if self.crypto is None:
            raise DeviceError(NOT_SUPPORTED, "end-to-end encryption is off (no private key)")
        epoch, _ = self.crypto.new_topic_epoch(topic)
        for member in members:
            if member != self.device_id:
                await self.send_topic_key(topic, member)
        return epoch

    async def send_topic_key(self, topic: str, member: str) -> str:
        """Hand the current key of ``topic`` to one member (a late joiner)."""
        if self.crypto is None:
            raise DeviceError(NOT_SUPPORTED, "end-to-end encryption is off (no private key)")
        try:
            control = self.crypto.topic_key_control(topic)
        except CryptoError as exc:
            raise DeviceError(NO_KEY, str(exc), topic) from None
        return await self.send(member, control)

    # -- internals: end-to-end -------------------------------------------------
    async def _deliver_sealed(self, msg: Message, enc: str) -> None:
        """Open a sealed delivery and hand its plaintext on. One that does not open
        (flipped bit, moved to another recipient, wrong key) is acked and dropped,
        counted in ``open_failed``; a replayed id is absorbed by the dedupe as always."""
        if self._closing:
            return
        if enc == ENC_PSK:
            await self._deliver_psk(msg, enc)
            return
        key = (msg.sender, msg.id)
        crypto = self.crypto
        if key in self._seen or crypto is None:
            if crypto is None:
                self._reject(msg, "end-to-end encryption is off (no private key)")
            else:
                await self._deliver(msg)  # a duplicate: acked again, not delivered
            return
        hold: tuple[str, str] | None = None
        if msg.kind == "topic":
            epoch = enc.rpartition(":")[2]
            if (
                epoch.isdigit()
                and int(epoch) not in crypto.group_keys.get(msg.topic, {})
                and int(epoch) > crypto.current_epoch.get(msg.topic, 0)
            ):
                hold = ("topic", f"{msg.topic}:{epoch}")  # its key may be on its way
        elif msg.sender not in crypto.peers:
            hold = ("peer", msg.sender)  # ask the server for the sender's public key
        if hold is not None:
            self._hold(hold, msg, enc)
            return
        try:
            opened = crypto.open(
                sender=msg.sender,
                msg_id=msg.id,
                body=msg.text,
                enc=enc,
                topic=msg.topic,
                apply_control=False,
            )
        except CryptoError as exc:
            self._reject(msg, str(exc))
            return
        self.opened += 1
        if opened.control is not None:
            # A topic key: consumed by the SDK, never on the inbox, and taken only from
            # the topic's owner (anyone can seal a p2p message to a member).
            ctl = opened.control
            topic = str(ctl["topic"])
            owner = self._topic_owners.get(topic)
            if owner is None:
                if ("owner", topic) in self._held or self._ask_topic_owner(topic):
                    self.opened -= 1  # opened again once the owner is known
                    self._hold(("owner", topic), msg, enc)
                    return
                owner = ""  # cannot be asked and not pinned: nobody's key is taken
            self._seen[key] = True
            self._acks.append(msg.id)
            if msg.sender != owner:
                self.topic_keys_refused += 1
                self._log.warning(
                    "%s: ignored a key for topic %r from %s, which does not own it (owner: %s)",
                    self.device_id,
                    topic,
                    msg.sender,
                    owner or "unknown",
                )
                return
            crypto.apply_control(ctl)
            self.topic_keys_received += 1
            await self._release(("topic", f"{topic}:{ctl['epoch']}"))
            return
        await self._deliver(replace(msg, text=opened.text, enc=enc))

    async def _deliver_psk(self, msg: Message, enc: str) -> None:
        """A delivery the gateway sealed under this device's pre-shared key."""
        if (msg.sender, msg.id) in self._seen:
            await self._deliver(msg)  # a duplicate: acked again, not delivered
            return
        if self.psk is None:
            self._reject(msg, "sealed under a pre-shared key this device does not have")
            return
        try:
            text = self.psk.open(sender=msg.sender, msg_id=msg.id, body=msg.text, topic=msg.topic)
        except CryptoError as exc:
            self._reject(msg, str(exc))
            return
        self.opened += 1
        await self._deliver(replace(msg, text=text, enc=enc))

    def _reject(self, msg: Message, why: str) -> None:
        self.open_failed += 1
        self._log.warning(
            "%s: dropped sealed message %r from %s: %s", self.device_id, msg.id, msg.sender, why
        )
        self._acks.append(msg.id)

    def _hold(self, hkey: tuple[str, str], msg: Message, enc: str) -> None:
        held = self._held.get(hkey)
        if held is None:
            held = self._held[hkey] = []
            loop = asyncio.get_running_loop()
            self._held_timers[hkey] = loop.call_later(
                self.key_wait, self._drop_held, hkey, "no key in time"
            )
            if hkey[0] == "peer":
                self._ask_public_key(hkey[1])
        held.append((msg, enc))

    def _drop_held(self, hkey: tuple[str, str], why: str) -> None:
        timer = self._held_timers.pop(hkey, None)
        if timer is not None:
            timer.cancel()
        for msg, _ in self._held.pop(hkey, []):
            self._reject(msg, why)
        self._flush_acks()

    async def _release(self, hkey: tuple[str, str]) -> None:
        timer = self._held_timers.pop(hkey, None)
        if timer is not None:
            timer.cancel()
        for msg, enc in self._held.pop(hkey, []):
            await self._deliver_sealed(msg, enc)

    async def _got_topic_owner(self, topic: str, owner: str) -> None:
        """The server named the owner of a topic: decide on the keys that waited."""
        self._topic_owners.setdefault(topic, owner)
        await self._release(("owner", topic))

    async def _got_public_key(self, device_id: str, b64: str) -> None:
        """A peer's public key arrived: cache it, then open what waited for it."""
        if self.crypto is not None and b64:
            try:
                self.crypto.add_peer(device_id, b64d(b64))
            except CryptoError:
                self._log.warning("%s: bad public key of %s", self.device_id, device_id)
        if self.crypto is not None and device_id not in self.crypto.peers:
            self._drop_held(("peer", device_id), "sender has no public key")
        else:
            await self._release(("peer", device_id))
