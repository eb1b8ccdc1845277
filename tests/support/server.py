"""A real ``fishchat-iot up`` for tests: the installed console script as a subprocess on
free loopback ports (``--gateway-port 0 --msg-port 0 --json``), its own data directory,
its stderr (the server log) in a file the test can read. Devices and topics are set up
through the operator CLI, as an operator would.

``ServerProcess`` knows nothing about pytest; ``tests/conftest.py`` builds the fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

_SCRIPT = Path(sys.executable).with_name("fishchat-iot")
CLI: list[str] = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fishchat_iot.cli.main"]
)
# Another command line to test (e.g. an installed build): FISHCHAT_TEST_CLI="prog args".
if os.environ.get("FISHCHAT_TEST_CLI"):
    CLI = shlex.split(os.environ["FISHCHAT_TEST_CLI"])

# Registering through the CLI costs a Python start-up each (~0.3 s): run a few at once.
REGISTER_PARALLEL = 4

# Every server started and not stopped yet: killed at interpreter exit, so an aborted
# test run (Ctrl-C, a crash in a fixture) leaves no server behind.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(5)


_LEVEL_RE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def cli_env() -> dict[str, str]:
    """The environment without FISHCHAT_* settings from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHCHAT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def toml_text(config: Mapping[str, Mapping[str, Any]]) -> str:
    """A config file from {section: {key: value}} (scalars only: all that config.py reads)."""
    lines: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = json.dumps(str(value))
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def end_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int | None:
    """Send ``sig`` (unless it has ended) and wait; SIGKILL after ``timeout``. The
    process is no longer one to kill at exit. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _LIVE.discard(proc)
    return proc.returncode


class LogFile:
    """A process whose stderr (its log) is appended to ``log_path``."""

    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class ServerError(RuntimeError):
    """The server did not come up, or a CLI command failed; the text has the log tail."""


class ServerProcess(LogFile):
    """One ``fishchat-iot up`` process on its own data directory.

    ``start()`` returns once the server printed its ready line; ``stop()`` is SIGTERM (a
    graceful stop), ``kill9()`` SIGKILL; ``restart()`` comes back on the same data
    directory and the same ports. The log of every run is appended to ``log_path``.
    """

    def __init__(
        self,
        root: Path,
        *up_args: str,
        config: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.up_args = list(up_args)
        self.config_path: Path | None = None
        if config:
            self.config_path = root / "config.toml"
            self.config_path.write_text(toml_text(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.gateway = ""
        self.msg_server = ""
        self.monitor = ""  # host:port of the monitor (dashboard, API, /metrics); "" = off
        self.starts = 0
        self._stdout_thread: threading.Thread | None = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def gateway_port(self) -> int:
        return int(self.gateway.rpartition(":")[2])

    @property
    def msg_port(self) -> int:
        return int(self.msg_server.rpartition(":")[2])

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _global_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        return args

    # -- process -----------------------------------------------------------------------
    def start(self, gateway_port: int = 0, msg_port: int = 0, timeout: float = 30.0) -> None:
        """Start and wait for the ready line. Fixed ports (a restart) may still be held
        for a moment by the previous process: retried until ``timeout``."""
        assert self.proc is None, "already running"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(gateway_port, msg_port, deadline)
                return
            except ServerError:
                fixed = gateway_port or msg_port
                if not fixed or time.monotonic() > deadline - 0.5:
                    raise
                time.sleep(0.2)

    def _start_once(self, gateway_port: int, msg_port: int, deadline: float) -> None:
        self.starts += 1
        argv = [
            *CLI,
            *self._global_args(),
            "up",
            "--gateway-port",
            str(gateway_port),
            "--msg-port",
            str(msg_port),
            "--mqtt-port",
            "0",
            "--monitor-port",
            "0",
            "--json",
            *self.up_args,
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self.starts}: {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=cli_env(),
                bufsize=0,
            )
        assert proc.stdout is not None
        _LIVE.add(proc)
        try:
            line = self._ready_line(proc, deadline)
            ready = json.loads(line.partition(b"\n")[0])
            gateway, msg_server = ready["gateway"], ready["msg_server"]
        except BaseException as exc:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            _LIVE.discard(proc)
            if isinstance(exc, ValueError | KeyError | TypeError):
                raise ServerError(f"unexpected ready line: {exc}\n{self.log_tail()}") from None
            raise
        self.ready, self.gateway, self.msg_server = ready, gateway, msg_server
        self.monitor = ready.get("monitor") or ""
        self.proc = proc
        # Keep reading stdout so the server never blocks on a full pipe.
        self._stdout_thread = threading.Thread(target=_drain, args=(proc,), daemon=True)
        self._stdout_thread.start()

    def _ready_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
        assert proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in line:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise ServerError(f"fishchat-iot up not ready in time:\n{self.log_tail()}")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait()
                    raise ServerError(
                        f"fishchat-iot up exited {proc.returncode} before it was ready:\n"
                        f"{self.log_tail()}"
                    )
                line += chunk
        return line

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout``: then the
        code is -9). None if it was not running."""
        return self._end(signal.SIGTERM, timeout)

    def kill9(self) -> int | None:
        """SIGKILL: the process gets no chance to write anything."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        end_process(proc, sig, timeout)
        if self._stdout_thread is not None:
            self._stdout_thread.join(5)
            self._stdout_thread = None
        if proc.stdout is not None:
            proc.stdout.close()
        _LIVE.discard(proc)
        return proc.returncode

    def restart(self, kill: bool = False) -> int | None:
        """Stop (SIGTERM, or SIGKILL with ``kill``) and start again on the same data
        directory and ports. Returns the exit code of the stopped process."""
        gateway_port, msg_port = self.gateway_port, self.msg_port
        code = self.kill9() if kill else self.stop()
        self.start(gateway_port, msg_port)
        return code

    # -- the log -----------------------------------------------------------------------

    def log_mark(self) -> int:
        """A position in the log; ``log_since(mark)`` is what was written after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines_since(self, mark: int, *levels: str) -> list[str]:
        """Log records written after ``mark`` at one of ``levels`` (all if none)."""
        out = []
        for line in self.log_since(mark).splitlines():
            m = _LEVEL_RE.match(line)
            if m and (not levels or m.group(1) in levels):
                out.append(line)
        return out

    def warnings_since(self, mark: int) -> list[str]:
        return self.log_lines_since(mark, "WARNING", "ERROR", "CRITICAL")

    def wait_log(self, pattern: str, since: int = 0, timeout: float = 10.0) -> str:
        """Wait for a log line matching the regex ``pattern`` after ``since``; returns it.
        (For what the server only logs; the poll interval is short.)"""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_since(since).splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r}:\n{self.log_tail()}")
            time.sleep(0.02)

    def assert_healthy(self) -> None:
        """Still running, and nothing in the log says the server itself failed."""
        assert self.running, f"fishchat-iot up exited:\n{self.log_tail()}"
        bad = []
        for line in self.log_text().splitlines():
            m = _LEVEL_RE.match(line)
            if line.startswith("Traceback") or (m and m.group(1) in ("ERROR", "CRITICAL")):
                bad.append(line)
        assert not bad, "server errors in the log:\n" + "\n".join(bad)

    # -- operator CLI ------------------------------------------------------------------
    def cli_argv(self, *args: str | Path) -> list[str]:
        return [*CLI, *self._global_args(), *map(str, args)]

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``fishchat-iot --data-dir D [--config F] ARGS`` to completion."""
        argv = self.cli_argv(*args)
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=cli_env(), check=False
        )
        if check and proc.returncode != 0:
            raise ServerError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def register(self, device_id: str, v1: bool = False) -> str:
        """Register a device through the CLI; returns its token."""
        out = self.cli("device", "register", device_id, *(["--v1"] if v1 else []), "--json")
        doc = json.loads(out.stdout)
        assert doc["id"] == device_id and doc["v1"] is v1, doc
        token: str = doc["token"]
        return token

    def register_many(self, device_ids: Iterable[str], v1: bool = False) -> dict[str, str]:
        """Register several devices (a few CLI processes at once); id -> token."""
        ids = list(device_ids)
        with ThreadPoolExecutor(max_workers=REGISTER_PARALLEL) as pool:
            tokens = list(pool.map(lambda d: self.register(d, v1), ids))
        return dict(zip(ids, tokens, strict=True))

    def revoke(self, device_id: str) -> None:
        self.cli("device", "revoke", device_id, "--json")

    def topic_create(self, name: str, owner: str, members: Sequence[str] = ()) -> None:
        self.cli("topic", "create", name, "--owner", owner, "--json")
        for member in members:
            self.cli("topic", "add", name, member, "--json")

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.proc is not None else "stopped"
        return f"<ServerProcess {self.msg_server or '-'} {state} {self.data_dir}>"


class ServerFactory(Protocol):
    """The ``up_server_factory`` fixture: a started server of the test's own."""

    def __call__(
        self, *up_args: str, config: dict[str, dict[str, Any]] | None = None, start: bool = True
    ) -> ServerProcess: ...


def _drain(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        while os.read(proc.stdout.fileno(), 65536):
            pass
