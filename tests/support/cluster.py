"""The seed's distributed deployment for tests: each role a real ``fishchat-iot run ROLE
--config configs/<role>.toml --json`` subprocess, started from the shipped config files
with what differs in a test given as ``FISHCHAT_*`` variables: free loopback ports, the
test's Redis and MongoDB, a key prefix and a database of its own, a data directory per
role under the test's, and short bus timers (a dead node is noticed in seconds).

``Cluster`` knows nothing about pytest; ``tests/cluster/conftest.py`` builds fixtures.
"""

from __future__ import annotations

import asyncio
import collections
import json
import selectors
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from firmware_sim.tcp_device import TcpDevice
from fishchat_iot.auth import hash_token, new_token
from fishchat_iot.stores.base import DeviceRecord, TopicRecord
from fishchat_iot.stores.mongo import MongoStore
from support.redis import free_port
from support.server import _LIVE, CLI, LogFile, ServerError, cli_env, end_process

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MSG_SERVERS = ("msg_server.19000", "msg_server.19001")
ALL_ROLES = ("gateway", *MSG_SERVERS, "router", "manager", "monitor")
# Bus timers for tests: a node is dead 3 s after its last heartbeat (every 2 s), a
# dead node's devices stop looking present after 6 s, a stuck inbox entry is taken
# over after 5 s.
FAST_BUS = {"NODE_TTL": "3", "PRESENCE_TTL": "6", "CLAIM_IDLE": "5"}


def _role_of(name: str) -> str:
    return "msg-server" if name.startswith("msg_server") else name


