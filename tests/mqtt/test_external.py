"""External-broker mode against a real ``mosquitto`` started on a free port from the files
``fishchat-iot mqtt export-mosquitto`` wrote: its password hashes and ACL as Mosquitto
reads them, devices on both transports through an attached gateway, and two gateways
splitting the uplink through a shared subscription."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.server import ServerProcess
from support.waiting import eventually, nothing_more, receive_n

from device_adapters.mqtt.mosquitto import check_password, hash_password

from .conftest import Fleet, Mosquitto, program
from .test_auth_acl import client

GW_PASSWORD = "gateway-secret"
LINE = re.compile(r"^[^:]+:\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==$")


def external_config(port: int, user: str) -> dict[str, dict[str, Any]]:
    return {
        "mqtt": {
            "mode": "external",
            "broker_port": port,
            "username": user,
            "password": GW_PASSWORD,
        }
    }


class Setup:
    """Devices registered, files exported, mosquitto and gateway(s) started."""

    def __init__(self, tmp: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
        self.tmp = tmp
        self.factory = mosquitto_factory
        self.servers: list[ServerProcess] = []
        self.mosquitto: Mosquitto | None = None
        self.tokens: dict[str, str] = {}

    def prepare(self, devices: list[str], users: list[str]) -> ServerProcess:
        """The first gateway's process (not started), its devices registered."""
        self.users = users
        first = ServerProcess(self.tmp / "gw1", config=external_config(0, users[0]))
        self.tokens = first.register_many(devices)
        return first

    def export(self, server: ServerProcess) -> tuple[Path, Path]:
        out = self.tmp / "mosquitto-files"
        args = ["mqtt", "export-mosquitto", "--out", str(out), "--json"]
        for user in self.users:
            args += ["--gateway-user", user]
        doc = json.loads(server.cli(*args).stdout)
        return Path(doc["password_file"]), Path(doc["acl_file"])

    def start(self, first: ServerProcess, gateways: int = 1) -> list[ServerProcess]:
        passwd, acl = self.export(first)
        self.mosquitto = self.factory(passwd, acl)
        port = self.mosquitto.port
        for n, user in enumerate(self.users[:gateways]):
            if n == 0:
                server = ServerProcess(first.root, config=external_config(port, user))
            else:  # the same data directory: the store is what gateways share
                server = ServerProcess(
                    self.tmp / f"gw{n + 1}",
                    "--data-dir",
                    str(first.data_dir),
                    config=external_config(port, user),
                )
            server.start()
            self.servers.append(server)
        return self.servers

    def finish(self) -> None:
        for server in self.servers:
            if server.running:
                try:
                    server.assert_healthy()
                finally:
                    assert server.stop() == 0, server.log_tail()


