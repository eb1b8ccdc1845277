"""``fishchat-iot sim --transport mqtt`` against a running server: simulated devices
exchange messages over the embedded broker, found through the server's status file."""

from __future__ import annotations

import json

from support.server import ServerFactory


def test_sim_over_mqtt(up_server_factory: ServerFactory) -> None:
    server = up_server_factory()
    proc = server.cli(
        "sim", "--transport", "mqtt", "--devices", "3", "--count", "4", "--interval", "0", "--json"
    )
    report = json.loads(proc.stdout)
    assert report["sent"] == report["accepted"] == report["delivered"] == 3 * 2 * 4
    assert report["lost"] == 0 and report["refused"] == 0
    # Text mode, the same devices from their bundles, the broker named explicitly.
    bundles = [str(server.data_dir / "bundles" / f"sim-{i}.json") for i in (1, 2)]
    proc = server.cli(
        "sim",
        "--transport",
        "mqtt",
        "--mqtt",
        server.ready["mqtt"],
        *("--bundle", bundles[0], "--bundle", bundles[1]),
        *("--count", "2", "--interval", "0"),
    )
    assert "sim-1 -> sim-2: hello 1 (accepted)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("sent 4, accepted 4, delivered 4")
