"""A fleet of simulated devices (DESIGN §7): N devices over TCP, MQTT, serial
(pseudo-terminals through an in-process serial adapter) or a mix, running a scenario at
a fixed total rate for a while, with the simulator's own bookkeeping::

    endpoints = Endpoints(gateways=["127.0.0.1:17000"], mqtt="127.0.0.1:1883")
    cfg = FleetConfig(devices=200, transport="mixed", scenario="offline", rate=500, duration=5)
    report = await run_fleet(cfg, endpoints, tokens)   # tokens: device id -> token

Scenarios:

* ``p2p`` — every message goes from a device to another one picked at random.
* ``topic`` — devices are in groups of ``topic_size``; each group has an open topic
  (created by its first member, joined by the others) and every message is published to
  the sender's group: one publish, ``topic_size - 1`` deliveries.
* ``offline`` — p2p, and every fourth device goes offline once (its session closed,
  then a new one opened with the same credentials) for 30 % of the run: what was sent
  to it meanwhile waits in its queue. Another fourth loses its connection once (aborted
  as a network failure would; the SDK reconnects): what it had received without acking
  comes again, a duplicate its dedupe absorbs (counted).
* ``mixed`` — two p2p messages for each topic message, with the offline periods.

Loss is counted here, from ids: every accepted message is expected at each of its
recipients (by ``(sender, id)``) and is lost if it has not arrived there ``wait``
seconds after the last send. Duplicates absorbed = the SDKs' dedupe counters plus the
repeats the simulator saw itself (a device that reconnects starts a new dedupe table).
Latency is from the call to ``send``/``publish`` to the first delivery, in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import sys
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

TRANSPORTS = ("tcp", "mqtt", "serial", "mixed")
SCENARIOS = ("p2p", "topic", "offline", "mixed")
MAX_OUTSTANDING_PER_DEVICE = 20  # sends waiting for their receipt, per device
# pyserial's posix ports wait with select(): every fd must stay below 1024. A serial
# device takes 5 fds here (its port and pyserial's cancel pipes), 9 in the serial host
# (two ptys, the adapter's port and its pipes); MQTT devices (paho, select()) 3.
MAX_SERIAL_DEVICES = 100


@dataclass
class Endpoints:
    gateways: list[str] = field(default_factory=list)
    msg_servers: list[str] = field(default_factory=list)
    mqtt: str = ""  # the MQTT broker (embedded or external), for MQTT devices


@dataclass
class FleetConfig:
    devices: int = 10
    transport: str = "tcp"
    scenario: str = "p2p"
    rate: float = 100.0  # messages (sends or publishes) per second, whole fleet
    duration: float = 5.0  # seconds of sending
    wait: float = 10.0  # seconds after the last send for deliveries to arrive
    payload: int = 64  # bytes of text per message (at least the id part)
    topic_size: int = 5
    seed: int | None = None
    e2e: bool = False  # seal every message end to end (p2p scenarios; keys passed in)


def transport_of(cfg: FleetConfig, index: int) -> str:
    if cfg.transport != "mixed":
        return cfg.transport
    return ("tcp", "mqtt", "serial")[index % 3]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class FleetReport:
    devices: int
    transports: dict[str, int]
    scenario: str
    rate: float
    duration: float
    sent: int = 0  # sends and publishes attempted
    accepted: int = 0
    refused: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    expected: int = 0  # deliveries the accepted messages call for
    delivered: int = 0  # distinct deliveries seen
    duplicates: int = 0
    sealed: int = 0  # deliveries that arrived sealed end to end (and were opened)
    lost_ids: list[str] = field(default_factory=list)
    offline_periods: int = 0
    connection_drops: int = 0
    skipped: int = 0  # sends not issued: too many waiting for receipts (backpressure)
    elapsed: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    def latency(self) -> dict[str, float]:
        values = sorted(self.latencies_ms)
        return {f"p{q}": round(percentile(values, q), 3) for q in (50, 95, 99)}

    def as_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "transports": self.transports,
            "scenario": self.scenario,
            "rate": self.rate,
            "duration": self.duration,
            "sent": self.sent,
            "accepted": self.accepted,
            "refused": self.refused,
            "refusals": self.refusals,
            "expected_deliveries": self.expected,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "sealed": self.sealed,
            "lost": self.lost,
            "lost_ids": self.lost_ids[:100],
            "offline_periods": self.offline_periods,
            "connection_drops": self.connection_drops,
            "skipped": self.skipped,
            "elapsed_s": round(self.elapsed, 3),
            "latency_ms": self.latency(),
        }

    def summary(self) -> str:
        lat = self.latency()
        parts = [
            f"sent {self.sent}",
            f"accepted {self.accepted}",
            f"delivered {self.delivered}/{self.expected}",
            f"duplicates absorbed {self.duplicates}",
            f"lost {self.lost}",
            f"latency p50 {lat['p50']:.1f} ms p95 {lat['p95']:.1f} ms p99 {lat['p99']:.1f} ms",
        ]
        if self.refused:
            codes = ", ".join(f"{c} {n}" for c, n in sorted(self.refusals.items()))
            parts.insert(2, f"refused {self.refused} ({codes})")
        if self.sealed:
            parts.insert(4, f"sealed end to end {self.sealed}")
        if self.skipped:
            parts.append(f"not sent (backpressure) {self.skipped}")
        return ", ".join(parts)


# -- serial lines -----------------------------------------------------------------------


def _pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class PtyCable:
    """A null-modem cable between two pseudo-terminals, copied by the event loop: the
    device opens ``device_path``, the serial adapter ``adapter_path``. Until ``armed``,
    what the adapter writes is dropped (as on a line with nothing plugged in): the
    ``UPSTREAM_LOST [PORT_OPENED]`` it says on opening would otherwise wait in the pty
    and meet the device's first login."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._a_master, self._a_slave, self.device_path = _pty()
        self._b_master, self._b_slave, self.adapter_path = _pty()
        self._pending: dict[int, bytearray] = {
            self._a_master: bytearray(),
            self._b_master: bytearray(),
        }
        self._closed = False
        self.armed = False
        loop.add_reader(self._a_master, self._pump, self._a_master, self._b_master)
        loop.add_reader(self._b_master, self._pump, self._b_master, self._a_master)

    def _pump(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF):
                return
            raise
        if data and (self.armed or src == self._a_master):
            self._write(dst, data)

    def _write(self, fd: int, data: bytes) -> None:
        buf = self._pending[fd]
        if buf:
            buf += data
            return
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return
        if n < len(data):
            buf += data[n:]
            self._loop.add_writer(fd, self._flush, fd)

    def _flush(self, fd: int) -> None:
        buf = self._pending[fd]
        try:
            n = os.write(fd, buf)
        except BlockingIOError:
            return
        except OSError:
            n = len(buf)
        del buf[:n]
        if not buf:
            self._loop.remove_writer(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._a_master, self._b_master):
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        for fd in (self._a_master, self._a_slave, self._b_master, self._b_slave):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- progress ---------------------------------------------------------------------------


