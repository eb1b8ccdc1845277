"""A real ``redis-server`` for the tests, as a subprocess on a free loopback port with its
own data directory (append-only file, fsync on every write: the durability the bus
documents). ``restart()`` stops it (gracefully or with SIGKILL) and starts it again on
the same port and data, as an operator's restart or a crash would.

``scripts/test-services.sh`` (``make test``) installs Debian's redis-server when it is
missing. No test skips for want of it: the fixture fails with what to run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``url`` once started."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        program = shutil.which("redis-server")
        if program is None:
            pytest.fail(
                "redis-server is not installed: run `bash scripts/test-services.sh` (or"
                " `make test`), or `apt-get install -y redis-server`",
                pytrace=False,
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            program,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _ping(self.port):
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        self.stop()
        pytest.fail(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self, kill: bool = False, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (it may stop and restart it)."""
    with tempfile.TemporaryDirectory(prefix="fc-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One redis-server for a whole session; tests keep apart by key prefix."""
    with tempfile.TemporaryDirectory(prefix="fc-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def unique_prefix() -> str:
    return f"t{os.getpid()}-{time.monotonic_ns()}"
