"""What both MQTT modes do with a device's publishes under ``fc/{id}/``: decode them
(``codec``) and call ``MsgServer``, strictly one after the other. A command that must
wait for the store (a topic operation, a send to a topic not cached yet) holds the
device's later publishes until it is done, as the TCP adapter holds later frames, so a
device's commands take effect in the order it sent them (join, then send to the topic;
a topic message, then a p2p one)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from device_adapters.mqtt import codec
from device_adapters.mqtt.codec import BadEnvelope, Uplink
from fishchat_iot import errors
from fishchat_iot.core.session import Session
from fishchat_iot.roles.msg_server import MsgServer
from fishchat_iot.stores.base import StoreUnavailable

log = logging.getLogger("fishchat.mqtt")

LOGGED_BAD_INPUTS = 20  # per session, bad publishes logged at WARNING; later ones at DEBUG


class UplinkSession(Session):
    """A ``Session`` fed by MQTT publishes. Subclasses set ``server``, ``prefix`` and
    ``max_payload``, emit in their own way, and answer ``hello`` / ``bye`` / ``ping``."""

    server: MsgServer
    max_payload: int

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.prefix = codec.prefix(device_id)
        self.held: collections.deque[tuple[str, bytes | bytearray, int]] = collections.deque()
        self.waiting = False
        self.bad_inputs = 0

    def on_publish(self, topic: str, data: bytes | bytearray, qos: int) -> None:
        """One PUBLISH of the device, in the order it sent them."""
        if self.waiting:
            self.held.append((topic, data, qos))  # bounded: input is paused meanwhile
            return
        task = self._handle(topic, data, qos)
        if task is not None and not task.done():
            self.waiting = True
            self.pause_input()
            task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[Any]) -> None:
        self.waiting = False
        try:
            while self.held and not self.waiting:
                self.on_publish(*self.held.popleft())
        finally:
            self.resume_input()

    def _handle(self, topic: str, data: bytes | bytearray, qos: int) -> asyncio.Task[Any] | None:
        try:
            kind, target = codec.split_topic(topic, self.prefix)
            up = codec.parse_uplink(kind, target, bytes(data), self.max_payload)
        except BadEnvelope as exc:
            self.bad_input(exc)
            return None
        server = self.server
        if kind == "p2p":
            self.send_p2p(up, qos)
        elif kind == "topic":
            return self.send_topic(up, qos)
        elif kind == "ack":
            assert up.ids is not None
            server.ack(self, up.ids)
        elif up.op == "create_topic":
            return server.spawn(server.create_topic(self, up.target), "create-topic")
        elif up.op == "join_topic":
            return server.spawn(server.join_topic(self, up.target), "join-topic")
        elif up.op == "leave_topic":
            return server.spawn(server.leave_topic(self, up.target), "leave-topic")
        elif up.op == "public_key":
            return server.spawn(self._public_key(up.target), "public-key")
        elif up.op == "topic_owner":
            return server.spawn(self._topic_owner(up.target), "topic-owner")
        else:
            return self.control(up)
        return None

    # -- what subclasses may change -------------------------------------------------------
    def send_p2p(self, up: Uplink, qos: int) -> None:
        self.server.send_p2p(self, up.target, up.body, up.id, up.enc)

    def send_topic(self, up: Uplink, qos: int) -> asyncio.Task[Any] | None:
        return self.server.send_topic(self, up.target, up.body, up.id, up.enc)

    def emit_payload(self, payload: bytes) -> None:
        """Publish one inbox envelope built by ``codec`` (the public-key answer)."""
        raise NotImplementedError

    async def _public_key(self, device_id: str) -> None:
        """ctl ``public_key``: ``{"kind": "ok", "op": "public_key", "device": id, "key": b64}``
        (``"key": ""`` when the device has none), or an UNKNOWN_DEVICE error."""
        try:
            key = await self.server.public_key(device_id)
        except StoreUnavailable:
            self.emit_error(errors.UNAVAILABLE, "registry unavailable, retry later", device_id)
        else:
            if key is None:
                self.emit_error(errors.UNKNOWN_DEVICE, f"no device {device_id!r}", device_id)
            else:
                self.emit_payload(codec.ok("public_key", device=device_id, key=key))
        self.mark_dirty()

    async def _topic_owner(self, name: str) -> None:
        """ctl ``topic_owner``: ``{"kind": "ok", "op": "topic_owner", "topic": name,
        "owner": id}`` for a member, else UNKNOWN_TOPIC / NOT_A_MEMBER."""
        owner = await self.server.topic_owner(self, name)
        if owner is not None:
            self.emit_payload(codec.ok("topic_owner", name, owner=owner))
        self.mark_dirty()

    def control(self, up: Uplink) -> asyncio.Task[Any] | None:
        """``hello``, ``bye``, ``ping``: answered ``ok`` unless the mode does more."""
        self.emit_ok(up.op, "")
        self.mark_dirty()
        return None

    def bad_input(self, exc: BadEnvelope) -> None:
        """Told on the inbox; nothing else happens (the connection stays)."""
        self.bad_inputs += 1
        level = logging.WARNING if self.bad_inputs <= LOGGED_BAD_INPUTS else logging.DEBUG
        log.log(level, "bad publish from %s: %s: %s", self.device_id, exc.code, exc.text)
        self.emit_error(exc.code, exc.text, exc.ref)
        self.mark_dirty()