class Progress:
    """A progress line: rewritten in place on a terminal, one plain line a second
    otherwise (or nothing, with ``enabled=False``)."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and self.stream.isatty()
        self._last = 0.0
        self._width = 0

    def __call__(self, snap: dict[str, Any], final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else 1.0):
            return
        self._last = now
        frac = min(1.0, snap["t"] / snap["duration"]) if snap["duration"] else 1.0
        bar = "#" * int(frac * 20)
        line = (
            f"[{bar:<20}] {snap['phase']} {snap['t']:5.1f}s sent {snap['sent']} "
            f"accepted {snap['accepted']} delivered {snap['delivered']}/{snap['expected']} "
            f"online {snap['online']}/{snap['devices']}"
        )
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# -- the fleet --------------------------------------------------------------------------


class _Sim:
    def __init__(
        self,
        cfg: FleetConfig,
        endpoints: Endpoints,
        tokens: dict[str, str],
        progress: Callable[..., None] | None,
        keys: dict[str, str] | None = None,
    ) -> None:
        self.keys = keys or {}
        self.cfg = cfg
        self.endpoints = endpoints
        self.tokens = tokens
        self.ids = list(tokens)
        self.rng = random.Random(cfg.seed)
        self.progress = progress
        self.kind = {d: transport_of(cfg, i) for i, d in enumerate(self.ids)}
        counts: dict[str, int] = {}
        for k in self.kind.values():
            counts[k] = counts.get(k, 0) + 1
        self.report = FleetReport(cfg.devices, counts, cfg.scenario, cfg.rate, cfg.duration)
        self.devices: dict[str, Any] = {}  # online device objects
        self.retired: list[Any] = []  # closed device objects (their dedupe counters count)
        self.receivers: dict[str, asyncio.Task[None]] = {}
        self.serial_host: asyncio.subprocess.Process | None = None
        self.serial_paths: dict[str, str] = {}
        self.expected: dict[tuple[str, str], list[str]] = {}  # (sender, id) -> recipients
        self.sent_at: dict[tuple[str, str], float] = {}
        self.accepted_keys: set[tuple[str, str]] = set()
        self.seen: set[tuple[str, str, str]] = set()  # (sender, id, recipient)
        self.groups: dict[str, str] = {}  # device -> topic
        self.members: dict[str, list[str]] = {}  # topic -> devices
        self.outstanding = 0
        self.t0 = 0.0
        self.phase = "connecting"
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.dev_tasks: dict[str, set[asyncio.Task[Any]]] = {}

    # -- devices ---------------------------------------------------------------------
    def _new_device(self, dev_id: str) -> Any:
        kind = self.kind[dev_id]
        token = self.tokens[dev_id]
        common: dict[str, Any] = {"auto_ack": False, "backoff_max": 0.5, "connect_timeout": 20.0}
        if self.cfg.e2e:
            common["private_key"] = self.keys[dev_id]
        if kind == "mqtt":
            from firmware_sim.mqtt_device import MqttDevice

            if not self.endpoints.mqtt:
                raise RuntimeError("no MQTT broker address: is the server's MQTT edge on?")
            return MqttDevice(dev_id, token, self.endpoints.mqtt, **common)
        if kind == "serial":
            from firmware_sim.serial_device import SerialDevice

            path = self.serial_paths[dev_id]
            return SerialDevice(dev_id, token, path, resend_after=2.0, **common)
        from firmware_sim.tcp_device import TcpDevice

        return TcpDevice(
            dev_id, token, self.endpoints.gateways, self.endpoints.msg_servers, **common
        )

    async def _start_serial(self) -> None:
        """The serial adapter and the cables run in a child process (``serial_host``):
        pyserial waits with select(), so every fd of a port must stay below 1024, and
        one device with its line and its adapter port takes 14 fds in one process."""
        serial_ids = [d for d in self.ids if self.kind[d] == "serial"]
        if not serial_ids:
            return
        argv = [
            sys.executable,
            "-m",
            "firmware_sim.fleet",
            "serial-host",
            str(len(serial_ids)),
            self.endpoints.msg_servers[0] if self.endpoints.msg_servers else "",
            "" if self.endpoints.msg_servers else self.endpoints.gateways[0],
        ]
        self.serial_host = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self.serial_host.stdout is not None
        async with asyncio.timeout(30):
            line = await self.serial_host.stdout.readline()
        if not line:
            raise RuntimeError("the serial host (adapter and ptys) did not start")
        paths = json.loads(line)["paths"]
        self.serial_paths = dict(zip(serial_ids, paths, strict=True))

    async def _online(self, dev_id: str) -> None:
        dev = self._new_device(dev_id)
        await dev.connect()
        self.devices[dev_id] = dev
        self.receivers[dev_id] = asyncio.create_task(self._receive(dev), name=f"fleet-rx-{dev_id}")

    async def _offline(self, dev_id: str) -> None:
        dev = self.devices.pop(dev_id)  # no new sends from it
        sending = self.dev_tasks.get(dev_id)
        if sending:  # let its sends get their receipts first
            await asyncio.wait(set(sending), timeout=self.cfg.wait)
        task = self.receivers.pop(dev_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dev.close()
        self.retired.append(dev)

    async def _offline_period(self, dev_id: str, start: float, length: float) -> None:
        await asyncio.sleep(start)
        if dev_id not in self.devices:
            return
        await self._offline(dev_id)
        self.report.offline_periods += 1
        await asyncio.sleep(length)
        await self._online(dev_id)

    async def _blip(self, dev_id: str, start: float) -> None:
        """The connection breaks (as a network failure would); the SDK reconnects, and
        what was delivered but not acked comes again, for its dedupe to absorb."""
        await asyncio.sleep(start)
        dev = self.devices.get(dev_id)
        if dev is not None:
            dev.drop()
            self.report.connection_drops += 1

    async def _receive(self, dev: Any) -> None:
        me = dev.device_id
        async for msg in dev.messages():
            key = (msg.sender, msg.id)
            recipients = self.expected.get(key)
            if recipients is not None and me in recipients:
                seen = (msg.sender, msg.id, me)
                if seen in self.seen:
                    self.report.duplicates += 1
                else:
                    self.seen.add(seen)
                    self.report.delivered += 1
                    if getattr(msg, "enc", "none") != "none":
                        self.report.sealed += 1
                    at = self.sent_at.get(key)
                    if at is not None:
                        self.report.latencies_ms.append((time.perf_counter() - at) * 1000)
                    self.changed.set()
            dev.ack(msg)

    # -- traffic ---------------------------------------------------------------------
    async def _setup_topics(self) -> None:
        if self.cfg.scenario not in ("topic", "mixed"):
            return
        size = max(2, self.cfg.topic_size)
        groups = [self.ids[i : i + size] for i in range(0, len(self.ids), size)]
        if len(groups) > 1 and len(groups[-1]) < 2:
            groups[-2] += groups.pop()
        for group in groups:
            if len(group) < 2:
                continue
            name = f"{group[0]}-topic"
            await self.devices[group[0]].create_topic(name)
            self.members[name] = list(group)
            for d in group:
                self.groups[d] = name
        joins = [
            self.devices[d].join_topic(name)
            for name, group in self.members.items()
            for d in group[1:]
        ]
        await _gather_limited(joins, 50)

    async def _send_one(self, dev: Any, topic: str | None, to: str) -> None:
        from firmware_sim.tcp_device import DeviceError

        r = self.report
        sender = dev.device_id
        msg_id = dev.next_id()
        key = (sender, msg_id)
        recipients = [d for d in self.members[topic] if d != sender] if topic else [to]
        head = f"{sender}:{msg_id} "
        text = head + "x" * max(0, self.cfg.payload - len(head))
        self.expected[key] = recipients  # before sending: it may arrive first
        self.sent_at[key] = time.perf_counter()
        r.sent += 1
        self.outstanding += 1
        try:
            if topic:
                await dev.publish(topic, text, id=msg_id)
            else:
                await dev.send(to, text, id=msg_id)
        except DeviceError as exc:
            del self.expected[key]
            r.refused += 1
            r.refusals[exc.code] = r.refusals.get(exc.code, 0) + 1
            return
        finally:
            self.outstanding -= 1
        r.accepted += 1
        r.expected += len(recipients)
        self.accepted_keys.add(key)

    def _issue(self, n_issued: int) -> None:
        online = list(self.devices)
        if len(online) < 1:
            return
        sender = online[n_issued % len(online)]
        scenario = self.cfg.scenario
        topic = None
        if (scenario == "topic" or (scenario == "mixed" and n_issued % 3 == 2)) and (
            sender in self.groups
        ):
            topic = self.groups[sender]
        to = ""
        if topic is None:
            to = sender
            while to == sender:
                to = self.rng.choice(self.ids)
        task = asyncio.create_task(self._send_one(self.devices[sender], topic, to))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        mine = self.dev_tasks.setdefault(sender, set())
        mine.add(task)
        task.add_done_callback(mine.discard)

    def snapshot(self) -> dict[str, Any]:
        r = self.report
        return {
            "phase": self.phase,
            "t": time.perf_counter() - self.t0 if self.t0 else 0.0,
            "duration": self.cfg.duration,
            "sent": r.sent,
            "accepted": r.accepted,
            "delivered": r.delivered,
            "expected": r.expected,
            "online": len(self.devices),
            "devices": self.cfg.devices,
        }

    def _tick(self, final: bool = False) -> None:
        if self.progress is not None:
            self.progress(self.snapshot(), final=final)

    async def run(self) -> FleetReport:
        try:
            # Serial first, then MQTT: pyserial and paho wait with select(), so their
            # fds (ptys, ports, sockets, wake-up pipes) must stay below FD_SETSIZE (1024).
            await self._start_serial()
            for kind in ("serial", "mqtt", "tcp"):
                group = [d for d in self.ids if self.kind[d] == kind]
                await _gather_limited([self._online(d) for d in group], 50)
            await self._setup_topics()
            await self._traffic()
        finally:
            await self._shutdown()
        r = self.report
        r.lost_ids = sorted(
            f"{s}:{i}->{to}"
            for (s, i) in self.accepted_keys
            for to in self.expected[(s, i)]
            if (s, i, to) not in self.seen
        )
        r.duplicates += sum(d.duplicates for d in [*self.devices.values(), *self.retired])
        return r

    async def _traffic(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        offline: list[asyncio.Task[None]] = []
        if cfg.scenario in ("offline", "mixed"):
            for i, d in enumerate(self.ids):
                start = self.rng.uniform(0.1, 0.4) * cfg.duration
                if i % 4 == 3:
                    length = 0.3 * cfg.duration
                    offline.append(asyncio.create_task(self._offline_period(d, start, length)))
                elif i % 4 == 1:
                    offline.append(asyncio.create_task(self._blip(d, start)))
        self.phase = "sending"
        self.t0 = time.perf_counter()
        issued = 0
        cap = MAX_OUTSTANDING_PER_DEVICE * cfg.devices
        while True:
            elapsed = time.perf_counter() - self.t0
            if elapsed >= cfg.duration:
                break
            due = int(cfg.rate * elapsed) + 1 - issued
            for _ in range(max(0, due)):
                if self.outstanding >= cap:
                    self.report.skipped += 1
                else:
                    self._issue(issued)
                issued += 1
            self._tick()
            await asyncio.sleep(0.01)
        await asyncio.gather(*offline)
        self.phase = "receipts"
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=cfg.wait + 30)
        self.report.elapsed = time.perf_counter() - self.t0
        self.phase = "delivering"
        deadline = loop.time() + cfg.wait
        while len(self.seen) < self.report.expected and loop.time() < deadline:
            self.changed.clear()
            self._tick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.2, max(0.0, deadline - loop.time()))):
                    await self.changed.wait()
        self.phase = "done"
        self._tick(final=True)

    async def _shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in self.receivers.values():
            task.cancel()
        await asyncio.gather(*self.tasks, *self.receivers.values(), return_exceptions=True)
        await asyncio.gather(*(d.close() for d in self.devices.values()), return_exceptions=True)
        host = self.serial_host
        if host is not None and host.returncode is None:
            assert host.stdin is not None
            host.stdin.close()  # the host stops when its stdin closes
            try:
                async with asyncio.timeout(10):
                    await host.wait()
            except TimeoutError:
                host.kill()
                await host.wait()


async def _gather_limited(coros: Sequence[Any], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Any) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


def check_config(cfg: FleetConfig, devices: int) -> None:
    """Raise ValueError for a configuration the fleet cannot run."""
    if cfg.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
    if cfg.scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}")
    if devices < 2:
        raise ValueError("a fleet needs at least two devices")
    n_serial = sum(transport_of(cfg, i) == "serial" for i in range(devices))
    if n_serial > MAX_SERIAL_DEVICES:
        raise ValueError(
            f"{n_serial} serial devices: at most {MAX_SERIAL_DEVICES} in one fleet "
            "(pyserial's select() needs every fd below 1024)"
        )
    if cfg.e2e and cfg.scenario not in ("p2p", "offline"):
        raise ValueError("end-to-end sealing in the fleet is for the p2p and offline scenarios")
    n_mqtt = sum(transport_of(cfg, i) == "mqtt" for i in range(devices))
    if 5 * n_serial + 3 * n_mqtt > 950:
        raise ValueError(
            f"{n_mqtt} MQTT and {n_serial} serial devices: too many for one fleet (paho and "
            "pyserial wait with select(), which needs every fd below 1024; about 300 MQTT "
            "devices, fewer with serial ones)"
        )


async def run_fleet(
    cfg: FleetConfig,
    endpoints: Endpoints,
    tokens: dict[str, str],
    progress: Callable[..., None] | None = None,
    keys: dict[str, str] | None = None,
) -> FleetReport:
    """Run the scenario with the devices in ``tokens`` (id -> token, registered);
    with ``cfg.e2e``, ``keys`` has each device's private key (base64)."""
    check_config(cfg, len(tokens))
    if cfg.e2e and set(keys or {}) != set(tokens):
        raise ValueError("e2e: every device needs its private key")
    return await _Sim(cfg, endpoints, tokens, progress, keys).run()


