"""MQTT workloads for the benchmark (from ``tests/mqtt/bench_mqtt.py``):

* ``pubsub_paho`` — plain pub→sub on a broker: one paho publisher, one paho subscriber
  (each with its network thread), ``count`` messages on one topic, QoS 0 or 1.
* ``gateway_paho`` — p2p through the gateway's embedded broker: device ``alice``
  publishes envelopes on ``fc/alice/p2p/bob`` (QoS 1) and counts her receipts; ``bob``
  counts deliveries on ``fc/bob/in`` and acks them (every 100 ids).
* ``pubsub_mosquitto_c`` — Mosquitto's own C clients: ``mosquitto_sub -C N -F '%U %p'``
  and ``mosquitto_pub -l`` fed lines from here (one message a line).
* ``idle`` — raw MQTT CONNECTs (no client library) left open, for memory per connection.

Latency: from the publish call (or, for the C clients, the write of the line's chunk to
``mosquitto_pub``) to the subscriber's callback (or ``mosquitto_sub``'s receive stamp).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time
from array import array
from typing import Any

import orjson


def _client(cid: str, addr: str, user: str = "", password: str = "") -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = addr.rpartition(":")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    if user:
        c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(host, int(port), keepalive=60)
    return c


def _subscribe(c: Any, topic: str, qos: int) -> None:
    ready = threading.Event()
    c.on_subscribe = lambda *a: ready.set()
    c.subscribe(topic, qos=qos)
    c.loop_start()
    if not ready.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")


STALL = 5.0  # seconds without a new delivery after the last publish: the rest is lost


def _wait(done: threading.Event, progress: Any, timeout: float) -> None:
    """Until ``done``, ``timeout``, or ``STALL`` seconds in which ``progress()`` (a
    count) did not move."""
    deadline = time.monotonic() + timeout
    last, moved = progress(), time.monotonic()
    while not done.wait(0.2):
        now = time.monotonic()
        value = progress()
        if value != last:
            last, moved = value, now
        if now > deadline or now - moved > STALL:
            return


def _stop(*clients: Any) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            c.disconnect()
            c.loop_stop()


def pubsub_paho(
    addr: str, count: int, payload: int, qos: int, timeout: float, on_start: Any = None
) -> dict[str, Any]:
    got = 0
    dups = 0
    seen = bytearray(count)
    sent_at = array("d", bytes(8 * count))
    lat: array[float] = array("d")
    done = threading.Event()
    lock = threading.Lock()

    def on_message(c: Any, u: object, m: Any) -> None:
        nonlocal got, dups
        now = time.perf_counter()
        i = int(orjson.loads(m.payload)["id"])
        with lock:
            if seen[i]:
                dups += 1
                return
            seen[i] = 1
            got += 1
            lat.append(now - sent_at[i])
            if got == count:
                done.set()

    sub = _client("bench-sub", addr)
    sub.on_message = on_message
    pub = None
    try:
        _subscribe(sub, "bench/t", qos)
        pub = _client("bench-pub", addr)
        pub.loop_start()
        body = "x" * payload
        payloads = [orjson.dumps({"id": str(i), "body": body}) for i in range(count)]
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        for i in range(count):
            sent_at[i] = time.perf_counter()
            pub.publish("bench/t", payloads[i], qos=qos)
        _wait(done, lambda: got, timeout)
        elapsed = time.perf_counter() - t0
    finally:
        _stop(sub, *([pub] if pub is not None else []))
    return {"delivered": got, "duplicates": dups, "seconds": elapsed, "latencies": lat}


def gateway_paho(
    addr: str, token: str, count: int, payload: int, timeout: float, on_start: Any = None
) -> dict[str, Any]:
    delivered = receipts = dups = 0
    seen = bytearray(count)
    sent_at = array("d", bytes(8 * count))
    lat: array[float] = array("d")
    done = threading.Event()
    acks: list[str] = []

    def finished() -> None:
        if delivered == count and receipts == count:
            done.set()

    def on_delivery(c: Any, u: object, m: Any) -> None:
        nonlocal delivered, dups
        now = time.perf_counter()
        doc = orjson.loads(m.payload)
        if doc.get("kind") != "p2p":
            return
        acks.append(doc["id"])
        i = int(doc["id"])
        if seen[i]:
            dups += 1
        else:
            seen[i] = 1
            delivered += 1
            lat.append(now - sent_at[i])
        if len(acks) >= 100 or delivered == count:
            c.publish("fc/bob/ack", orjson.dumps({"ids": acks}), qos=1)
            acks.clear()
        finished()

    def on_receipt(c: Any, u: object, m: Any) -> None:
        nonlocal receipts
        if orjson.loads(m.payload).get("kind") == "accepted":
            receipts += 1
        finished()

    sub = _client("bob", addr, "bob", token)
    sub.on_message = on_delivery
    pub = None
    try:
        _subscribe(sub, "fc/bob/in", 1)
        pub = _client("alice", addr, "alice", token)
        pub.on_message = on_receipt
        _subscribe(pub, "fc/alice/in", 1)
        body = "x" * payload
        payloads = [orjson.dumps({"id": str(i), "body": body}) for i in range(count)]
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        for i in range(count):
            sent_at[i] = time.perf_counter()
            pub.publish("fc/alice/p2p/bob", payloads[i], qos=1)
        _wait(done, lambda: delivered + receipts, timeout)
        elapsed = time.perf_counter() - t0
    finally:
        _stop(sub, *([pub] if pub is not None else []))
    return {
        "delivered": delivered,
        "receipts": receipts,
        "duplicates": dups,
        "seconds": elapsed,
        "latencies": lat,
    }


def c_clients_available() -> bool:
    return bool(shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub"))


def pubsub_mosquitto_c(
    addr: str, count: int, payload: int, timeout: float, on_start: Any = None
) -> dict[str, Any]:
    """QoS 0 through Mosquitto with ``mosquitto_pub -l`` / ``mosquitto_sub``."""
    host, _, port = addr.rpartition(":")
    sub = subprocess.Popen(
        [
            *("mosquitto_sub", "-h", host, "-p", port, "-t", "bench/t", "-q", "0"),
            *("-C", str(count), "-F", "%U %p", "-i", "bench-csub"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(sub.communicate()[0]), daemon=True)
    reader.start()
    time.sleep(0.3)  # subscribed (nothing retained: a late subscriber would just lose)
    pub = subprocess.Popen(
        [
            *("mosquitto_pub", "-h", host, "-p", port, "-t", "bench/t", "-q", "0", "-l"),
            *("-i", "bench-cpub"),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert pub.stdin is not None
    width = max(payload, 12)
    lines = [f"{i:010d} ".ljust(width, "x").encode() + b"\n" for i in range(count)]
    sent_at = array("d", bytes(8 * count))
    chunk = 500
    try:
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        for k in range(0, count, chunk):
            now = time.time()
            for i in range(k, min(count, k + chunk)):
                sent_at[i] = now
            pub.stdin.write(b"".join(lines[k : k + chunk]))
            pub.stdin.flush()
        reader.join(timeout)
        elapsed = time.perf_counter() - t0
    finally:
        with contextlib.suppress(OSError):
            pub.stdin.close()
        for p in (pub, sub):
            if p.poll() is None:
                p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        reader.join(5)
    seen = bytearray(count)
    got = dups = 0
    lat: array[float] = array("d")
    last = 0.0
    for line in (out[0] if out else b"").splitlines():
        stamp, _, text = line.partition(b" ")
        try:
            i = int(text[:10])
            at = float(stamp)
        except ValueError:
            continue
        if not 0 <= i < count:
            continue
        if seen[i]:
            dups += 1
            continue
        seen[i] = 1
        got += 1
        lat.append(max(0.0, at - sent_at[i]))
        last = max(last, at)
    # Until the last message arrived (mosquitto_sub's own stamp), not the reader's join.
    first_sent = sent_at[0] if count else 0.0
    if got and last > first_sent:
        elapsed = min(elapsed, last - first_sent)
    return {"delivered": got, "duplicates": dups, "seconds": elapsed, "latencies": lat}


# -- idle connections -------------------------------------------------------------------


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, user: str = "", password: str = "", keepalive: int = 0) -> bytes:
    flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
    var = _utf8("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    body = (
        var
        + _utf8(client_id)
        + (_utf8(user) if user else b"")
        + (_utf8(password) if password else b"")
    )
    n = len(body)
    length = bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([0x10]) + bytes(length) + body


class _Idle(asyncio.Protocol):
    def __init__(self, packet: bytes) -> None:
        self.packet = packet
        self.connacked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.packet)

    def data_received(self, data: bytes) -> None:
        if not self.connacked.done():
            if len(data) >= 4 and data[0] == 0x20 and data[3] == 0:
                self.connacked.set_result(None)
            else:
                self.connacked.set_exception(ConnectionError(f"CONNACK {data[:4]!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connacked.done():
            self.connacked.set_exception(ConnectionError("closed before CONNACK"))


async def idle(
    addr: str, count: int, token: str = "", ids: list[str] | None = None, keepalive: int = 0
) -> list[Any]:
    """``count`` MQTT connections (anonymous, or ``ids`` with ``token``), CONNACKed."""
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(50)  # amqtt drops connections it cannot answer in time
    names = ids or [f"idle-{os.getpid()}-{i}" for i in range(count)]

    async def one(cid: str) -> Any:
        packet = connect_packet(cid, cid if token else "", token, keepalive)
        async with sem:
            _, proto = await loop.create_connection(lambda: _Idle(packet), host, int(port))
            await proto.connacked
            return proto.transport

    return await asyncio.gather(*(one(n) for n in names[:count]))
