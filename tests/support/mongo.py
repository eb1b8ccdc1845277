"""A MongoDB-wire server for the tests: mongoeco's ``AsyncMongoEcoProxyServer`` (in-memory
engine) as a subprocess on a free loopback port, or a real MongoDB named by
``FISHCHAT_TEST_MONGO_URL``.

mongoeco needs Python 3.13 or newer, so it lives in its own virtualenv, made by
``scripts/test-services.sh`` (``make test`` runs it): ``FISHCHAT_MONGOECO_VENV``, by
default ``~/.cache/fishchat-iot/mongoeco-venv``. No test skips for want of it: a missing
venv or a server that does not come up fails the tests with a message saying what to run.

The server has no change streams and slows down as a collection grows: tests keep their
data small and take a fresh database each (``fresh_database_name``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

ENV_URL = "FISHCHAT_TEST_MONGO_URL"
ENV_VENV = "FISHCHAT_MONGOECO_VENV"

# Run by the venv's Python 3.13: serve on the port given (0: any free one), print the
# port once listening, stop when stdin closes (so the server never outlives the tests).
_SERVER_SCRIPT = """
import asyncio, sys
from mongoeco.wire import AsyncMongoEcoProxyServer

async def main():
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=int(sys.argv[1])) as server:
        print(server.address.port, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""

_START_TIMEOUT_S = 30.0


def mongoeco_venv() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get(ENV_VENV) or default / "fishchat-iot" / "mongoeco-venv")


def _fail(message: str) -> None:
    pytest.fail(
        f"{message}\nThe MongoDB store tests need a MongoDB-wire server: run"
        " `bash scripts/test-services.sh` (or `make test`) to install mongoeco, or set"
        f" {ENV_URL} to a MongoDB to use instead.",
        pytrace=False,
    )


class MongoecoServer:
    """One mongoeco wire server subprocess. ``url`` once started."""

    def __init__(self, python: Path) -> None:
        self.python = python
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        # A file, not a pipe: a chatty server must never block on a full pipe.
        self._stderr: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, port: int = 0) -> str:
        self._stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [str(self.python), "-c", _SERVER_SCRIPT, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        # The first stdout line is the port; a dead process gives EOF instead.
        line = _readline_with_timeout(self.proc, _START_TIMEOUT_S)
        if not line.strip().isdigit():
            err = self.stop()
            raise RuntimeError(f"mongoeco server did not start: {line!r}\n{err}")
        self.port = int(line)
        return self.url

    def stop(self) -> str:
        """Stop the server; returns what it wrote to stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        err = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            err = self._stderr.read()
            self._stderr.close()
            self._stderr = None
        return err


def _readline_with_timeout(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(0.2):
                return proc.stdout.readline()
            if proc.poll() is not None:
                return ""
    return ""


def start_mongoeco() -> MongoecoServer:
    """Start a server or fail the test run with what to do."""
    python = mongoeco_venv() / "bin" / "python"
    if not python.exists():
        _fail(f"no mongoeco virtualenv at {python.parent.parent}")
    server = MongoecoServer(python)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        _fail(f"the mongoeco wire server did not start: {exc}")
    return server


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """URL of a MongoDB-wire server for the whole session: FISHCHAT_TEST_MONGO_URL if
    set, else a mongoeco server started here."""
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    server = start_mongoeco()
    try:
        yield server.url
    finally:
        err = server.stop()
        if err.strip():
            sys.stderr.write(f"mongoeco server stderr:\n{err}\n")


def fresh_database_name(prefix: str = "fct") -> str:
    """A database name no other test uses (several suites may share one real server)."""
    return f"{prefix}_{secrets.token_hex(6)}"
