"""The CLI's building blocks in process (fast): bundle files, table output, the global
options after a command, and how ``main`` reports unexpected failures."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import types
from pathlib import Path

import pytest

from fishchat_iot.bundle import (
    BundleError,
    BundleExists,
    host_port,
    new_bundle,
    read_bundle,
    write_bundle,
)
from fishchat_iot.cli import device, main, output
from fishchat_iot.cli.status import (
    NOT_RESPONDING,
    RUNNING,
    STOPPED,
    UNKNOWN,
    pid_alive,
    server_state,
)
from fishchat_iot.config import Settings

# -- bundle ---------------------------------------------------------------------------


def test_bundle_round_trip_is_private_whatever_the_umask(tmp_path: Path) -> None:
    settings = Settings()
    bundle = new_bundle("dev-1", "tok", settings, v1=True, created_ms=5, extra={"private_key": "k"})
    old = os.umask(0)
    try:
        written = write_bundle(tmp_path / "a" / "b.json", bundle)
    finally:
        os.umask(old)
    assert written == tmp_path / "a" / "b.json"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    assert read_bundle(written) == {
        "id": "dev-1",
        "token": "tok",
        "gateway": ["127.0.0.1:17000"],
        "msg_server": ["127.0.0.1:19000"],
        "mqtt": ["127.0.0.1:1883"],
        "v1": True,
        "created_ms": 5,
        "private_key": "k",
    }


def test_bundle_never_replaces_or_follows_a_link(tmp_path: Path) -> None:
    existing = tmp_path / "x.json"
    existing.write_text("old")
    with pytest.raises(BundleExists):
        write_bundle(existing, {"id": "x"})
    assert existing.read_text() == "old"
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleExists):
        write_bundle(link, {"id": "x"})
    assert not (tmp_path / "elsewhere.json").exists()


def test_read_bundle_errors(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(path)
    path.write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(path)
    path.write_text(json.dumps({"id": "x"}))
    with pytest.raises(BundleError, match="has no 'token'"):
        read_bundle(path)
    good = {"id": "x", "token": "t", "gateway": [], "msg_server": [], "v1": 1, "created_ms": 1}
    path.write_text(json.dumps(good))
    with pytest.raises(BundleError, match="'v1' has the wrong type"):
        read_bundle(path)


def test_host_port() -> None:
    assert host_port("10.0.0.1", 17000) == "10.0.0.1:17000"
    assert host_port("::1", 17000) == "[::1]:17000"
    assert host_port("[::1]", 1) == "[::1]:1"


# -- output ---------------------------------------------------------------------------


def test_table_alignment_escapes_and_wide_characters() -> None:
    text = output.format_table(
        ("NAME", "N"), [("厨房", 5), ("a\x1b[31m", 12), ("plain", True)], right={1}
    )
    assert text.splitlines() == [
        "NAME         N",
        "厨房         5",
        "a\\x1b[31m   12",
        "plain      yes",
    ]


def test_one_line_and_error(capsys: pytest.CaptureFixture[str]) -> None:
    output.print_error("bad\nthing\n  happened")
    assert capsys.readouterr().err == "error: bad thing happened\n"


def test_format_helpers() -> None:
    assert output.format_ms(0) == "-"
    assert output.format_ms(86_400_000) == "1970-01-02 00:00:00"
    assert [output.format_age(ms) for ms in (999, 61_000, 7_500_000, 90_000_000)] == [
        "0s",
        "1m01s",
        "2h05m",
        "1d01h",
    ]


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-1)


# -- parser and main ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "json_flag", "data_dir"),
    [
        (["device", "list"], False, None),
        (["--json", "device", "list"], True, None),
        (["device", "list", "--json"], True, None),
        (["--data-dir", "a", "device", "list"], False, "a"),
        (["device", "list", "--data-dir", "b"], False, "b"),
        (["--data-dir", "a", "--json", "device", "list", "--data-dir", "b"], True, "b"),
    ],
)
def test_global_options_before_and_after(
    argv: list[str], json_flag: bool, data_dir: str | None
) -> None:
    args = main.build_parser().parse_args(argv)
    assert args.json is json_flag
    assert args.data_dir == data_dir
    assert args.config is None
    assert args.func is device.cmd_list


def test_unexpected_error_is_one_line_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(device, "cmd_list", boom)
    monkeypatch.delenv("FISHCHAT_DEBUG", raising=False)
    assert main.main(["device", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected RuntimeError: kaput second line")
    assert "FISHCHAT_DEBUG=1" in err

    monkeypatch.setenv("FISHCHAT_DEBUG", "1")
    assert main.main(["device", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: unexpected")


def test_command_modules_missing_or_broken(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = types.ModuleType("fishchat_iot.cli.broken_cmd")

    def register(sub: argparse._SubParsersAction) -> None:
        raise ImportError("no module named 'somedriver'")

    broken.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fishchat_iot.cli.broken_cmd", broken)
    monkeypatch.setattr(main, "COMMAND_MODULES", ("device", "no_such_cmd", "broken_cmd"))
    monkeypatch.delenv("FISHCHAT_DEBUG", raising=False)
    parser = main.build_parser()
    assert "no_such_cmd" not in parser.format_help()  # absent: simply not offered
    assert main.main(["broken_cmd", "anything"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: the 'broken_cmd' command is unavailable")
    assert "somedriver" in err


def test_a_command_defining_a_global_option_does_not_reset_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = types.ModuleType("fishchat_iot.cli.own_json")

    def register(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("own_json")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=lambda args: 0)

    mod.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fishchat_iot.cli.own_json", mod)
    monkeypatch.setattr(main, "COMMAND_MODULES", ("own_json",))
    parser = main.build_parser()
    assert parser.parse_args(["--json", "own_json"]).json is True
    assert parser.parse_args(["own_json", "--json"]).json is True
    assert parser.parse_args(["own_json"]).json is False


@pytest.mark.parametrize(
    ("content", "state"),
    [
        ("garbage", UNKNOWN),
        ("[1]", UNKNOWN),
        ('{"pid": "x", "nodes": 5, "listeners": 3}', STOPPED),
        ('{"pid": %d, "updated_ms": 1, "nodes": [1, {"sessions": "many"}]}', NOT_RESPONDING),
        ('{"pid": %d, "updated_ms": %d, "nodes": [1, {"sessions": 4}]}', RUNNING),
    ],
)
def test_server_state_survives_malformed_status_files(
    tmp_path: Path, content: str, state: str
) -> None:
    now = output.now_ms()
    path = tmp_path / "status.json"
    values = (os.getpid(), now)[: content.count("%d")]
    path.write_text(content % values if values else content)
    server = server_state(path, now)
    assert server.state == state
    if state == RUNNING:
        assert server.nodes[0]["sessions"] == 4 and len(server.nodes) == 1
