"""Settings: defaults < file < environment < options, and errors that name the fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fishchat_iot.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_layers_in_rising_order(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text('[tcp]\nmsg_port = 1\ngateway_port = 2\nkeepalive = 3\n[node]\ndata_dir = "x"\n')
    env = {"FISHCHAT_TCP_GATEWAY_PORT": "20", "FISHCHAT_TCP_KEEPALIVE": "30"}
    s = load_settings(cfg, env=env, overrides={"tcp.keepalive": 300, "tcp.msg_port": None})
    assert (s.tcp.msg_port, s.tcp.gateway_port, s.tcp.keepalive) == (1, 20, 300.0)
    assert s.node.data_dir == "x"
    assert load_settings(cfg, env={"FISHCHAT_DATA_DIR": "y"}).node.data_dir == "y"


def test_json_file_and_booleans(tmp_path: Path) -> None:
    cfg = tmp_path / "f.json"
    cfg.write_text('{"tcp": {"allow_v1": false}}')
    assert load_settings(cfg, env={}).tcp.allow_v1 is False
    assert load_settings(None, env={"FISHCHAT_TCP_ALLOW_V1": "off"}).tcp.allow_v1 is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tcp]\nmsg_port = 'abc'\n", "tcp.msg_port: expected a whole number, got 'abc'"),
        ("[tcp]\nmsg_prot = 1\n", "unknown option tcp.msg_prot"),
        ("[nope]\nx = 1\n", "unknown section [nope]"),
        ("[tcp\n", "invalid TOML"),
        ("tcp = 1\n", "[tcp] must be a table"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "none.toml", env={})
    with pytest.raises(ConfigError, match="FISHCHAT_TCP_MSG_PORT"):
        load_settings(None, env={"FISHCHAT_TCP_MSG_PORT": "many"})


def _all_options() -> list[str]:
    s = Settings()
    return [
        f"{f.name}.{sf.name}"
        for f in dataclasses.fields(s)
        for sf in dataclasses.fields(getattr(s, f.name))
    ]


def test_example_config_is_the_defaults() -> None:
    assert load_settings(ROOT / "configs" / "fishchat.toml", env={}) == Settings()


def test_every_option_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"## `\[(\w+)\]`(.*?)(?=\n## |\Z)", doc, re.S))
    for dotted in _all_options():
        section, key = dotted.split(".")
        assert f"| `{key}` |" in sections.get(section, ""), f"{dotted} is not documented"


@pytest.mark.parametrize(
    "name",
    ["gateway", "msg_server.19000", "msg_server.19001", "router", "manager", "monitor"],
)
def test_the_distributed_configs_load_and_share_their_backends(name: str) -> None:
    s = load_settings(ROOT / "configs" / f"{name}.toml", env={})
    s.check()
    assert (s.bus.backend, s.store.backend) == ("redis", "mongodb")
    assert s.node.id == name  # stable: a msg_server's inbox is named after it
    assert s.bus.url == Settings().bus.url and s.store.mongo_url == Settings().store.mongo_url
    if name.startswith("msg_server"):
        assert s.tcp.msg_port == int(name.rpartition(".")[2])
        assert s.delivery.receipt == "acked"
        assert not s.monitor.enabled
    if name in ("msg_server.19000", "msg_server.19001", "router"):
        # One at-rest key for every process that queues bodies.
        assert s.server_key_path == Path("./data/cluster/server.key")


def test_check_names_the_bad_choice() -> None:
    s = Settings()
    s.store.backend = "postgres"
    with pytest.raises(
        ConfigError, match=re.escape("store.backend: 'postgres' is not one of 'sqlite', 'mongodb'")
    ):
        s.check()
