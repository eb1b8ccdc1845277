"""A bare MQTT 3.1.1 client on asyncio streams, for what client libraries will not do:
write a burst and a DISCONNECT in one segment, go silent with the socket open, read
exactly the packets the broker sends (PUBACKs included)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    1,
    2,
    3,
    4,
    8,
    9,
    12,
    13,
    14,
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + _varint(len(body)) + body


def connect_packet(
    client_id: str, username: str | None, password: str | None, keepalive: int, clean: bool = True
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    body = _str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return packet(CONNECT, 0, body)


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 0) -> bytes:
    body = _str(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return packet(PUBLISH, qos << 1, body)


def subscribe_packet(topic: str, qos: int, pid: int) -> bytes:
    return packet(SUBSCRIBE, 0x02, pid.to_bytes(2, "big") + _str(topic) + bytes([qos]))


def puback_packet(pid: int) -> bytes:
    return packet(PUBACK, 0, pid.to_bytes(2, "big"))


DISCONNECT_PACKET = packet(DISCONNECT, 0, b"")
PINGREQ_PACKET = packet(PINGREQ, 0, b"")


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def topic(self) -> str:
        n = int.from_bytes(self.body[:2], "big")
        return self.body[2 : 2 + n].decode()

    @property
    def payload(self) -> bytes:
        n = int.from_bytes(self.body[:2], "big")
        return self.body[2 + n + (2 if self.qos else 0) :]

    @property
    def pid(self) -> int:
        if self.type == PUBLISH:
            n = int.from_bytes(self.body[:2], "big")
            return int.from_bytes(self.body[2 + n : 4 + n], "big")
        return int.from_bytes(self.body[:2], "big")


class RawMqtt:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, addr: str) -> RawMqtt:
        host, _, port = addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls,
        addr: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
    ) -> tuple[RawMqtt, int]:
        """Connect; returns the client and the CONNACK return code."""
        c = await cls.open(addr)
        c.write(connect_packet(client_id, username, password, keepalive))
        ack = await c.read_packet(10)
        assert ack is not None and ack.type == CONNACK, ack
        return c, ack.body[1]

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def subscribe(self, topic: str, qos: int = 1, pid: int = 1) -> int:
        """Subscribe; returns the granted QoS (0x80: refused). Packets before the
        SUBACK are dropped."""
        self.write(subscribe_packet(topic, qos, pid))
        while True:
            p = await self.read_packet(10)
            assert p is not None, "closed before SUBACK"
            if p.type == SUBACK:
                return p.body[2]

    async def read_packet(self, timeout: float = 10.0) -> Packet | None:
        """The next packet, or None at EOF."""
        try:
            async with asyncio.timeout(timeout):
                first = await self.reader.readexactly(1)
                n, shift = 0, 0
                while True:
                    b = (await self.reader.readexactly(1))[0]
                    n |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return Packet(first[0] >> 4, first[0] & 0x0F, body)

    async def read_all(self, timeout: float = 15.0) -> list[Packet]:
        """Every packet until the broker closes the connection."""
        out: list[Packet] = []
        async with asyncio.timeout(timeout):
            while (p := await self.read_packet(timeout)) is not None:
                out.append(p)
        return out

    async def closed_by_peer(self, timeout: float) -> bool:
        """True once the broker closes the connection (answering nothing we send)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.read_packet(timeout) is not None:
                    pass
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError):
            pass