@pytest.fixture
def setup(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> Iterator[Setup]:
    s = Setup(tmp_path, mosquitto_factory)
    yield s
    s.finish()


def test_exported_password_file_is_mosquittos_format(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    server = ServerProcess(tmp_path / "gw", config=external_config(0, "gw"))
    tok = server.register_many(["dev-a", "dev-b", "dev-gone"])
    server.revoke("dev-gone")
    out = tmp_path / "files"
    doc = json.loads(server.cli("mqtt", "export-mosquitto", "--out", str(out), "--json").stdout)
    assert doc["devices"] == ["dev-a", "dev-b"] and doc["revoked"] == ["dev-gone"]
    passwd = Path(doc["password_file"])
    assert passwd.stat().st_mode & 0o777 == 0o600
    lines = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(lines) == {"gw", "dev-a", "dev-b"}
    assert all(LINE.match(f"{u}:{h}") for u, h in lines.items()), lines
    assert check_password(lines["dev-a"], tok["dev-a"])
    assert not check_password(lines["dev-a"], tok["dev-b"])
    # Both ways against the real tool: mosquitto_passwd's hash checks here ...
    theirs = tmp_path / "theirs"
    subprocess.run(
        [program("mosquitto_passwd"), "-c", "-b", str(theirs), "x", "a password"], check=True
    )
    their_hash = theirs.read_text().strip().split(":", 1)[1]
    assert LINE.match(f"x:{their_hash}") and check_password(their_hash, "a password")
    salt = their_hash.split("$")[3]
    import base64

    assert hash_password("a password", salt=base64.b64decode(salt)) == their_hash
    # ... and mosquitto itself accepts ours.
    mosq = mosquitto_factory(passwd, Path(doc["acl_file"]))
    base = ["-h", "127.0.0.1", "-p", str(mosq.port), "-V", "mqttv311", "-q", "1"]

    def pub(user: str, password: str, topic: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program("mosquitto_pub"), *base, "-u", user, "-P", password, "-t", topic, "-m", "x"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )

    assert pub("dev-a", tok["dev-a"], "fc/dev-a/ctl").returncode == 0
    assert pub("gw", GW_PASSWORD, "fc/dev-a/in").returncode == 0
    for user, password in (
        ("dev-a", "wrong"),
        ("dev-b", tok["dev-a"]),
        ("dev-gone", tok["dev-gone"]),
    ):
        r = pub(user, password, f"fc/{user}/ctl")
        assert r.returncode != 0 and "not authori" in r.stderr, (user, r.stderr)


async def test_external_mode_devices_on_both_transports(setup: Setup, fleet: Fleet) -> None:
    m1, m2, t = "ext-m1", "ext-m2", "ext-t"
    first = setup.prepare([m1, m2, t], ["gw1"])
    (gw,) = setup.start(first)
    assert setup.mosquitto is not None
    broker = setup.mosquitto.address
    assert gw.ready["mqtt"] == broker
    tok = setup.tokens
    a, b = fleet.mqtt(m1, tok[m1], broker), fleet.mqtt(m2, tok[m2], broker)
    tcp = fleet.tcp(t, tok[t], gw)
    await asyncio.gather(a.connect(), b.connect(), tcp.connect())
    # MQTT <-> MQTT, in order, once each
    ids = await asyncio.gather(*(a.send(m2, f"m {i}") for i in range(100)))
    got = await receive_n(b, 100)
    assert [x.text for x in got] == [f"m {i}" for i in range(100)] and [x.id for x in got] == ids
    # MQTT -> TCP, TCP -> MQTT
    await a.send(t, "to tcp")
    assert (await tcp.receive(10)).text == "to tcp"
    await tcp.send(m1, "to mqtt")
    assert (await a.receive(10)).text == "to mqtt"
    # A topic with members on both transports
    await a.create_topic("ext-room")
    await b.join_topic("ext-room")
    await tcp.join_topic("ext-room")
    await tcp.publish("ext-room", "from tcp")
    await a.publish("ext-room", "from mqtt")
    assert {x.text for x in await receive_n(b, 2)} == {"from tcp", "from mqtt"}
    assert (await a.receive(10)).text == "from tcp"
    assert (await tcp.receive(10)).text == "from mqtt"
    # Offline: b gone (its will says bye), messages queued, delivered on its return.
    b.drop()
    await asyncio.sleep(0.3)
    await b.close()
    for i in range(3):
        await a.send(m2, f"while away {i}")
    b2 = fleet.mqtt(m2, tok[m2], broker)
    await b2.connect()
    assert [x.text for x in await receive_n(b2, 3)] == [f"while away {i}" for i in range(3)]


async def test_external_acl_with_mosquitto_clients(setup: Setup, fleet: Fleet) -> None:
    """Mosquitto (MQTT 3.1.1) grants any SUBSCRIBE and applies the ACL to each message:
    a device listening on '#' or on another's inbox hears nothing, and a publish under
    another device's prefix reaches no one."""
    a, b, c = "acl-a", "acl-b", "acl-c"
    first = setup.prepare([a, b, c], ["gw1"])
    setup.start(first)
    assert setup.mosquitto is not None
    tok = setup.tokens
    dev_b = fleet.mqtt(b, tok[b], setup.mosquitto.address)
    dev_c = fleet.mqtt(c, tok[c], setup.mosquitto.address)
    await asyncio.gather(dev_b.connect(), dev_c.connect())
    base = ["-h", "127.0.0.1", "-p", str(setup.mosquitto.port), "-V", "mqttv311"]
    snoop = asyncio.ensure_future(
        client(
            "mosquitto_sub",
            *base,
            *("-i", a, "-u", a, "-P", tok[a]),
            *("-t", "#", "-t", f"fc/{b}/in", "-C", "1", "-W", "4"),
        )
    )
    await asyncio.sleep(1)
    code, _, err = await client(
        "mosquitto_pub",
        *base,
        "-i",
        a,
        "-u",
        a,
        "-P",
        tok[a],
        "-t",
        f"fc/{c}/p2p/{b}",
        "-q",
        "1",
        "-m",
        '{"id":"forged","body":"x"}',
    )
    assert code == 0, err
    await dev_c.send(b, "for b only")
    assert (await dev_b.receive(10)).text == "for b only"
    await nothing_more(dev_b, 0.3)  # the forged message reached no one
    code, out, err = await snoop
    assert out == "" and "Timed out" in err, (code, out, err)


async def test_two_gateways_split_the_uplink(setup: Setup, fleet: Fleet) -> None:
    a, b, t = "two-a", "two-b", "two-t"
    first = setup.prepare([a, b, t], ["gw1", "gw2"])
    gw1, gw2 = setup.start(first, gateways=2)
    assert setup.mosquitto is not None
    tok = setup.tokens
    dev_a = fleet.mqtt(a, tok[a], setup.mosquitto.address)
    dev_b = fleet.mqtt(b, tok[b], setup.mosquitto.address)
    await asyncio.gather(dev_a.connect(), dev_b.connect())
    n = 200
    ids = set(await asyncio.gather(*(dev_a.send(b, f"x {i}", id=f"x{i}") for i in range(n))))
    got = await receive_n(dev_b, n, 30)
    assert {m.id for m in got} == ids == {f"x{i}" for i in range(n)}  # none lost, none twice
    await nothing_more(dev_b, 0.5)
    await fleet.close()
    shares = []
    for gw in (gw1, gw2):
        assert gw.stop() == 0
        found = re.findall(r"MQTT edge: (\d+) uplink publishes", gw.log_text())
        shares.append(int(found[-1]))
    assert sum(shares) >= n and min(shares) > 0, shares


async def test_gateway_restart_asks_devices_to_say_hello(setup: Setup, fleet: Fleet) -> None:
    """Devices stay connected to the broker while the gateway restarts: the new gateway
    asks them for a hello, and messages flow again (queued ones first)."""
    a, b = "rs-a", "rs-b"
    first = setup.prepare([a, b], ["gw1"])
    (gw,) = setup.start(first)
    assert setup.mosquitto is not None
    tok = setup.tokens
    dev_a = fleet.mqtt(a, tok[a], setup.mosquitto.address)
    dev_b = fleet.mqtt(b, tok[b], setup.mosquitto.address, auto_ack=False)
    await asyncio.gather(dev_a.connect(), dev_b.connect())
    await dev_a.send(b, "before")
    unacked = await dev_b.receive(10)
    assert unacked.text == "before"
    assert await asyncio.to_thread(gw.restart) == 0
    # Redelivered after the new gateway's hello (it was never acked), then acked.
    await eventually(lambda: dev_b.duplicates >= 1, "redelivery after the restart", 20)
    dev_b.ack(unacked)
    assert await dev_a.send(b, "after") and (await dev_b.receive(10)).text == "after"
    assert dev_a.reconnects == dev_b.reconnects == 0  # the devices never noticed


async def test_psk_device_through_mosquitto_is_sealed_on_its_last_hop(setup: Setup) -> None:
    """A gateway-terminated device on the external broker: what it sends is opened by
    the gateway, what it gets is sealed under its pre-shared key, as on the embedded
    broker (docs/crypto.md section 7)."""
    from firmware_sim.mqtt_device import MqttDevice
    from firmware_sim.tcp_device import TcpDevice
    from fishchat_iot.crypto.seal import ENC_PSK

    first = setup.prepare(["ext-tcp"], ["gw"])
    reg = json.loads(first.cli("device", "register", "ext-psk", "--psk", "--json").stdout)
    bundle = reg["bundle"]  # its path: the SDK reads it
    [server] = setup.start(first)
    assert setup.mosquitto is not None
    m = MqttDevice.from_bundle(bundle, broker=setup.mosquitto.address, backoff_max=0.5)
    t = TcpDevice("ext-tcp", setup.tokens["ext-tcp"], msg_server=server.msg_server)
    async with m, t:
        await asyncio.gather(m.connect(), t.connect())
        await t.send("ext-psk", "to the small device")
        got = await m.receive(timeout=15)
        assert (got.sender, got.text, got.enc) == ("ext-tcp", "to the small device", ENC_PSK)
        await m.send("ext-tcp", "from the small device")
        got = await t.receive(timeout=15)
        assert (got.sender, got.text, got.enc) == ("ext-psk", "from the small device", "none")
        assert m.open_failed == 0
