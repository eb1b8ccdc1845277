"""amqtt plugins of the embedded broker: authentication against the device registry and
the topic ACL. amqtt loads them by dotted path and builds them itself; the broker binds
them to the running ``EmbeddedMqtt`` right after (``bind``).

- ``RegistryAuthPlugin``: client id = username = a registered, unrevoked device id, and
  password = its token. Anything else gets CONNACK "not authorized".
- ``TopicAclPlugin``: a device publishes only under ``fc/{its id}/`` and subscribes only
  to ``fc/{its id}/in``. One string comparison: it runs on every subscribe here, and the
  same check (``may_publish``) runs inline on every publish (see ``broker.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session as AmqttSession

from device_adapters.mqtt import codec

if TYPE_CHECKING:
    from device_adapters.mqtt.broker import EmbeddedMqtt


def may_publish(client_id: str, topic: str) -> bool:
    return topic.startswith(codec.prefix(client_id))


def may_subscribe(client_id: str, topic_filter: str) -> bool:
    return topic_filter == codec.inbox(client_id)


class RegistryAuthPlugin(BaseAuthPlugin):
    edge: EmbeddedMqtt | None = None

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: AmqttSession) -> bool:
        if self.edge is None:
            return False
        return await self.edge.authenticate(session)


class TopicAclPlugin(BaseTopicPlugin):
    edge: EmbeddedMqtt | None = None

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self,
        *,
        session: AmqttSession | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or not session.client_id or topic is None:
            return False
        if action == Action.PUBLISH:
            return may_publish(session.client_id, topic)
        return may_subscribe(session.client_id, topic)  # SUBSCRIBE, RECEIVE

    async def on_broker_client_unsubscribed(self, *, client_id: str, topic: str) -> None:
        if self.edge is not None:
            self.edge.unsubscribed(client_id, topic)
