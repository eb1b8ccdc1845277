"""Abuse limits ([limits]): per-device message and byte rates, failed-login throttling
per address and per device id, connection-rate limits — and the server keeps serving
everyone else. Clients come from distinct loopback addresses (127.0.0.x) so the
per-address limits of one do not touch the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.raw_client import ConnectionClosed, RawClient, split_addr
from support.server import ServerProcess

from fishchat_iot import errors
from fishchat_iot.config import Settings

from .conftest import finish, mqtt_connect

RATES: dict[str, Any] = {
    "exempt": "",
    "msg_rate": 20.0,
    "msg_burst": 10,
    "byte_rate": 20000.0,
    "byte_burst": 20000,
    "login_fail_burst": 5,
    "login_fail_device_burst": 8,
    "login_fail_refill": 0.01,
    "conn_rate": 5.0,
    "conn_burst": 10,
}


RATES_DEFAULT_ADDR_BURST = 10  # limits.login_fail_burst's default


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("limits"), config={"limits": RATES})
    server.start()
    yield server
    finish(server)


async def connect_from(addr: str, local: str, timeout: float = 10.0) -> RawClient:
    host, port = split_addr(addr)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(local, 0), limit=1 << 22), timeout
    )
    client = RawClient(reader, writer)
    client.msg_server_addr = addr
    return client


async def test_message_rate_token_session(limited: ServerProcess, uid: str) -> None:
    a, b = f"{uid}-a", f"{uid}-b"
    tok = limited.register_many([a, b])
    dev_a = await connect_from(limited.msg_server, "127.0.0.11")
    dev_b = await connect_from(limited.msg_server, "127.0.0.12")
    await dev_a.login(a, tok[a])
    await dev_b.login(b, tok[b])
    await dev_a.send_frames(("SEND_MESSAGE_P2P", [b, f"m{i}", a, f"m{i}"]) for i in range(40))
    accepted, limited_ids = [], []
    for _ in range(40):
        f = await dev_a.recv()
        if f.cmd == "ACCEPTED":
            accepted.append(f.args[0])
        else:
            assert f.cmd == "ERROR" and f.args[0] == errors.RATE_LIMITED, f
            limited_ids.append(f.args[2])
    assert 10 <= len(accepted) <= 13 and len(limited_ids) == 40 - len(accepted)
    assert accepted == [f"m{i}" for i in range(len(accepted))]  # the first ones, in order
    # b is served meanwhile; a gets through again once the rate allows.
    await dev_b.send_p2p(a, "from b", "b1")
    while (f := await dev_b.recv()).cmd == "RESP_MESSAGE_P2P":  # a's accepted ones
        pass
    assert f == ("ACCEPTED", ["b1"]), f
    await asyncio.sleep(0.3)
    await dev_a.send_p2p(b, "later", "late1")
    while (f := await dev_a.recv()).cmd == "RESP_MESSAGE_P2P":  # b's message
        pass
    assert f == ("ACCEPTED", ["late1"]), f
    await dev_a.close()
    await dev_b.close()


async def test_message_rate_v1_session_is_paused(limited: ServerProcess, uid: str) -> None:
    a, b = f"{uid}-a", f"{uid}-b"
    limited.cli("device", "register", a, "--v1")
    tok = limited.register_many([b])
    dev_a = await connect_from(limited.msg_server, "127.0.0.13")
    await dev_a.login_v1(a)
    dev_b = await connect_from(limited.msg_server, "127.0.0.14")
    await dev_b.login(b, tok[b])
    await dev_a.send_frames(("SEND_MESSAGE_P2P", [b, f"v{i}", a]) for i in range(40))
    for _ in range(40):  # all served: a v1 device is never told ERROR
        await dev_b.expect("RESP_MESSAGE_P2P")
    start = time.monotonic()
    await dev_a.send("SEND_MESSAGE_P2P", b, "after", a)
    args = await dev_b.expect("RESP_MESSAGE_P2P", timeout=10)
    waited = time.monotonic() - start
    assert args[0] == "after" and waited >= 1.0, waited  # (40 - 10) / 20 = 1.5 s of debt
    assert dev_a.v1_violations() == []
    await dev_a.close()
    await dev_b.close()


async def test_message_rate_holds_for_frames_held_back_and_handled_later(
    up_server_factory: Any, uid: str
) -> None:
    """Frames a device sent while the server held it back (here: too many sends waiting
    for the store, delivery.max_pending_receipts) are handled later, and count against
    its rate like any others: a v1 device over its rate is paused afterwards."""
    server = up_server_factory(config={"limits": RATES, "delivery": {"max_pending_receipts": 4}})
    a, b = f"{uid}-a", f"{uid}-b"
    server.cli("device", "register", a, "--v1")
    tok = server.register_many([b])
    dev_a = await connect_from(server.msg_server, "127.0.0.15")
    await dev_a.login_v1(a)
    # b is offline: every send waits for the store, so after 4 the rest of the write is
    # held back and handled as receipts come back.
    sent_at = time.monotonic()
    await dev_a.send_frames(("SEND_MESSAGE_P2P", [b, f"q{i}", a]) for i in range(40))
    dev_b = await connect_from(server.msg_server, "127.0.0.16")
    await dev_b.login(b, tok[b])
    got = [(await dev_b.expect("RESP_MESSAGE_P2P"))[0] for _ in range(40)]
    assert got == [f"q{i}" for i in range(40)]
    await dev_a.send("SEND_MESSAGE_P2P", b, "after", a)
    args = await dev_b.expect("RESP_MESSAGE_P2P", timeout=10)
    # The bucket held at most its burst (10) when the 40 were sent and refills at 20 a
    # second: (40 - 10) / 20 = 1.5 s after sent_at at the earliest is a's reading
    # resumed and "after" read, however long the store, b's login and the 40 deliveries
    # took (a slow machine only makes it later). Had the held frames not counted,
    # "after" would come right behind them.
    since = time.monotonic() - sent_at
    assert args[0] == "after" and since >= 1.4, since
    assert dev_a.v1_violations() == []
    await dev_a.close()
    await dev_b.close()


async def test_byte_rate_pauses_reading(limited: ServerProcess, uid: str) -> None:
    a, off = f"{uid}-a", f"{uid}-offline"
    tok = limited.register_many([a, off])
    dev = await connect_from(limited.msg_server, "127.0.0.15")
    await dev.login(a, tok[a])
    big = "x" * 10000
    await dev.send_frames(("SEND_MESSAGE_P2P", [off, big, a, f"b{i}"]) for i in range(5))
    for _ in range(5):
        await dev.expect("ACCEPTED")
    start = time.monotonic()
    await dev.send("SEND_PING")
    frames = []
    while True:
        f = await dev.recv(10)
        if f.cmd == "PONG":
            break
        frames.append(f)
    waited = time.monotonic() - start
    assert waited >= 0.8, waited  # ~50 KB against 20 KB/s with a 20 KB burst: ~1.5 s
    await dev.close()


async def test_failed_login_throttling(limited: ServerProcess, uid: str) -> None:
    victim, other, target = f"{uid}-v", f"{uid}-o", f"{uid}-t"
    tok = limited.register_many([victim, other, target])
    mark = limited.log_mark()

    async def attempt(local: str, device_id: str, token: str) -> str:
        c = await connect_from(limited.msg_server, local)
        try:
            await c.send("SEND_CLIENT_ID", device_id, token)
            try:
                f = await c.recv(10)
            except ConnectionClosed:
                return "closed"
            return f.cmd if f.cmd != "ERROR" else f.args[0]
        finally:
            await c.close()

    # One address, many wrong tokens (the connection-rate limit aside: sequential and
    # paced above conn_rate would take too long, so count only the answers).
    answers = []
    for _ in range(12):
        answers.append(await attempt("127.0.0.21", victim, "wrong-token"))
        await asyncio.sleep(0.2)  # within limits.conn_rate
    assert answers[:5] == [errors.AUTH_FAILED] * 5, answers
    assert set(answers[5:]) == {errors.THROTTLED}, answers
    # The right token from that address is throttled too; other addresses are not.
    assert await attempt("127.0.0.21", other, tok[other]) == errors.THROTTLED
    start = time.monotonic()
    assert await attempt("127.0.0.22", other, tok[other]) == "LOGIN_OK"
    assert time.monotonic() - start < 1.0
    assert await attempt("127.0.0.22", victim, tok[victim]) == "LOGIN_OK"
    limited.wait_log(r"logins from 127\.0\.0\.21 throttled", since=mark)
    # Per device id: wrong tokens from many addresses.
    answers = [await attempt(f"127.0.1.{i}", target, "wrong") for i in range(1, 11)]
    assert answers[:8] == [errors.AUTH_FAILED] * 8 and answers[8:] == [errors.THROTTLED] * 2
    limited.wait_log(r"logins as \S+-t throttled", since=mark)


async def test_connection_rate(limited: ServerProcess, uid: str) -> None:
    a = f"{uid}-a"
    tok = limited.register_many([a])
    clients = [await connect_from(limited.msg_server, "127.0.0.31") for _ in range(20)]
    await asyncio.sleep(0.5)
    closed = 0
    for c in clients:
        if c.closed_by_server:
            closed += 1
            assert c.received == []  # no frame
        await c.close()
    assert 8 <= closed <= 11, closed  # a burst of 10 (and a little refill) got through
    other = await connect_from(limited.msg_server, "127.0.0.32")
    await other.login(a, tok[a])
    await other.close()


async def test_mqtt_rate_and_login_throttling(limited: ServerProcess, uid: str) -> None:
    a, b = f"{uid}-a", f"{uid}-b"
    tok = limited.register_many([a, b])
    addr = limited.ready["mqtt"]
    dev = await asyncio.to_thread(mqtt_connect, addr, a, password=tok[a], bind="127.0.0.41")
    try:
        assert dev.reason is not None and not dev.reason.is_failure, dev.reason
        await asyncio.sleep(0.3)  # subscribed
        for i in range(30):
            dev.client.publish(f"fc/{a}/p2p/{b}", json.dumps({"id": f"q{i}", "body": "x"}), 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kinds = [json.loads(m) for m in list(dev.messages)]
            done = [k for k in kinds if k.get("kind") in ("accepted", "error")]
            if len(done) >= 30:
                break
            await asyncio.sleep(0.05)
        limited_ids = [k["ref"] for k in done if k.get("code") == errors.RATE_LIMITED]
        accepted = [k["id"] for k in done if k.get("kind") == "accepted"]
        assert 10 <= len(accepted) <= 13 and len(limited_ids) == 30 - len(accepted), done
    finally:
        await asyncio.to_thread(dev.stop)
    # Wrong passwords from one address: after limits.login_fail_burst even the right
    # one is refused (throttled, not looked up); another address still connects.
    for _ in range(7):
        bad = await asyncio.to_thread(
            mqtt_connect, addr, b, password="wrong", bind="127.0.0.42", timeout=5
        )
        await asyncio.to_thread(bad.stop)
    refused = await asyncio.to_thread(
        mqtt_connect, addr, b, password=tok[b], bind="127.0.0.42", timeout=5
    )
    assert refused.disconnected.is_set() or refused.reason.is_failure
    await asyncio.to_thread(refused.stop)
    ok = await asyncio.to_thread(mqtt_connect, addr, b, password=tok[b], bind="127.0.0.43")
    assert ok.reason is not None and not ok.reason.is_failure
    await asyncio.to_thread(ok.stop)


async def test_brute_force_1000_tokens(up_server_factory: Any, uid: str) -> None:
    """1000 wrong tokens for one device from one address: throttled after
    limits.login_fail_burst, logged (not 1000 times), and other devices' logins take
    no longer meanwhile."""
    server = up_server_factory(config={"limits": {"exempt": "", "conn_rate": 0}})
    victim, other = f"{uid}-v", f"{uid}-o"
    tok = server.register_many([victim, other])
    mark = server.log_mark()

    async def login_time(local: str) -> float:
        start = time.monotonic()
        c = await connect_from(server.msg_server, local)
        await c.login(other, tok[other])
        took = time.monotonic() - start
        await c.close()
        return took

    baseline = sorted([await login_time("127.0.0.61") for _ in range(10)])[5]
    answers: dict[str, int] = {}

    async def attacker(n: int) -> None:
        for _ in range(n):
            c = await connect_from(server.msg_server, "127.0.0.62")
            await c.send("SEND_CLIENT_ID", victim, "wrong-token")
            try:
                f = await c.recv(10)
                code = f.args[0] if f.cmd == "ERROR" else f.cmd
            except ConnectionClosed:
                code = "closed"
            answers[code] = answers.get(code, 0) + 1
            await c.close()

    started = time.monotonic()
    attack = asyncio.gather(*(attacker(100) for _ in range(10)))
    during = []
    while not attack.done():
        during.append(await login_time("127.0.0.63"))
    await attack
    # The burst, plus one more for every 10 s the attack took (limits.login_fail_refill
    # forgives 0.1 a second): a slow machine may see one or two refills.
    refilled = int((time.monotonic() - started) * Settings().limits.login_fail_refill)
    assert sum(answers.values()) == 1000
    failed = answers.get(errors.AUTH_FAILED, 0)
    assert RATES_DEFAULT_ADDR_BURST <= failed <= RATES_DEFAULT_ADDR_BURST + refilled, answers
    assert answers.get(errors.THROTTLED) == 1000 - failed, answers
    median = sorted(during)[len(during) // 2]
    print(f"login: {baseline * 1000:.1f} ms before, {median * 1000:.1f} ms during the attack")
    assert median < max(3 * baseline, baseline + 0.05), (baseline, median)
    throttled = [
        line for line in server.warnings_since(mark) if "throttled" in line and "127.0.0.62" in line
    ]
    assert 1 <= len(throttled) <= 3, throttled  # logged, at most every 10 s
