"""MQTT -> MQTT p2p through the gateway's embedded broker against plain amqtt pub -> sub:
the same paho clients (one publisher, one subscriber, each with its network thread),
the same 64-byte body, QoS 1, one run each on the same machine. Not a test: a figure
for docs/benchmarks.md.

    .venv/bin/python tests/mqtt/bench_mqtt.py [-n 20000]

Plain amqtt: the publisher publishes N messages on one topic, the subscriber counts them.
Gateway: the publisher publishes N envelopes on ``fc/alice/p2p/bob`` and counts its
``accepted`` receipts; the subscriber counts deliveries on ``fc/bob/in`` and acks them
(every 100). Done when every message arrived (and, for the gateway, every receipt).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

CLI = [str(Path(sys.executable).with_name("fishchat-iot"))]
BODY = "x" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(cid: str, port: int, user: str = "", password: str = "") -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    if user:
        c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, keepalive=60)
    return c


def subscribe(c: mqtt.Client, topic: str) -> None:
    ready = threading.Event()
    c.on_subscribe = lambda *a: ready.set()
    c.subscribe(topic, qos=1)
    c.loop_start()
    if not ready.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_plain(n: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim.bench.plain_amqtt", str(port)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        got = 0
        done = threading.Event()

        def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        sub = client("bench-sub", port)
        sub.on_message = on_message
        subscribe(sub, "bench/t")
        pub = client("bench-pub", port)
        pub.loop_start()
        payload = orjson.dumps({"id": "x", "body": BODY})
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish("bench/t", payload, qos=1)
        done.wait(120)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
        return {"delivered": got, "seconds": elapsed, "msgs_per_s": got / elapsed, "cpu_s": cpu}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def run_gateway(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        tokens = {}
        for dev in ("alice", "bob"):
            out = subprocess.run(
                [*CLI, "--data-dir", str(data), "device", "register", dev, "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            tokens[dev] = json.loads(out.stdout)["token"]
        up = ["up", "--gateway-port", "0", "--msg-port", "0", "--mqtt-port", "0"]
        proc = subprocess.Popen(
            [*CLI, "--data-dir", str(data), *up, "--log-level", "warning", "--json"],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            port = int(json.loads(proc.stdout.readline())["mqtt"].rpartition(":")[2])
            delivered = receipts = 0
            done = threading.Event()
            acks: list[str] = []

            def on_delivery(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
                nonlocal delivered
                doc = orjson.loads(m.payload)
                if doc.get("kind") == "p2p":
                    delivered += 1
                    acks.append(doc["id"])
                    if len(acks) >= 100 or delivered == n:
                        c.publish("fc/bob/ack", orjson.dumps({"ids": acks}), qos=1)
                        acks.clear()
                if delivered == n and receipts == n:
                    done.set()

            def on_receipt(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
                nonlocal receipts
                if orjson.loads(m.payload).get("kind") == "accepted":
                    receipts += 1
                if delivered == n and receipts == n:
                    done.set()

            sub = client("bob", port, "bob", tokens["bob"])
            sub.on_message = on_delivery
            subscribe(sub, "fc/bob/in")
            pub = client("alice", port, "alice", tokens["alice"])
            pub.on_message = on_receipt
            subscribe(pub, "fc/alice/in")
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            for i in range(n):
                pub.publish("fc/alice/p2p/bob", orjson.dumps({"id": f"m{i}", "body": BODY}), qos=1)
            done.wait(120)
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            for c in (pub, sub):
                c.disconnect()
                c.loop_stop()
            return {
                "delivered": delivered,
                "receipts": receipts,
                "seconds": elapsed,
                "msgs_per_s": delivered / elapsed,
                "cpu_s": cpu,
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


def run_mosquitto_burst(n: int, max_queued: int | None) -> dict[str, float]:
    """External mode: one device bursts N QoS 1 messages through Mosquitto to the
    gateway; receipts counted after 20 s with no resend. With Mosquitto's default
    max_queued_messages (1000) the messages queued beyond it for the gateway's
    subscription are dropped silently (PUBACKed to the device all the same)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        cfg = root / "gw.toml"
        mport = free_port()
        cfg.write_text(
            f'[mqtt]\nmode = "external"\nbroker_port = {mport}\npassword = "gw-secret"\n'
        )
        base = [*CLI, "--data-dir", str(data), "--config", str(cfg)]
        tokens = {}
        for dev in ("alice", "bob"):
            out = subprocess.run(
                [*base, "device", "register", dev, "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            tokens[dev] = json.loads(out.stdout)["token"]
        files = root / "mosq"
        subprocess.run([*base, "mqtt", "export-mosquitto", "--out", str(files)], check=True)
        conf = [
            f"listener {mport} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {files / 'passwd'}",
            f"acl_file {files / 'acl'}",
            "use_username_as_clientid true",
            "persistence false",
            "user root" if os.geteuid() == 0 else "",
        ]
        if max_queued is not None:
            conf.append(f"max_queued_messages {max_queued}")
        (root / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        mosq = subprocess.Popen(
            ["mosquitto", "-c", str(root / "mosquitto.conf")], stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        gw = subprocess.Popen(
            [*base, "up", "--gateway-port", "0", "--msg-port", "0", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert gw.stdout is not None
            gw.stdout.readline()
            receipts = 0
            pubacks = 0

            def on_receipt(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
                nonlocal receipts
                if orjson.loads(m.payload).get("kind") == "accepted":
                    receipts += 1

            def on_puback(*a: object) -> None:
                nonlocal pubacks
                pubacks += 1

            pub = client("alice", mport, "alice", tokens["alice"])
            pub.on_message = on_receipt
            pub.on_publish = on_puback
            subscribe(pub, "fc/alice/in")
            hello = {"op": "hello", "token": tokens["alice"], "session": "s"}
            pub.publish("fc/alice/ctl", orjson.dumps(hello), qos=1)
            time.sleep(0.5)
            for i in range(n):
                pub.publish("fc/alice/p2p/bob", orjson.dumps({"id": f"m{i}", "body": BODY}), qos=1)
            deadline = time.monotonic() + 20
            while receipts < n and time.monotonic() < deadline:
                time.sleep(0.1)
            pub.disconnect()
            pub.loop_stop()
            return {"sent": n, "pubacked": pubacks, "accepted": receipts, "lost": n - receipts}
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(20)
            mosq.terminate()
            mosq.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="messages per run (default 20000)")
    ap.add_argument(
        "--mosquitto",
        action="store_true",
        help="instead: a burst through Mosquitto in external mode, default vs large "
        "max_queued_messages",
    )
    args = ap.parse_args()
    if args.mosquitto:
        default = run_mosquitto_burst(args.n, None)
        large = run_mosquitto_burst(args.n, 100000)
        print(json.dumps({"max_queued_messages 1000 (default)": default, "100000": large}))
        return
    plain = run_plain(args.n)
    gw = run_gateway(args.n)
    print(json.dumps({"n": args.n, "plain_amqtt_qos1": plain, "gateway_qos1": gw}, indent=2))
    print(f"gateway / plain amqtt = {gw['msgs_per_s'] / plain['msgs_per_s']:.2f}")


if __name__ == "__main__":
    main()
