"""MQTT 3.1.1 packets the gateway writes itself: PUBLISH, built straight into a session's
output ``bytearray`` (one ``transport.write`` per session per event-loop turn, the way
the TCP adapter writes; amqtt's own path costs a task and a drain per packet)."""

from __future__ import annotations


def append_publish(out: bytearray, topic: bytes, payload: bytes, qos: int, packet_id: int) -> None:
    """Append one PUBLISH (no DUP, no RETAIN). ``packet_id`` is ignored at QoS 0."""
    remaining = 2 + len(topic) + len(payload) + (2 if qos else 0)
    out.append(0x30 | (qos << 1))
    while True:
        byte = remaining & 0x7F
        remaining >>= 7
        if remaining:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    out += len(topic).to_bytes(2, "big")
    out += topic
    if qos:
        out += packet_id.to_bytes(2, "big")
    out += payload
