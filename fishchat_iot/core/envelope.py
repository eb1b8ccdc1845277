"""The one message envelope every transport is converted to and from (DESIGN section 2)."""

from __future__ import annotations

from dataclasses import dataclass

KIND_P2P = "p2p"
KIND_TOPIC = "topic"
KIND_POKE = "poke"  # no message: "read this device's offline queue again" (roles/router.py)


@dataclass(slots=True)
class Envelope:
    """A message on its way to one recipient device.

    ``body`` is text: plaintext for v1 sessions, base64 of the sealed body for
    end-to-end sessions. The server never looks inside it.

    ``okey`` is the server's order key, assigned once when the message is accepted
    (strictly increasing per accepting node); offline queues are read in ``okey``
    order, which keeps every sender->receiver pair in order.
    """

    id: str  # sender-chosen id (server-chosen for v1 senders); a retry keeps it
    sender: str  # authenticated device id of the sender, never taken from the device
    to: str  # recipient device id
    body: str
    ts: int  # sender timestamp, ms
    okey: int  # server order key
    kind: str = KIND_P2P
    topic: str = ""  # topic name for kind == "topic"
    enc: str = "none"  # how body is sealed, with the key epoch
