"""``fishchat-iot sim``, ``send`` and ``listen`` as an operator runs them: subprocesses
against a real ``fishchat-iot up``, reading stdout, stderr and exit codes."""

from __future__ import annotations

import json
import subprocess

from .conftest import CLI, SdkServer, cli_env


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_sim_registers_devices_and_reports(server: SdkServer) -> None:
    # No --gateway: sim finds the server running on the data directory.
    proc = server.cli("sim", "--count", "2", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    for i in (1, 2):
        for a, b in (("sim-1", "sim-2"), ("sim-2", "sim-1")):
            assert f"{a} -> {b}: hello {i} (accepted)" in lines
            assert f"{b} <- {a}: hello {i}" in lines
    assert lines[-1] == "sent 4, accepted 4, delivered 4, duplicates absorbed 0, lost 0"
    # Per pair, delivery order is send order.
    got = [ln for ln in lines if ln.startswith("sim-2 <- sim-1")]
    assert got == ["sim-2 <- sim-1: hello 1", "sim-2 <- sim-1: hello 2"]

    # Registered once; a second run must be told to use the bundles.
    err = one_error_line(server.cli("sim"))
    assert "already exist" in err and "--bundle" in err
    assert str(server.data_dir / "bundles" / "sim-1.json") in err

    # With bundles (a path and a bare device id), three devices, JSON.
    server.register("sim-3")
    proc = server.cli(
        "sim",
        "--bundle",
        server.data_dir / "bundles" / "sim-1.json",
        "--bundle",
        "sim-2",
        "--bundle",
        "sim-3",
        "--count",
        "3",
        "--interval",
        "0",
        "--gateway",
        server.gateway,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["devices"] == ["sim-1", "sim-2", "sim-3"]
    assert (doc["sent"], doc["accepted"], doc["delivered"]) == (18, 18, 18)
    assert (doc["lost"], doc["refused"], doc["duplicates"]) == (0, 0, 0)


def test_sim_errors_are_one_line(server: SdkServer, tmp_path: object) -> None:
    server.register("alice")
    err = one_error_line(server.cli("sim", "--bundle", "alice"))
    assert "at least two" in err
    err = one_error_line(server.cli("sim", "--bundle", "alice", "--bundle", "nobody"))
    assert "nobody" in err
    err = one_error_line(server.cli("sim", "--bundle", "alice", "--bundle", "alice"))
    assert "twice" in err
    server.register("bob")
    err = one_error_line(
        server.cli("sim", "--bundle", "alice", "--bundle", "bob", "--gateway", "127.0.0.1:1")
    )
    assert "cannot reach" in err and "127.0.0.1:1" in err
    err = one_error_line(server.cli("sim", "--devices", "1"))
    assert "--devices" in err


def test_send_and_listen(server: SdkServer) -> None:
    alice = server.register("alice")
    server.register("bob")
    listen = subprocess.Popen(
        [
            *CLI,
            "--data-dir",
            str(server.data_dir),
            "listen",
            "--as",
            "bob",
            "--count",
            "2",
            "--timeout",
            "30",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        sent = server.cli("send", "--as", alice["bundle_path"], "--to", "bob", "hello bob")
        assert sent.returncode == 0, sent.stderr
        first_id = sent.stdout.strip()
        assert first_id and "\n" not in first_id
        sent = server.cli(
            "send", "--as", "alice", "--to", "bob", "--id", "fixed-1", "second", "--json"
        )
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout) == {
            "id": "fixed-1",
            "from": "alice",
            "to": "bob",
            "accepted": True,
        }
        out, err = listen.communicate(timeout=60)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    assert listen.returncode == 0, err
    msgs = [json.loads(line) for line in out.splitlines()]
    assert [(m["id"], m["from"], m["to"], m["text"]) for m in msgs] == [
        (first_id, "alice", "bob", "hello bob"),
        ("fixed-1", "alice", "bob", "second"),
    ]

    # Acked once printed: nothing is left for bob.
    proc = server.cli("listen", "--as", "bob", "--timeout", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""

    # Text mode, queued message, --count reached.
    server.cli("send", "--as", "alice", "--to", "bob", "queued", check=True)
    proc = server.cli("listen", "--as", "bob", "--count", "1", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "bob <- alice: queued\n"


def test_send_and_listen_errors(server: SdkServer) -> None:
    server.register("alice")
    err = one_error_line(server.cli("send", "--as", "alice", "--to", "nobody", "x"))
    assert "UNKNOWN_DEVICE" in err
    err = one_error_line(server.cli("send", "--as", "ghost", "--to", "alice", "x"))
    assert "no bundle 'ghost'" in err
    err = one_error_line(
        server.cli("send", "--as", "alice", "--to", "alice", "--gateway", "nonsense", "x")
    )
    assert "HOST:PORT" in err
    err = one_error_line(server.cli("listen", "--as", "alice", "--count", "1", "--timeout", "1"))
    assert "received 0 of 1" in err
    server.cli("device", "revoke", "alice", check=True)
    err = one_error_line(server.cli("send", "--as", "alice", "--to", "alice", "x"))
    assert "alice" in err and ("revoked" in err or "refused" in err)