def until(check: Any, what: str, timeout: float = 15.0) -> Any:
    """Poll ``check()`` until it returns something true (heartbeats come every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


class RoleProcess(LogFile):
    """One role process. ``start()`` waits for its ready line (``spawn()`` does not:
    a test starting roles before Redis or MongoDB is up); ``stop()`` is SIGTERM,
    ``kill9()`` SIGKILL; the log of every run is appended to ``log_path``."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.role = _role_of(name)
        self.config = CONFIGS / f"{name}.toml"
        self.env = env
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        """Where devices connect: the msg_server or the gateway listener."""
        return str(self.ready.get("msg_server") or self.ready.get("address") or "")

    def spawn(self) -> None:
        assert self.proc is None, f"{self.name} already running"
        argv = [*CLI, "--config", str(self.config), "run", self.role, "--json"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True
            )
        _LIVE.add(self.proc)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(0.2):
                    line = proc.stdout.readline()
                    if line.strip():
                        self.ready = json.loads(line)
                        return self.ready
                if proc.poll() is not None:
                    break
        code = proc.poll()
        self.stop()
        raise ServerError(f"{self.name} did not come up (exit {code}):\n{self.log_tail()}")

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        self.spawn()
        return self.wait_ready(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        return self._end(signal.SIGTERM, timeout)

    def kill9(self) -> int | None:
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = end_process(proc, sig, timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never logged {text!r}:\n{self.log_tail()}")
            time.sleep(0.1)


class Cluster:
    """gateway, two msg_servers, router, manager and monitor on ``redis_url`` and
    ``mongo_url``."""

    def __init__(
        self,
        root: Path,
        redis_url: str,
        mongo_url: str,
        database: str,
        prefix: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.mongo_url = mongo_url
        self.database = database
        root.mkdir(parents=True, exist_ok=True)
        base = cli_env()
        base.update(
            {
                "FISHCHAT_BUS_URL": redis_url,
                "FISHCHAT_BUS_PREFIX": prefix,
                "FISHCHAT_STORE_MONGO_URL": mongo_url,
                "FISHCHAT_STORE_MONGO_DATABASE": database,
                "FISHCHAT_STORE_SERVER_KEY": str(root / "server.key"),
                **{f"FISHCHAT_BUS_{k}": v for k, v in FAST_BUS.items()},
                **(extra_env or {}),
            }
        )
        self.env = base
        self.roles: dict[str, RoleProcess] = {}
        self.expect_errors = False  # a test that provokes errors (kills, outages) sets it
        for name in ALL_ROLES:
            env = dict(base)
            env["FISHCHAT_NODE_DATA_DIR"] = str(root / name)
            if name == "gateway":
                env["FISHCHAT_TCP_GATEWAY_PORT"] = str(free_port())
            elif name in MSG_SERVERS:
                env["FISHCHAT_TCP_MSG_PORT"] = str(free_port())
            elif name == "monitor":
                env["FISHCHAT_MONITOR_PORT"] = str(free_port())
            self.roles[name] = RoleProcess(root, name, env)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """The node registry as Redis holds it: node id -> NodeInfo fields."""
        client = redis.Redis.from_url(self.env["FISHCHAT_BUS_URL"], decode_responses=True)
        try:
            raw = client.hgetall(f"{self.env['FISHCHAT_BUS_PREFIX']}:{{nodes}}")
        finally:
            client.close()
        return {k: json.loads(v) for k, v in raw.items()}

    def stats(self, node_id: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.nodes()[node_id]["stats"]
        return stats

    def __getitem__(self, name: str) -> RoleProcess:
        return self.roles[name]

    @property
    def gateway(self) -> str:
        return self.roles["gateway"].address

    def msg_server(self, i: int) -> str:
        return self.roles[MSG_SERVERS[i]].address

    def start(self, *names: str) -> None:
        """Start the roles (all by default) in the order given, each waiting for Redis,
        MongoDB and its peers as it needs; returns when all are ready."""
        chosen = names or ALL_ROLES
        for name in chosen:
            self.roles[name].spawn()
        for name in chosen:
            self.roles[name].wait_ready()

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every running role; their exit codes."""
        return {name: r.stop() for name, r in self.roles.items() if r.proc is not None}

    def errors(self) -> list[str]:
        """ERROR lines the roles logged (a healthy run has none)."""
        return [
            f"{name}: {line}"
            for name, r in self.roles.items()
            for line in r.log_text().splitlines()
            if " ERROR " in line or "Traceback" in line
        ]

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{r.log_tail(60)}" for name, r in self.roles.items())

    # -- the registry, as an operator sets it up ----------------------------------------
    def cli(self, *args: str, role: str = "manager") -> subprocess.CompletedProcess[str]:
        """``fishchat-iot --config configs/<role>.toml ARGS`` against this cluster, in
        that role's data directory (``role="monitor"`` for ``operator add``)."""
        argv = [*CLI, "--config", str(CONFIGS / f"{role}.toml"), *args]
        env = dict(self.env, FISHCHAT_NODE_DATA_DIR=str(self.root / role))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        if proc.returncode != 0:
            raise ServerError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def operator(self, name: str = "ops") -> str:
        """An operator token for the cluster's monitor."""
        token: str = json.loads(self.cli("operator", "add", name, "--json", role="monitor").stdout)[
            "token"
        ]
        return token

    def api(self, path: str, token: str) -> Any:
        """GET the monitor's JSON API."""
        req = urllib.request.Request(
            f"http://{self.roles['monitor'].address}{path}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def register(self, *device_ids: str) -> dict[str, str]:
        """Register devices straight in the cluster's MongoDB (what `device register`
        writes, without a CLI start-up per device); id -> token."""
        tokens = {d: new_token() for d in device_ids}

        async def work() -> None:
            async with MongoStore(self.mongo_url, self.database) as store:
                for d, token in tokens.items():
                    await store.add_device(
                        DeviceRecord(
                            id=d,
                            token_hash=hash_token(token),
                            v1=False,
                            created_ms=int(time.time() * 1000),
                        )
                    )

        asyncio.run(work())
        return tokens

    def topic(self, name: str, owner: str, members: list[str]) -> None:
        async def work() -> None:
            async with MongoStore(self.mongo_url, self.database) as store:
                await store.create_topic(
                    TopicRecord(name=name, owner=owner, open=True, created_ms=0)
                )
                for m in members:
                    await store.add_member(name, m)

        asyncio.run(work())


# -- streams of p2p messages, checked from the devices' side ------------------------------
Key = tuple[str, str]  # (sender, message id)


async def collect(dev: TcpDevice, got: collections.Counter[Key]) -> None:
    """Count every message ``dev`` receives (its SDK already drops duplicate ids, so a
    count above 1 means one got through twice)."""
    while True:
        msg = await dev.receive()
        got[(msg.sender, msg.id)] += 1


async def stream(
    devs: dict[str, TcpDevice], pairs: list[tuple[str, str]], per_pair: int, interval: float
) -> dict[Key, str]:
    """Each sender sends ``per_pair`` messages to its receiver, one every ``interval``
    seconds, without waiting for receipts in between; returns, once every message is
    ACCEPTED, (sender, id) -> text of all of them."""

    async def one(sender: str, to: str) -> list[str]:
        tasks = []
        for i in range(per_pair):
            tasks.append(asyncio.create_task(devs[sender].send(to, f"{sender}>{to} {i}")))
            await asyncio.sleep(interval)
        return list(await asyncio.gather(*tasks))

    results = await asyncio.gather(*(one(s, r) for s, r in pairs))
    return {
        (s, mid): f"{s}>{r} {i}"
        for (s, r), ids in zip(pairs, results, strict=True)
        for i, mid in enumerate(ids)
    }


async def delivered_once(
    accepted: dict[Key, str], got: collections.Counter[Key], timeout: float = 60.0
) -> None:
    """Every accepted message arrives, exactly once, and nothing else does."""
    deadline = time.monotonic() + timeout
    while not set(accepted) <= set(got):
        missing = sorted(accepted[k] for k in set(accepted) - set(got))
        assert time.monotonic() < deadline, f"{len(missing)} not delivered: {missing}"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # anything delivered twice would show by now
    assert set(got) == set(accepted)
    assert max(got.values()) == 1, [accepted[k] for k, v in got.items() if v > 1][:5]
