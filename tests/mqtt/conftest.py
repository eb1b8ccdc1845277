"""Fixtures of the MQTT suite: real processes only — ``fishchat-iot up`` (the shared
``up_server`` / ``up_server_factory`` of tests/conftest.py, which pass ``--mqtt-port 0``),
a real ``mosquitto`` on a free loopback port, a plain amqtt broker for the control tests
(``firmware_sim/bench/plain_amqtt.py``), and Debian's ``mosquitto_pub`` / ``mosquitto_sub``.

- ``fleet``: devices (``fleet.mqtt(...)``, ``fleet.tcp(...)``), all closed at teardown.
- ``mosquitto_factory``: ``make(passwd, acl)`` -> a started ``Mosquitto``.
- ``plain_amqtt``: the address of a plain amqtt broker.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.server import ServerProcess

from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.tcp_device import TcpDevice


def program(name: str) -> str:
    """A third-party program the suite needs (scripts/test-services.sh installs them)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: run 'bash scripts/test-services.sh' (make services)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port}:\n{log.read_text()[-2000:]}")


def mqtt_address(server: ServerProcess) -> str:
    addr: str = server.ready["mqtt"]
    return addr


class Fleet:
    """Devices for a test, pointed at one server (or a broker given per device)."""

    def __init__(self) -> None:
        self.devices: list[Any] = []

    def mqtt(self, device_id: str, token: str, broker: str, **kwargs: Any) -> MqttDevice:
        kwargs.setdefault("backoff_max", 0.5)
        dev = MqttDevice(device_id, token, broker, **kwargs)
        self.devices.append(dev)
        return dev

    def tcp(self, device_id: str, token: str, server: ServerProcess, **kwargs: Any) -> TcpDevice:
        kwargs.setdefault("backoff_max", 0.5)
        dev = TcpDevice(
            device_id, token, gateway=server.gateway, msg_server=server.msg_server, **kwargs
        )
        self.devices.append(dev)
        return dev

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    yield f
    await f.close()
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("fishchat-")]
    assert not left, f"device tasks left running: {left}"


class Mosquitto:
    """A real mosquitto on a free loopback port, configured from the exported files."""

    def __init__(self, root: Path, passwd: Path, acl: Path, max_queued: int = 100000) -> None:
        self.root = root
        self.port = free_port()
        self.log = root / "mosquitto.log"
        self.conf = root / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            "use_username_as_clientid true",
            "persistence false",
            f"max_queued_messages {max_queued}",
            "max_inflight_messages 1000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:  # mosquitto drops root for 'mosquitto', who cannot read 0600 files
            lines.append(f"user {getpass.getuser()}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [program("mosquitto"), "-c", str(self.conf)], stdout=log, stderr=log
            )
        wait_port(self.port, self.proc, "mosquitto", self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    started: list[Mosquitto] = []

    def make(passwd: Path, acl: Path, **kwargs: Any) -> Mosquitto:
        root = tmp_path / f"mosquitto{len(started) + 1}"
        root.mkdir()
        m = Mosquitto(root, passwd, acl, **kwargs)
        started.append(m)
        m.start()
        return m

    yield make
    for m in started:
        m.stop()


@pytest.fixture(scope="module")
def plain_amqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain amqtt 0.12 broker (anonymous, no workarounds): the control group."""
    port = free_port()
    log = tmp_path_factory.mktemp("amqtt") / "amqtt.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firmware_sim.bench.plain_amqtt", str(port)], stdout=f, stderr=f
        )
    try:
        wait_port(port, proc, "plain amqtt", log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mosquitto_client(
    name: str, *args: str, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    """Run Debian's mosquitto_pub / mosquitto_sub to completion."""
    return subprocess.run(
        [program(name), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
