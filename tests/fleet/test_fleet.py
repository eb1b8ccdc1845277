"""``fishchat-iot sim`` in fleet mode (every transport, and mixed) and ``fishchat-iot
bench`` in a tiny mode: correctness of the tools, from their own counts. No timing is
asserted."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.server import ServerProcess

from firmware_sim.bench.tcp import _shares


def fleet(server: ServerProcess, *args: str, timeout: str = "20") -> dict[str, Any]:
    proc = server.cli("sim", *args, "--timeout", timeout, "--json")
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def assert_complete(report: dict[str, Any]) -> None:
    assert report["sent"] > 0
    assert report["accepted"] == report["sent"] and report["refused"] == 0
    assert report["delivered"] == report["expected_deliveries"] > 0
    assert report["lost"] == 0 and report["lost_ids"] == []


@pytest.mark.parametrize("transport", ["tcp", "mqtt", "serial"])
def test_fleet_per_transport(up_server: ServerProcess, transport: str) -> None:
    report = fleet(
        up_server,
        *("--devices", "6", "--transport", transport, "--scenario", "p2p"),
        *("--rate", "60", "--duration", "1", "--prefix", f"f-{transport}-"),
    )
    assert_complete(report)
    assert report["transports"] == {transport: 6}
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_fleet_200_mixed_offline(up_server: ServerProcess) -> None:
    """DESIGN/issue 6: 200 devices, mixed transports, offline periods — nothing lost,
    every duplicate absorbed (each delivery counted once), from the simulator's counts."""
    report = fleet(
        up_server,
        *("--devices", "200", "--transport", "mixed", "--scenario", "offline"),
        *("--rate", "300", "--duration", "3", "--prefix", "f-off-"),
        timeout="30",
    )
    assert_complete(report)
    assert report["transports"] == {"tcp": 67, "mqtt": 67, "serial": 66}
    assert report["offline_periods"] == 50 and report["connection_drops"] == 50
    assert report["duplicates"] >= 0


def test_fleet_topic_and_mixed_text_mode(up_server: ServerProcess) -> None:
    report = fleet(
        up_server,
        *("--devices", "12", "--transport", "mixed", "--scenario", "topic"),
        *("--rate", "40", "--duration", "1", "--prefix", "f-topic-"),
    )
    assert_complete(report)
    assert report["expected_deliveries"] > report["accepted"]  # one publish, several members
    # Text mode: the summary on stdout, plain progress lines on stderr (not a TTY).
    proc = up_server.cli(
        "sim",
        *("--devices", "8", "--transport", "mixed", "--scenario", "mixed"),
        *("--rate", "40", "--duration", "1", "--prefix", "f-text-", "--timeout", "20"),
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("sent ") and " lost 0, latency p50 " in last, proc.stdout
    assert "\r" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("[####################] done")


def test_fleet_sealed_end_to_end(up_server: ServerProcess) -> None:
    report = fleet(
        up_server,
        *("--devices", "6", "--transport", "mixed", "--scenario", "p2p", "--e2e"),
        *("--rate", "40", "--duration", "1", "--prefix", "f-e2e-"),
    )
    assert_complete(report)
    assert report["sealed"] == report["delivered"]  # every delivery arrived sealed, opened
    proc = up_server.cli("sim", "--devices", "4", "--scenario", "topic", "--e2e", check=False)
    assert proc.returncode != 0 and "p2p and offline" in proc.stderr


def test_fleet_refuses_too_many_serial(up_server: ServerProcess) -> None:
    proc = up_server.cli("sim", "--devices", "200", "--transport", "serial", check=False)
    assert proc.returncode != 0
    assert "at most 100" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_tiny(up_server: ServerProcess) -> None:
    proc = up_server.cli(
        "bench",
        *("--count", "300", "--pairs", "3", "--batch", "10", "--idle", "20"),
        *("--timeout", "20", "--paced", "0.2", "--rates", "2000", "--repeat", "2"),
        *("--json", "--quiet"),
    )
    doc = json.loads(proc.stdout)
    systems = {r["system"]: r for r in doc["results"]}
    assert {"gateway-tcp", "gateway-mqtt", "amqtt-qos0", "amqtt-qos1"} <= set(systems)
    for name in ("gateway-tcp", "gateway-mqtt", "amqtt-qos1"):
        row = systems[name]
        assert row["delivered"] == 300 and row["lost"] == 0, row
        assert row["msgs_per_s"] > 0 and row["p50_ms"] is not None
        assert row["cpu_s_per_1000"] is not None
        assert set(row["idle_kib"]) == {"20"}
    assert systems["gateway-tcp"]["refused"] == 0
    # --repeat: the TCP run twice, the lower of the two reported, both listed.
    runs = systems["gateway-tcp"]["runs"]
    assert len(runs) == 2 and all(r["delivered"] == 300 and r["lost"] == 0 for r in runs)
    assert systems["gateway-tcp"]["msgs_per_s"] == min(r["msgs_per_s"] for r in runs)
    assert doc["config"]["repeat"] == 2
    paced = systems["gateway-tcp"]["paced"]
    assert paced[0]["rate"] == 1000 and all(p["count"] > 0 for p in paced)
    assert all(p["delivered"] == p["count"] and p["lost"] == 0 for p in paced), paced
    assert 2000 in [p["rate"] for p in paced]  # --rates adds to the sweep
    assert all(p["of_peak"] > 0 for p in paced)
    assert doc["machine"]["nproc"] >= 1 and doc["config"]["count"] == 300
    assert set(doc["ratios"]) == {
        "tcp_vs_mosquitto_c",
        "tcp_vs_amqtt_qos0",
        "tcp_cpu_vs_mosquitto_cpu",
        "mqtt_vs_amqtt_qos1",
    }


def test_bench_pacing_gives_each_sender_its_share() -> None:
    """The paced bench sends message i from sender i % senders: each sender's share of
    any span of messages, by arithmetic, is what counting them one by one gives."""
    for start in range(0, 60):
        for length in range(0, 70):
            for parts in (1, 2, 3, 7, 20):
                want = [0] * parts
                for i in range(start, start + length):
                    want[i % parts] += 1
                assert _shares(start, start + length, parts) == want, (start, length, parts)
