"""The monitor's JSON API, /metrics and access control against a real server and
simulated devices (firmware_sim.tcp_device)."""

from __future__ import annotations

import asyncio
import json
import re
import stat

from support.waiting import eventually

from firmware_sim.tcp_device import TcpDevice

from .conftest import Monitored, http


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"no {name}{labels} in /metrics:\n{text}"
    return float(m.group(1))


async def test_counts_match_the_simulator(monitored: Monitored) -> None:
    srv = monitored.server
    tokens = srv.register_many(["m-a", "m-b", "m-c"])
    srv.topic_create("m-room", "m-a", ["m-b", "m-c"])
    a = TcpDevice("m-a", tokens["m-a"], msg_server=srv.msg_server)
    b = TcpDevice("m-b", tokens["m-b"], msg_server=srv.msg_server)
    async with a, b:
        for i in range(40):
            await a.send("m-b", f"p2p {i}")
        for i in range(10):
            await a.send("m-c", f"offline {i}")  # m-c is offline: queued
        for i in range(5):
            await b.publish("m-room", f"topic {i}")  # to m-a live, to m-c queued
        got = 0
        async with asyncio.timeout(10):
            while got < 40:
                await b.receive()
                got += 1
            for _ in range(5):
                await a.receive()
        bad = TcpDevice("m-a", "wrong-token", msg_server=srv.msg_server, reconnect=False)
        try:
            await bad.connect()
        except Exception:
            pass
        await bad.close()

        def status_ok() -> bool:
            t = monitored.get("/api/status").json()["totals"]
            return t["queued_now"] == 15 and t["auth_failures"] == 1

        await eventually(status_ok, "queue depth and auth failures seen by the monitor")
        doc = monitored.get("/api/status").json()
        t = doc["totals"]
        # accepted: 40 + 10 p2p, 5 topic sends; delivered: 40 to b + 5 to a (live).
        assert t["msgs_in"] == 55, t
        assert t["msgs_out"] == 45, t
        # Every message that went through an offline queue: the 15 still there, plus
        # any sent while b's session was still being fed from its queue after login.
        assert 15 <= t["msgs_queued"] <= 55, t
        assert t["sessions"] == 2 and t["sessions_by_transport"] == {"tcp": 2}, t
        assert doc["nodes"][0]["sessions"] == 2 and doc["nodes"][0]["health"] == "ok"

        text = monitored.get("/metrics").text
        assert metric(text, "fishchat_messages_accepted_total") == 55
        assert metric(text, "fishchat_messages_delivered_total") == 45
        assert metric(text, "fishchat_messages_queued_total") == t["msgs_queued"]
        assert metric(text, "fishchat_offline_queue_messages") == 15
        assert metric(text, "fishchat_sessions", '{transport="tcp"}') == 2
        assert metric(text, "fishchat_auth_failures_total", '{kind="device"}') == 1
        assert metric(text, "fishchat_delivery_latency_seconds_count") == 45
        assert metric(text, "fishchat_delivery_latency_seconds_bucket", '{le="+Inf"}') == 45
        assert metric(text, "process_resident_memory_bytes") > 1e6
        assert metric(text, "process_open_fds") > 3
        assert metric(text, "process_cpu_seconds_total") > 0

        devs = monitored.get("/api/devices?q=m-").json()
        by_id = {d["id"]: d for d in devs["devices"]}
        assert devs["total"] == 3 and devs["online"] == 2
        assert by_id["m-a"]["online"] and by_id["m-a"]["transport"] == "tcp"
        assert by_id["m-a"]["address"] == srv.msg_server
        assert not by_id["m-c"]["online"] and by_id["m-c"]["queued"] == 15
        topics = monitored.get("/api/topics").json()["topics"]
        assert topics == [
            {
                "name": "m-room",
                "owner": "m-a",
                "open": True,
                "members": 3,
                "members_online": 2,
                "messages": 5,
                "created_ms": topics[0]["created_ms"],
            }
        ]
        events = monitored.get("/api/events").json()
        assert [(e["device_id"], e["code"]) for e in events["refused_logins"]] == [
            ("m-a", "AUTH_FAILED")
        ]
        series = monitored.get("/api/series").json()
        assert series["points"] and series["points"][-1][3] == 2

        # Operator actions: kick m-b's session, revoke m-a.
        assert monitored.post("/api/sessions/m-b/kick").status == 200
        assert monitored.post("/api/devices/m-a/revoke").status == 200
        await eventually(lambda: a.closed, "m-a's session closed by the revocation")
        assert a.final_error is not None and a.final_error.code == "REVOKED"
        devs = monitored.get("/api/devices?q=m-a").json()["devices"]
        assert devs[0]["state"] == "revoked" and not devs[0]["online"]
        listed = json.loads(srv.cli("device", "list", "--json").stdout)
        assert any(d["id"] == "m-a" and d["revoked"] for d in listed)
        assert monitored.post("/api/devices/nobody/revoke").status == 404


def test_status_command_uses_the_monitor(monitored: Monitored) -> None:
    doc = json.loads(monitored.server.cli("status", "--json").stdout)
    assert doc["running"] and doc["source"] == "monitor", doc
    assert doc["listeners"]["monitor"] == monitored.server.monitor
    assert doc["nodes"][0]["role"] == "msg_server"


def test_without_a_token_401_and_a_login_page(monitored: Monitored) -> None:
    base = monitored.base
    for path in ("/api/status", "/api/devices", "/metrics", "/api/stream"):
        r = http(base + path)
        assert r.status == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = http(base + "/")
    assert r.status == 303 and r.headers["location"] == "/login"
    page = http(base + "/login")
    assert page.status == 200 and 'name="token"' in page.text
    assert http(base + "/healthz").json() == {"status": "ok"}
    assert http(base + "/readyz").json()["status"] == "ready"
    # The login form sets a session cookie that the API takes.
    r = http(
        base + "/login",
        method="POST",
        body=f"token={monitored.token}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in r.headers["set-cookie"]
    r = http(base + "/api/whoami", headers={"Cookie": cookie})
    assert r.status == 200 and r.json() == {"operator": "ops"}
    # A cookie session cannot POST a form (CSRF): JSON only.
    r = http(
        base + "/api/devices/x/revoke",
        method="POST",
        body=b"a=1",
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status == 415
    ops = monitored.server.data_dir / "operators.json"
    assert stat.S_IMODE(ops.stat().st_mode) == 0o600
    assert monitored.token not in ops.read_text()  # stored hashed


def test_wrong_tokens_are_throttled(monitored: Monitored) -> None:
    codes = [monitored.get("/api/status", token=f"wrong-{i}").status for i in range(7)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429, codes
    r = monitored.get("/api/status")  # even the right token waits out the lock
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1
    r = http(monitored.base + "/login", method="POST", body=f"token={monitored.token}".encode())
    assert r.status == 429
    text = monitored.server.log_text()
    assert "wrong operator token" in text


def test_metrics_on_a_separate_open_bind(up_server_factory) -> None:  # type: ignore[no-untyped-def]
    server = up_server_factory(config={"monitor": {"metrics_port": 0}})
    metrics = server.ready["metrics"]
    assert http(f"http://{metrics}/metrics").status == 200
    assert http(f"http://{metrics}/healthz").status == 200
    assert http(f"http://{metrics}/api/status").status == 404
    assert http(f"http://{server.monitor}/metrics").status == 401


def test_monitor_off(up_server_factory) -> None:  # type: ignore[no-untyped-def]
    server = up_server_factory(config={"monitor": {"enabled": False}})
    assert server.ready["monitor"] is None and server.monitor == ""
