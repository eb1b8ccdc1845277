"""``fishchat-iot sim --e2e``: simulated devices exchange sealed messages end to end
through a real server, which never sees the text."""

from __future__ import annotations

import json
import os

from support.server import ServerFactory

from .test_e2e_server import scan


def test_sim_e2e_shows_sealed_chatter(up_server_factory: ServerFactory) -> None:
    server = up_server_factory()
    marker = f"SIM-MARKER-{os.urandom(6).hex()}"
    proc = server.cli(
        "sim", "--e2e", "--devices", "3", "--count", "2", "--interval", "0", "--text", marker
    )
    lines = proc.stdout.splitlines()
    assert f"sim-2 <- sim-1: {marker} 1 (opened: x25519-chacha20poly1305)" in lines, proc.stdout
    assert lines[-1].startswith("sent 12, accepted 12, delivered 12"), proc.stdout
    assert scan(server, marker.encode()) == []
    # The same devices from their bundles, over MQTT, as JSON.
    bundles = [str(server.data_dir / "bundles" / f"sim-{i}.json") for i in (1, 2)]
    proc = server.cli(
        "sim",
        "--e2e",
        "--transport",
        "mqtt",
        *("--bundle", bundles[0], "--bundle", bundles[1]),
        *("--count", "2", "--interval", "0", "--text", marker, "--json"),
    )
    report = json.loads(proc.stdout)
    assert report["sent"] == report["delivered"] == 4 and report["lost"] == 0
    assert scan(server, marker.encode()) == []
    server.stop()
    assert scan(server, marker.encode()) == []
