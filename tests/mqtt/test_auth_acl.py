"""Authentication and ACL of the embedded broker against third-party clients: Debian's
``mosquitto_pub`` and ``mosquitto_sub``. Every refusal leaves the broker serving the
others; the last test is the paste-able example of docs/protocol.md."""

from __future__ import annotations

import asyncio
import json

from support.server import ServerProcess
from support.waiting import nothing_more

from fishchat_iot import errors

from .conftest import Fleet, mqtt_address, program


async def client(name: str, *args: str, timeout: float = 15) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        program(name),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def conn(server: ServerProcess, client_id: str, user: str, password: str) -> list[str]:
    host, _, port = mqtt_address(server).rpartition(":")
    return ["-h", host, "-p", port, "-i", client_id, "-u", user, "-P", password, "-V", "mqttv311"]


async def test_refused_connections(up_server: ServerProcess, fleet: Fleet, uid: str) -> None:
    a, b, gone = f"{uid}-a", f"{uid}-b", f"{uid}-gone"
    tok = up_server.register_many([a, b, gone])
    up_server.revoke(gone)
    msg = ["-t", f"fc/{a}/p2p/{b}", "-q", "1", "-m", '{"id": "x", "body": "x"}']
    refused = [
        ("wrong password", conn(up_server, a, a, "not-the-token")),
        ("another device's id", conn(up_server, b, b, tok[a])),
        ("client id is not the user name", conn(up_server, b, a, tok[a])),
        ("unknown device", conn(up_server, f"{uid}-ghost", f"{uid}-ghost", tok[a])),
        ("revoked device", conn(up_server, gone, gone, tok[gone])),
    ]
    mark = up_server.log_mark()
    for what, args in refused:
        code, _, err = await client("mosquitto_pub", *args, *msg)
        assert code != 0 and "not authori" in err, (what, code, err)
    assert len(up_server.log_lines_since(mark, "WARNING")) >= len(refused)
    # The broker keeps serving.
    dev_a = fleet.mqtt(a, tok[a], mqtt_address(up_server))
    dev_b = fleet.mqtt(b, tok[b], mqtt_address(up_server))
    await asyncio.gather(dev_a.connect(), dev_b.connect())
    await dev_a.send(b, "still served")
    assert (await dev_b.receive(10)).text == "still served"
    await nothing_more(dev_b, 0.2)  # none of the refused publishes got through


async def test_acl(up_server: ServerProcess, fleet: Fleet, uid: str) -> None:
    a, b, c = f"{uid}-a", f"{uid}-b", f"{uid}-c"
    tok = up_server.register_many([a, b, c])
    dev_b = fleet.mqtt(b, tok[b], mqtt_address(up_server))
    dev_c = fleet.mqtt(c, tok[c], mqtt_address(up_server))
    await asyncio.gather(dev_b.connect(), dev_c.connect())
    as_a = conn(up_server, a, a, tok[a])
    # Subscribing to anything but its own inbox is denied.
    for topic in ("#", f"fc/{b}/in", "fc/+/in", f"fc/{a}/#", f"fc/{a}/p2p/{b}"):
        code, out, err = await client("mosquitto_sub", *as_a, "-t", topic, "-W", "2")
        assert "denied" in (out + err), (topic, code, out, err)
    # Publishing under another device's prefix: nothing reaches anyone.
    mark = up_server.log_mark()
    for topic in (f"fc/{b}/p2p/{c}", f"fc/{c}/in", "other/topic"):
        code, _, err = await client(
            "mosquitto_pub", *as_a, "-t", topic, "-q", "1", "-m", '{"id": "f", "body": "x"}'
        )
        assert code == 0, err  # MQTT 3.1.1 cannot refuse a publish: it is dropped
    await asyncio.to_thread(up_server.wait_log, errors.FORBIDDEN, mark)
    await nothing_more(dev_b, 0.3)
    await nothing_more(dev_c, 0.1)
    # Still serving: b and c talk.
    await dev_b.send(c, "fine")
    assert (await dev_c.receive(10)).text == "fine"


async def test_mosquitto_clients_exchange(up_server: ServerProcess, uid: str) -> None:
    """docs/protocol.md's example: mosquitto_sub on the inbox, mosquitto_pub to send."""
    a, b = f"{uid}-a", f"{uid}-b"
    tok = up_server.register_many([a, b])
    sub = await asyncio.create_subprocess_exec(
        program("mosquitto_sub"),
        *conn(up_server, b, b, tok[b]),
        "-t",
        f"fc/{b}/in",
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "15",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)  # subscribed
    code, _, err = await client(
        "mosquitto_pub",
        *conn(up_server, a, a, tok[a]),
        "-t",
        f"fc/{a}/p2p/{b}",
        "-q",
        "1",
        "-m",
        '{"id": "m-1", "body": "hello from mosquitto_pub"}',
    )
    assert code == 0, err
    out, _ = await asyncio.wait_for(sub.communicate(), 20)
    doc = json.loads(out)
    assert doc["kind"] == "p2p" and doc["from"] == a and doc["to"] == b, doc
    assert (doc["id"], doc["body"], doc["enc"]) == ("m-1", "hello from mosquitto_pub", "none")