def fleet_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, count + 1)]


# -- the serial host (a child process) --------------------------------------------------


async def serial_host(count: int, msg_server: str, gateway: str) -> None:
    """``count`` cables and a serial adapter on their far ends, upstream to
    ``msg_server`` (or the one ``gateway`` names); prints ``{"paths": [...]}`` (the ends
    for the devices) once every port is open, and stops when stdin closes."""
    from device_adapters.serial.adapter import SerialAdapter
    from fishchat_iot.config import SerialPortSettings, SerialSettings

    loop = asyncio.get_running_loop()
    cables = [PtyCable(loop) for _ in range(count)]
    settings = SerialSettings(
        ports=[
            SerialPortSettings(url=c.adapter_path, name=f"fleet-{i}") for i, c in enumerate(cables)
        ],
        msg_server=msg_server,
        gateway=gateway,
        reopen_min=0.05,
        reopen_max=0.5,
        connect_timeout=10.0,
    )
    adapter = SerialAdapter(settings)
    try:
        await adapter.start()
        await adapter.wait_open(20)
        await asyncio.sleep(0.3)  # the PORT_OPENED notices, dropped (nothing plugged in)
        for c in cables:
            c.armed = True
        sys.stdout.write(json.dumps({"paths": [c.device_path for c in cables]}) + "\n")
        sys.stdout.flush()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()
    finally:
        with contextlib.suppress(Exception):
            await adapter.stop()
        for c in cables:
            c.close()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serial-host":
        asyncio.run(serial_host(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    else:
        sys.exit("usage: python -m firmware_sim.fleet serial-host COUNT MSG_SERVER GATEWAY")
