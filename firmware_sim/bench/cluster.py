"""The distributed mode's benchmark: p2p across two msg_servers (senders on one,
receivers on the other, every message through Redis) next to the same load on one
node of the same cluster. Reported, not asserted (docs/benchmarks.md, "Distributed
mode").

    python -m firmware_sim.bench.cluster [--mongo-url URL] [--count N] [--pairs P]

It starts a ``redis-server`` with an append-only file (``appendfsync always``, what
the bus documents for no loss; ``FISHCHAT_BENCH_FSYNC=everysec`` for the cheaper
setting), uses the MongoDB at ``--mongo-url`` or starts the mongoeco test server that
``scripts/test-services.sh`` installs, and runs ``fishchat-iot run msg-server`` twice,
``router`` and ``manager`` from ``configs/`` with free ports, the cluster's receipts
(``delivery.receipt = "acked"``) and per-device limits off. Each run waits 2 s between
its logins and its first send (``FISHCHAT_BENCH_SETTLE`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware_sim.bench import _ms, machine
from firmware_sim.bench.servers import CLI, Server, _readline, free_port
from firmware_sim.bench.tcp import p2p, pair_ids
from fishchat_iot.cli.up import run_loop

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOKEN = "bench-token"
MONGOECO = Path(
    os.environ.get("FISHCHAT_MONGOECO_VENV", Path.home() / ".cache/fishchat-iot/mongoeco-venv")
)
_MONGOECO_SERVER = """
import asyncio, sys
from mongoeco.wire import AsyncMongoEcoProxyServer
async def main():
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=int(sys.argv[1])):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def _start(name: str, argv: list[str], env: dict[str, str], tmp: Path) -> Server:
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE, env=env
        )
    server = Server(name, proc)
    line = _readline(proc.stdout, 60.0, proc)
    if line.startswith(b"{"):
        server.info = json.loads(line)
    return server


def _redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    program = shutil.which("redis-server")
    if program is None:
        sys.exit("redis-server is not installed: run scripts/test-services.sh")
    fsync = os.environ.get("FISHCHAT_BENCH_FSYNC", "always")  # or everysec
    argv = [program, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    argv += ["--appendonly", "yes", "--appendfsync", fsync, "--save", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def _register(settings_env: dict[str, str], ids: list[str]) -> None:
    from fishchat_iot.auth import hash_token
    from fishchat_iot.stores.base import DeviceRecord
    from fishchat_iot.stores.mongo import MongoStore

    async def work() -> None:
        url, db = (
            settings_env["FISHCHAT_STORE_MONGO_URL"],
            settings_env["FISHCHAT_STORE_MONGO_DATABASE"],
        )
        async with MongoStore(url, db) as store:
            digest = hash_token(TOKEN)
            for d in ids:
                await store.add_device(DeviceRecord(id=d, token_hash=digest, created_ms=1))

    asyncio.run(work())


def _row(label: str, res: dict[str, Any], cpu: float, count: int) -> dict[str, Any]:
    return {
        "run": label,
        "msgs_per_s": round(res["delivered"] / res["seconds"]) if res["seconds"] else 0,
        "p50_ms": _ms(res["latencies"], 50),
        "p99_ms": _ms(res["latencies"], 99),
        "delivered": res["delivered"],
        "of": count,
        "cpu_us_per_msg": round(cpu / max(1, res["delivered"]) * 1e6, 1),
    }


def run(mongo_url: str, count: int, pairs: int, paced: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-cluster-"))
    redis_proc, redis_url = _redis(tmp)
    mongo: subprocess.Popen[bytes] | None = None
    servers: list[Server] = []
    try:
        if not mongo_url:
            port = free_port()
            mongo = subprocess.Popen(
                [str(MONGOECO / "bin" / "python"), "-c", _MONGOECO_SERVER, str(port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _readline(mongo.stdout, 30.0, mongo)
            mongo_url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FISHCHAT_")}
        env.update(
            FISHCHAT_BUS_URL=redis_url,
            FISHCHAT_STORE_MONGO_URL=mongo_url,
            FISHCHAT_STORE_MONGO_DATABASE=f"bench_{os.getpid()}",
            FISHCHAT_STORE_SERVER_KEY=str(tmp / "server.key"),
            FISHCHAT_LIMITS_MSG_RATE="0",
            FISHCHAT_LIMITS_BYTE_RATE="0",
            FISHCHAT_LIMITS_CONN_RATE="0",
            FISHCHAT_NODE_LOG_LEVEL="warning",
        )
        runs = [
            (f"{where}-{kind}", where, kind)
            for where in ("one", "across")
            for kind in ("burst", "paced")
        ]
        _register(env, [d for prefix, _, _ in runs for d in pair_ids(pairs, prefix)])
        for name, role in (
            ("msg_server.19000", "msg-server"),
            ("msg_server.19001", "msg-server"),
            ("router", "router"),
            ("manager", "manager"),
        ):
            role_env = dict(env, FISHCHAT_NODE_DATA_DIR=str(tmp / name), FISHCHAT_TCP_MSG_PORT="0")
            argv = [CLI, "--config", str(CONFIGS / f"{name}.toml"), "run", role, "--json"]
            servers.append(_start(name, argv, role_env, tmp))
        m0, m1 = servers[0], servers[1]
        a0, a1 = m0.info["msg_server"], m1.info["msg_server"]

        rows = []
        for prefix, where, kind in runs:
            rate = paced if kind == "paced" else 0.0
            receivers_at = a1 if where == "across" else ""
            cpu0 = m0.cpu() + m1.cpu()
            n = count if not rate else int(rate * 3)
            # Devices of their own per run; the first queue read of each login (from
            # MongoDB) is done before the stream starts, or the stream goes to the queue
            # (the login race, benchmarks.md): settle 2 s, uncounted.
            res = run_loop(
                p2p(
                    a0,
                    TOKEN,
                    n,
                    pairs,
                    window=500,
                    receivers_at=receivers_at,
                    rate=rate,
                    prefix=prefix,
                    settle=float(os.environ.get("FISHCHAT_BENCH_SETTLE", "2")),
                )
            )
            cpu = m0.cpu() + m1.cpu() - cpu0
            label = "one node" if where == "one" else "across nodes"
            rows.append(
                _row(f"{label}, paced {rate:g}/s" if rate else f"{label}, burst", res, cpu, n)
            )
        return {"machine": machine(), "mongo": mongo_url.split("?")[0], "rows": rows}
    finally:
        for s in reversed(servers):
            s.stop()
        if mongo is not None:
            mongo.kill()
            mongo.wait()
        redis_proc.terminate()
        redis_proc.wait()
        if not os.environ.get("FISHCHAT_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mongo-url", default="", help="a MongoDB (default: start mongoeco)")
    p.add_argument("--count", type=int, default=20000, help="messages per burst run")
    p.add_argument("--pairs", type=int, default=20, help="sender -> receiver pairs")
    p.add_argument("--paced", type=float, default=1000.0, help="msgs/s of the paced runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report = run(args.mongo_url, args.count, args.pairs, args.paced)
    if args.json:
        print(json.dumps(report))
        return
    print(f"machine: {report['machine']}  MongoDB: {report['mongo']}")
    print("| run | msgs/s | p50 ms | p99 ms | delivered | CPU µs/msg (both msg_servers) |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(
            f"| {r['run']} | {r['msgs_per_s']:,} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['delivered']:,} of {r['of']:,} | {r['cpu_us_per_msg']} |"
        )


if __name__ == "__main__":
    main()
