"""The SDK suites' view of a real ``fishchat-iot up`` (``tests/support/server.py``,
started by the shared ``up_server_factory`` fixture of ``tests/conftest.py``, which also
checks at teardown that the server logged no error and stopped cleanly).

``SdkServer`` adds what device tests need: registration that returns the device's
provisioning bundle, and SDK devices pointed at the server's free ports (a bundle names
the configured ports, not the ones ``--gateway-port 0`` picked).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Protocol

import pytest
from support.server import CLI, ServerProcess, cli_env

__all__ = ["CLI", "SdkServer", "cli_env"]


class SdkServer:
    """A running ServerProcess plus SDK helpers; ``proc`` is the ServerProcess."""

    def __init__(self, proc: ServerProcess) -> None:
        self.process = proc

    # -- the process -----------------------------------------------------------------
    @property
    def gateway(self) -> str:
        return self.process.gateway

    @property
    def msg_server(self) -> str:
        return self.process.msg_server

    @property
    def data_dir(self) -> Path:
        return self.process.data_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ports(self) -> tuple[int, int]:
        return self.process.gateway_port, self.process.msg_port

    def start(self, gateway_port: int = 0, msg_port: int = 0) -> None:
        self.process.start(gateway_port, msg_port)

    def stop(self) -> int | None:
        return self.process.stop()

    def kill(self) -> int | None:
        return self.process.kill9()

    # -- operator commands -----------------------------------------------------------
    def cli(self, *args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
        """``fishchat-iot --data-dir D ARGS``; failures are returned, not raised,
        unless ``check``."""
        return self.process.cli(*args, check=check)

    def register(self, device_id: str, v1: bool = False) -> dict[str, Any]:
        """Register through the CLI; returns the bundle (a dict) plus ``bundle_path``."""
        proc = self.cli("device", "register", device_id, *(["--v1"] if v1 else []), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        raw = out["bundle"]
        if isinstance(raw, dict):
            bundle, path = dict(raw), ""
        else:
            path = str(raw)
            bundle = json.loads(Path(path).read_text())
        assert bundle["id"] == device_id and bundle["token"] == out["token"]
        bundle["bundle_path"] = path
        return bundle

    # -- SDK devices ------------------------------------------------------------------
    def device(self, bundle: dict[str, Any], **kwargs: Any) -> Any:
        """A TcpDevice for a registered bundle, pointed at this server."""
        from firmware_sim.tcp_device import TcpDevice

        kwargs.setdefault("backoff_max", 0.5)
        return TcpDevice(
            bundle["id"],
            bundle["token"],
            gateway=self.gateway,
            msg_server=self.msg_server,
            **kwargs,
        )

    def v1_device(self, device_id: str, **kwargs: Any) -> Any:
        from firmware_sim.tcp_device import V1Device

        kwargs.setdefault("backoff_max", 0.5)
        return V1Device(device_id, gateway=self.gateway, msg_server=self.msg_server, **kwargs)


class SdkServerFactory(Protocol):
    def __call__(self, *up_args: str) -> SdkServer: ...


@pytest.fixture
def sdk_server_factory(up_server_factory: Any) -> SdkServerFactory:
    """``make(*up_args)`` -> a started SdkServer of the test's own."""

    def make(*up_args: str) -> SdkServer:
        return SdkServer(up_server_factory(*up_args))

    return make


@pytest.fixture
def server(sdk_server_factory: SdkServerFactory) -> SdkServer:
    """A running default ``fishchat-iot up`` of the test's own (tests here restart,
    kill and freeze it, so it is not shared)."""
    return sdk_server_factory()
