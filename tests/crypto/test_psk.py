"""Gateway-terminated devices (docs/crypto.md section 7) against a real ``fishchat-iot up``:
a device registered ``--psk`` seals what it sends under its pre-shared key, the gateway
opens it (a body that does not open is refused with BAD_SEAL and goes nowhere), seals it
at rest when it is queued and under the recipient's PSK when the recipient is a PSK
device; an end-to-end device gets it as plaintext flagged ``enc`` ``none``. The PSK is
never in the database in the clear, nor is a message's text."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from support.raw_client import RawClient
from support.server import ServerProcess
from support.waiting import eventually, nothing_more

from firmware_sim.tcp_device import NO_KEY, DeviceError, TcpDevice
from fishchat_iot import errors
from fishchat_iot.crypto import b64d, b64e
from fishchat_iot.crypto.device import PskCrypto
from fishchat_iot.crypto.seal import ENC_PSK

from .test_e2e_server import file_mode, read_json, scan


def register(server: ServerProcess, device_id: str, *flags: str) -> dict[str, Any]:
    out = json.loads(server.cli("device", "register", device_id, *flags, "--json").stdout)
    bundle: dict[str, Any] = json.loads(Path(out["bundle"]).read_text())
    bundle["bundle_path"] = out["bundle"]
    return bundle


def device(server: ServerProcess, bundle: dict[str, Any], **kw: Any) -> TcpDevice:
    kw.setdefault("backoff_max", 0.5)
    return TcpDevice.from_bundle(
        bundle, gateway=server.gateway, msg_server=server.msg_server, e2e=True, **kw
    )


def stored(server: ServerProcess) -> bytes:
    db = server.data_dir / "fishchat.db"
    wal = Path(f"{db}-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def accepts_token(server: ServerProcess, bundle: dict[str, Any]) -> None:
    """Wait (up to 5 s) until the running server takes the bundle's token: it notices a
    registry change from the CLI within about 0.5 s."""
    for _ in range(50):
        async with await RawClient.connect(server.msg_server) as raw:
            await raw.send("SEND_CLIENT_ID", bundle["id"], bundle["token"])
            if (await raw.recv()).cmd == "LOGIN_OK":
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server never accepted the new token of {bundle['id']}")


@pytest.fixture
def server(up_server_factory: Any) -> ServerProcess:
    return up_server_factory()  # type: ignore[no-any-return]


async def test_register_psk_bundles_the_key_and_stores_it_only_sealed(
    server: ServerProcess, uid: str
) -> None:
    b = register(server, f"{uid}-p", "--psk")
    psk = b64d(b["psk"])
    assert len(psk) == 32 and "private_key" not in b
    assert file_mode(b["bundle_path"]) == 0o600
    shown = json.loads(server.cli("device", "show", b["id"], "--json").stdout)
    assert shown["psk"] is True and shown["public_key"] == ""
    text = server.cli("device", "show", b["id"]).stdout
    assert "gateway-terminated" in text and b["psk"] not in text
    data = stored(server)
    assert psk not in data and b["psk"].encode() not in data
    # Its public key is empty: an end-to-end peer has nothing to seal to.
    e = register(server, f"{uid}-e")
    async with device(server, e) as dev:
        with pytest.raises(DeviceError) as err:
            await dev.send(b["id"], "hello")
        assert err.value.code == NO_KEY
    # rotate: a new token and a new PSK, still only sealed in the registry
    out = json.loads(server.cli("device", "rotate", b["id"], "--json").stdout)
    nb = read_json(out["bundle"])
    assert nb["token"] != b["token"] and nb["psk"] != b["psk"] and out["public_key"] == ""
    new = b64d(nb["psk"])
    data = stored(server)
    assert new not in data and nb["psk"].encode() not in data
    await accepts_token(server, nb)  # once the server has seen the change
    async with device(server, nb) as dev:
        assert dev.psk is not None and dev.psk.key == new


async def test_psk_to_psk_is_sealed_on_every_hop_and_at_rest(
    server: ServerProcess, uid: str
) -> None:
    ba, bb = register(server, f"{uid}-a", "--psk"), register(server, f"{uid}-b", "--psk")
    marker = f"PSK-MARKER-{os.urandom(6).hex()}"
    async with device(server, ba) as a:
        # b is offline: the opened body is queued, sealed at rest under the server key
        mid = await a.send(bb["id"], f"{marker} 1")
        assert scan(server, marker.encode()) == []
        # b's raw session: what the gateway writes to it is sealed under b's PSK
        async with await RawClient.connect(server.msg_server) as raw:
            await raw.login(bb["id"], bb["token"])
            args = await raw.expect("RESP_MESSAGE_P2P")
            body, sender, msg_id, _ts, enc = args
            assert (sender, msg_id, enc) == (ba["id"], mid, ENC_PSK)
            assert marker.encode() not in b64d(body)
            mine = PskCrypto(bb["id"], b64d(bb["psk"]))
            opened = mine.open(sender=sender, msg_id=msg_id, body=body)
            assert opened == f"{marker} 1"
            # under another device's PSK, or for another id, it does not open
            with pytest.raises(Exception, match="authentication failed"):
                PskCrypto(bb["id"], b64d(ba["psk"])).open(sender=sender, msg_id=mid, body=body)
            with pytest.raises(Exception, match="authentication failed"):
                mine.open(sender=sender, msg_id=mid + "x", body=body)
            await raw.ack(bb["id"], msg_id)
        async with device(server, bb) as b:
            await a.send(bb["id"], f"{marker} 2")  # live this time
            msg = await b.receive(timeout=10)
            assert (msg.sender, msg.text, msg.enc) == (ba["id"], f"{marker} 2", ENC_PSK)
            await b.send(ba["id"], f"{marker} back")
            msg = await a.receive(timeout=10)
            assert (msg.sender, msg.text, msg.enc) == (bb["id"], f"{marker} back", ENC_PSK)
            await nothing_more(b)
    server.stop()
    assert scan(server, marker.encode()) == []


async def test_psk_and_end_to_end_devices_talk_both_ways(server: ServerProcess, uid: str) -> None:
    bp, be = register(server, f"{uid}-p", "--psk"), register(server, f"{uid}-e")
    marker = f"MIX-MARKER-{os.urandom(6).hex()}"
    async with device(server, bp) as p:
        # PSK -> E2E, e offline: queued sealed at rest; delivered as plaintext, flagged
        await p.send(be["id"], f"{marker} to e")
        assert scan(server, marker.encode()) == []
        async with device(server, be) as e:
            msg = await e.receive(timeout=10)
            assert (msg.sender, msg.text, msg.enc) == (bp["id"], f"{marker} to e", "none")
            # E2E -> PSK: plaintext to the gateway on purpose, sealed under p's PSK after
            await e.send(bp["id"], f"{marker} to p", e2e=False)
            msg = await p.receive(timeout=10)
            assert (msg.sender, msg.text, msg.enc) == (be["id"], f"{marker} to p", ENC_PSK)
            # and E2E between end-to-end devices is untouched by all this
            assert e.crypto is not None and p.crypto is None
    server.stop()
    assert scan(server, marker.encode()) == []


async def test_psk_topic_members_get_it_sealed_under_their_own_keys(
    server: ServerProcess, uid: str
) -> None:
    ba, bb = register(server, f"{uid}-a", "--psk"), register(server, f"{uid}-b", "--psk")
    be = register(server, f"{uid}-e")
    topic = f"{uid}-t"
    marker = f"TOPIC-MARKER-{os.urandom(6).hex()}"
    async with device(server, ba) as a, device(server, bb) as b, device(server, be) as e:
        await a.create_topic(topic)
        await b.join_topic(topic)
        await e.join_topic(topic)
        await a.publish(topic, f"{marker} psk")
        m = await b.receive(timeout=10)
        assert (m.kind, m.topic, m.text, m.enc) == ("topic", topic, f"{marker} psk", ENC_PSK)
        m = await e.receive(timeout=10)
        assert (m.kind, m.topic, m.text, m.enc) == ("topic", topic, f"{marker} psk", "none")
        await e.publish(topic, f"{marker} plain", e2e=False)
        for dev in (a, b):
            m = await dev.receive(timeout=10)
            assert (m.sender, m.text, m.enc) == (be["id"], f"{marker} plain", ENC_PSK)
    assert scan(server, marker.encode()) == []


async def test_tampered_or_misaddressed_psk_bodies_are_refused_and_not_delivered(
    server: ServerProcess, uid: str
) -> None:
    ba, bb = register(server, f"{uid}-a", "--psk"), register(server, f"{uid}-b", "--psk")
    bc = register(server, f"{uid}-c", "--psk")
    be = register(server, f"{uid}-e")
    mine = PskCrypto(ba["id"], b64d(ba["psk"]))
    async with device(server, bb) as b, device(server, bc) as c:
        async with await RawClient.connect(server.msg_server) as raw:
            await raw.login(ba["id"], ba["token"])
            sealed, enc = mine.seal("p2p", bb["id"], "m-1", "tampered")
            flipped = bytearray(b64d(sealed))
            flipped[-20] ^= 0x01
            await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], b64e(bytes(flipped)), enc, "m-1")
            _code, text, ref = await raw.expect_error(errors.BAD_SEAL)
            assert ref == "m-1" and "pre-shared key" in text
            # sealed for c, sent to b: the header names c, so it does not open
            sealed, enc = mine.seal("p2p", bc["id"], "m-2", "moved")
            await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], sealed, enc, "m-2")
            await raw.expect_error(errors.BAD_SEAL)
            # sealed under another device's key
            other = PskCrypto(ba["id"], b64d(bb["psk"]))
            sealed, enc = other.seal("p2p", bb["id"], "m-3", "wrong key")
            await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], sealed, enc, "m-3")
            await raw.expect_error(errors.BAD_SEAL)
            # the session goes on: a good one is accepted and arrives
            sealed, enc = mine.seal("p2p", bb["id"], "m-4", "good")
            await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], sealed, enc, "m-4")
            assert await raw.expect("ACCEPTED") == ["m-4"]
        msg = await b.receive(timeout=10)
        assert (msg.id, msg.text) == ("m-4", "good")
        await nothing_more(b)
        await nothing_more(c)
    # a device without a PSK cannot send psk-sealed bodies
    async with await RawClient.connect(server.msg_server) as raw:
        await raw.login(be["id"], be["token"])
        sealed, enc = mine.seal("p2p", bb["id"], "m-5", "no psk")
        await raw.send("SEND_MESSAGE_P2P_E2E", bb["id"], sealed, enc, "m-5")
        _code, text, ref = await raw.expect_error(errors.E2E_UNSUPPORTED)
        assert ref == "m-5"


async def test_a_psk_delivery_that_does_not_open_is_dropped_by_the_sdk(
    server: ServerProcess, uid: str
) -> None:
    """The device side: a delivery sealed under another key is acked and dropped."""
    ba, bb = register(server, f"{uid}-a", "--psk"), register(server, f"{uid}-b", "--psk")
    async with device(server, ba) as a:
        await a.send(bb["id"], "for b")
        # b's SDK holds a's key instead of its own: nothing it receives opens
        async with device(server, bb, psk=ba["psk"]) as b:
            await eventually(lambda: b.open_failed == 1, "b dropped the delivery")
            await nothing_more(b)
    async with device(server, bb) as b:
        await nothing_more(b)  # it was acked: not delivered again


def test_cli_send_listen_and_sim_with_psk_bundles(server: ServerProcess, uid: str) -> None:
    ba, bb = register(server, f"{uid}-a", "--psk"), register(server, f"{uid}-b", "--psk")
    marker = f"CLI-MARKER-{os.urandom(6).hex()}"
    server.cli("send", "--as", ba["bundle_path"], "--to", bb["id"], f"{marker} cli")
    out = server.cli("listen", "--as", bb["bundle_path"], "--count", "1", "--timeout", "10")
    assert f"{bb['id']} <- {ba['id']}: {marker} cli" in out.stdout
    proc = server.cli(
        *("sim", "--bundle", ba["bundle_path"], "--bundle", bb["bundle_path"]),
        *("--count", "2", "--interval", "0", "--text", marker),
    )
    assert f"(opened: {ENC_PSK})" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("sent 4, accepted 4, delivered 4")
    assert scan(server, marker.encode()) == []
    assert base64.b64decode(ba["psk"]) not in stored(server)


async def test_psk_device_over_mqtt_talks_to_one_over_tcp(server: ServerProcess, uid: str) -> None:
    from firmware_sim.mqtt_device import MqttDevice

    bm, bt = register(server, f"{uid}-m", "--psk"), register(server, f"{uid}-t", "--psk")
    marker = f"MQTT-PSK-{os.urandom(6).hex()}"
    m = MqttDevice.from_bundle(bm, broker=server.ready["mqtt"], backoff_max=0.5)
    assert m.psk is not None
    async with m, device(server, bt) as t:
        await m.send(bt["id"], f"{marker} from mqtt")
        got = await t.receive(timeout=10)
        assert (got.sender, got.text, got.enc) == (bm["id"], f"{marker} from mqtt", ENC_PSK)
        await t.send(bm["id"], f"{marker} from tcp")
        got = await m.receive(timeout=10)
        assert (got.sender, got.text, got.enc) == (bt["id"], f"{marker} from tcp", ENC_PSK)
        assert m.open_failed == t.open_failed == 0
    assert scan(server, marker.encode()) == []
