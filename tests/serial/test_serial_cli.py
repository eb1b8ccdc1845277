"""``fishchat-iot run serial-adapter --config F`` as an operator runs it (a subprocess),
and the ``[serial]`` settings: ports as TOML tables, JSON or an environment variable,
and one-line errors for what cannot work."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from serial_helpers import *  # noqa: F403  (the fixtures)
from serial_helpers import UP_ARGS, Cable, serial_device, until
from support.server import CLI, ServerProcess, cli_env

from device_adapters.serial.adapter import SerialAdapter, resolve_ports
from device_adapters.serial.framing import encode_frame
from firmware_sim.tcp_device import TcpDevice
from fishchat_iot.config import ConfigError, SerialSettings, load_settings


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env()
    )


def _one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- settings -------------------------------------------------------------------------
def test_ports_from_toml_json_and_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text(
        '[serial]\nmsg_server = "127.0.0.1:19000"\ncrc = "crc32"\n'
        '[[serial.ports]]\nurl = "/dev/ttyUSB0"\nname = "lamp"\n'
        '[[serial.ports]]\nurl = "rfc2217://10.0.0.2:4001"\nbaudrate = 9600\ncrc = "crc16"\n'
    )
    ports = resolve_ports(load_settings(toml, env={}).serial)
    assert [(p.name, p.url, p.baudrate, p.crc.name, p.msg_server) for p in ports] == [
        ("lamp", "/dev/ttyUSB0", 115200, "crc32", "127.0.0.1:19000"),
        ("rfc2217://10.0.0.2:4001", "rfc2217://10.0.0.2:4001", 9600, "crc16", "127.0.0.1:19000"),
    ]
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"serial": {"gateway": "gw:17000", "ports": [{"url": "loop://"}]}}))
    (port,) = resolve_ports(load_settings(js, env={}).serial)
    assert (port.url, port.gateway, port.msg_server) == ("loop://", "gw:17000", "")
    env = {"FISHCHAT_SERIAL_PORTS": '[{"url": "socket://h:1", "msg_server": "m:2"}]'}
    (port,) = resolve_ports(load_settings(None, env=env).serial)
    assert (port.url, port.msg_server) == ("socket://h:1", "m:2")
    # In `up`, a port with no upstream uses the local msg_server.
    s = SerialSettings(
        ports=load_settings(None, env={"FISHCHAT_SERIAL_PORTS": '[{"url":"x"}]'}).serial.ports
    )
    assert resolve_ports(s, default_msg_server="127.0.0.1:5")[0].msg_server == "127.0.0.1:5"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[serial.ports]]\nurl = 1\n", "serial.ports[0].url: expected a string"),
        ("[[serial.ports]]\nurl = 'x'\nspeed = 9600\n", "serial.ports[0]: unknown option speed"),
        ("[[serial.ports]]\nname = 'x'\n", "serial.ports[0]: no url"),
        ("[serial]\nports = 'x'\n", "expected a list of port tables"),
        ("[[serial.ports]]\nurl = 'x'\nbaudrate = 'fast'\n", "expected a whole number"),
    ],
)
def test_bad_port_tables(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("serial", "message"),
    [
        ({"ports": [{"url": "/dev/x"}]}, "no upstream: set msg_server or gateway"),
        ({"msg_server": "m:1", "crc": "crc8", "ports": [{"url": "/dev/x"}]}, "unknown CRC 'crc8'"),
        (
            {"msg_server": "nope", "ports": [{"url": "/dev/x"}]},
            "msg_server: 'nope' is not host:port",
        ),
        (
            {"msg_server": "m:1", "ports": [{"url": "serial9://x"}]},
            "pyserial has no 'serial9' URLs",
        ),
        ({"msg_server": "m:1", "ports": [{"url": "/dev/x"}, {"url": "/dev/x"}]}, "a second port"),
        ({"msg_server": "m:1", "max_frame": 10, "ports": [{"url": "/dev/x"}]}, "max_frame 10"),
    ],
)
def test_resolve_errors_name_the_port_and_option(serial: dict[str, Any], message: str) -> None:
    raw = dict(serial)
    ports = raw.pop("ports")
    settings = load_settings(None, env={"FISHCHAT_SERIAL_PORTS": json.dumps(ports)})
    for key, value in raw.items():
        setattr(settings.serial, key, value)
    with pytest.raises(ConfigError) as info:
        SerialAdapter(settings.serial)
    assert message in str(info.value)


# -- the command ---------------------------------------------------------------------
def test_run_other_roles_and_missing_config_are_one_line_errors(tmp_path: Path) -> None:
    _one_error_line(_run("run", "gateway"), "needs --config FILE", "configs/gateway.toml")
    _one_error_line(_run("run", "gateway", "--config", "x.toml"), "x.toml does not exist")
    local = tmp_path / "local.toml"
    local.write_text("[tcp]\ngateway_port = 0\n")
    _one_error_line(
        _run("run", "router", "--config", str(local)), 'backend = "redis"', "fishchat-iot up"
    )
    _one_error_line(_run("run", "serial-adapter"), "needs --config FILE")
    empty = tmp_path / "empty.toml"
    empty.write_text("[serial]\nmsg_server = '127.0.0.1:1'\n")
    _one_error_line(_run("run", "serial-adapter", "--config", str(empty)), "lists no serial ports")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[serial.ports]]\nurl = '/dev/ttyUSB0'\n")
    _one_error_line(_run("run", "serial-adapter", "--config", str(bad)), "no upstream")


def _read_json_line(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> dict[str, Any]:
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no JSON line from the adapter; got {line!r}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the adapter exited {proc.wait()}; got {line!r}")
            line += chunk
    doc: dict[str, Any] = json.loads(line)
    return doc


def _start_adapter(cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [*CLI, "run", "serial-adapter", "--config", str(cfg), "--json"],
            stdout=subprocess.PIPE,
            stderr=log,
            env=cli_env(),
        )


async def test_run_serial_adapter_bridges_a_device_and_reports_its_counters(
    serial_server: ServerProcess, cable: Cable, tmp_path: Path, uid: str
) -> None:
    s_id, t_id = f"{uid}-s", f"{uid}-t"
    tokens = serial_server.register_many([s_id, t_id])
    cfg = tmp_path / "adapter.toml"
    cfg.write_text(
        f'[serial]\nmsg_server = "{serial_server.msg_server}"\nreopen_min = 0.1\n'
        f'[[serial.ports]]\nurl = "{cable.adapter_url}"\nname = "lamp"\n'
    )
    log_path = tmp_path / "adapter.log"
    proc = _start_adapter(cfg, log_path)
    try:
        ready = await asyncio.to_thread(_read_json_line, proc)
        assert ready["role"] == "serial-adapter" and ready["pid"] == proc.pid
        assert ready["ports"] == [
            {
                "name": "lamp",
                "url": cable.adapter_url,
                "crc": "crc16",
                "upstream": f"msg_server {serial_server.msg_server}",
            }
        ]
        tdev = TcpDevice(t_id, tokens[t_id], msg_server=serial_server.msg_server)
        async with serial_device(cable, s_id, tokens[s_id], connect_timeout=10) as sdev, tdev:
            await sdev.send(t_id, "via the adapter process")
            assert (await tdev.receive(5)).text == "via the adapter process"
            bad = bytearray(encode_frame("SEND_PING", ["PING"]))
            bad[3] ^= 0x80
            cable.inject_to_adapter(b"\x00" + bytes(bad))
            await until(lambda: sdev.nacks_received == 1, what="the NACK")
            await tdev.send(s_id, "and back")
            assert (await sdev.receive(5)).text == "and back"
        proc.send_signal(signal.SIGTERM)
        final = await asyncio.to_thread(_read_json_line, proc)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert final["stopped"] is True
    stats = final["ports"]["lamp"]
    assert stats["corrupt"] == 1 and stats["nacks"] == 1 and stats["oversize"] == 0
    assert stats["frames_in"] >= 3 and stats["logins"] >= 1 and stats["reopens"] == 0
    log_text = log_path.read_text()
    assert "Traceback" not in log_text and " ERROR " not in log_text, log_text
    assert "port lamp: open" in log_text


async def test_up_serves_the_serial_ports_of_its_config(
    cable: Cable, tmp_path: Path, uid: str
) -> None:
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        f'[serial]\nreopen_min = 0.1\n[[serial.ports]]\nurl = "{cable.adapter_url}"\nname = "p1"\n'
    )
    server = ServerProcess(tmp_path / "srv", *UP_ARGS, "--config", str(cfg))
    await asyncio.to_thread(server.start)
    try:
        s_id, t_id = f"{uid}-s", f"{uid}-t"
        tokens = await asyncio.to_thread(server.register_many, [s_id, t_id])
        tdev = TcpDevice(t_id, tokens[t_id], msg_server=server.msg_server)
        async with serial_device(cable, s_id, tokens[s_id], connect_timeout=10) as sdev, tdev:
            await sdev.send(t_id, "from a port of up")
            assert (await tdev.receive(5)).text == "from a port of up"
            await tdev.send(s_id, "to a port of up")
            assert (await sdev.receive(5)).text == "to a port of up"
        assert "port p1: open" in server.log_text()
        server.assert_healthy()
    finally:
        code = await asyncio.to_thread(server.stop)
    assert code == 0


def test_up_with_a_bad_serial_port_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "up.toml"
    cfg.write_text('[[serial.ports]]\nurl = "/dev/ttyUSB0"\ncrc = "crc8"\n')
    proc = _run(
        "--data-dir",
        str(tmp_path / "d"),
        "up",
        "--gateway-port",
        "0",
        "--msg-port",
        "0",
        *UP_ARGS,
        "--config",
        str(cfg),
    )
    _one_error_line(proc, "serial.ports[0]", "unknown CRC 'crc8'")
