"""Server processes for the benchmark (on free loopback ports, always stopped) and what
is read from them: CPU seconds and resident memory from ``/proc``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

CLI = str(Path(sys.executable).with_name("fishchat-iot"))
GATEWAY_CONFIG = """\
[limits]
msg_rate = 0
byte_rate = 0
conn_rate = 0

[monitor]
enabled = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile(want: int) -> int:
    """Raise the soft open-file limit towards ``want`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want)) if hard != resource.RLIM_INFINITY else max(soft, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class Server:
    """A child process. ``stop()`` is SIGTERM (SIGKILL after ``grace`` seconds)."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], tmp: Path | None = None) -> None:
        self.name = name
        self.proc = proc
        self.tmp = tmp
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(stream: IO[bytes] | None, timeout: float, proc: subprocess.Popen[bytes]) -> bytes:
    assert stream is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(stream.fileno(), False)
    buf = b""
    while b"\n" not in buf:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"no ready line within {timeout:g}s (got {buf[:200]!r})")
        try:
            chunk = os.read(stream.fileno(), 65536)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            time.sleep(0.02)
        buf += chunk
    return buf.partition(b"\n")[0]


def register_devices(data_dir: Path, ids: list[str], token: str) -> None:
    """Register devices straight in a fresh store (one token for all: the bench)."""
    import argparse

    from fishchat_iot.auth import hash_token
    from fishchat_iot.cli.context import run_with_store, settings_from_args
    from fishchat_iot.stores.base import DeviceRecord, Store

    settings = settings_from_args(argparse.Namespace(data_dir=str(data_dir), config=None))
    digest = hash_token(token)
    now = int(time.time() * 1000)

    async def work(store: Store) -> None:
        for start in range(0, len(ids), 500):
            await asyncio.gather(
                *(
                    store.add_device(DeviceRecord(id=i, token_hash=digest, created_ms=now))
                    for i in ids[start : start + 500]
                )
            )

    run_with_store(settings, work, create=True)


def start_gateway(ids: list[str], token: str, timeout: float = 60.0) -> Server:
    """``fishchat-iot up`` (embedded broker on) on a temporary data directory with
    ``ids`` registered, per-device limits off, no monitor."""
    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    data = tmp / "data"
    register_devices(data, ids, token)
    config = tmp / "bench.toml"
    config.write_text(GATEWAY_CONFIG)
    argv = [CLI, "--data-dir", str(data), "--config", str(config), "up"]
    argv += ["--gateway-port", "0", "--msg-port", "0", "--mqtt-port", "0"]
    argv += ["--log-level", "warning", "--json"]
    log = open(tmp / "server.log", "wb")  # closed once the child has it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    server = Server("gateway", proc, tmp)
    try:
        server.info = json.loads(_readline(proc.stdout, timeout, proc))
    except BaseException:
        server.stop()
        raise
    return server


def start_amqtt(timeout: float = 30.0) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "firmware_sim.bench.plain_amqtt", str(port)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    server = Server("amqtt", proc)
    try:
        if _readline(proc.stdout, timeout, proc).strip() != b"ready":
            raise RuntimeError("plain amqtt did not start")
    except BaseException:
        server.stop()
        raise
    server.info = {"mqtt": f"127.0.0.1:{port}"}
    return server


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )


def start_mosquitto(timeout: float = 10.0) -> Server:
    exe = mosquitto_path()
    if exe is None:
        raise RuntimeError("mosquitto is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-mosq-"))
    port = free_port()
    conf = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 0",
        "max_inflight_messages 0",
        "log_dest none",
    ]
    if os.geteuid() == 0:
        conf.append("user root")
    (tmp / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    proc = subprocess.Popen(
        [exe, "-c", str(tmp / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    server = Server("mosquitto", proc, tmp)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise RuntimeError("mosquitto did not start")
        time.sleep(0.05)
    server.info = {"mqtt": f"127.0.0.1:{port}"}
    return server
