"""``fishchat-iot run ROLE --config F``: one role on its own.

The distributed mode (docs/deploy-distributed.md): ``gateway``, ``msg-server``,
``router``, ``manager`` and ``monitor``, each a process with its own config, sharing
state through Redis (``[bus]``) and MongoDB (``[store]``). A role waits for Redis and
MongoDB (and its peers) when they are not up yet, so they start in any order.

``serial-adapter`` runs on the host the serial devices are wired to and bridges each
port of the config's ``[serial]`` section to a msg_server (``docs/serial.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fishchat_iot.cli.context import settings_from_args
from fishchat_iot.cli.output import CliError, format_table, print_json
from fishchat_iot.config import ConfigError, Settings

ROLES = ("gateway", "msg-server", "router", "manager", "monitor", "serial-adapter")
CLUSTER_ROLES = ROLES[:5]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run one role on its own (distributed mode, or the serial adapter)",
        description="Run one role on its own with the settings of --config. gateway, "
        "msg-server, router, manager and monitor make up the distributed mode: each needs "
        '[bus] backend = "redis" and [store] backend = "mongodb" '
        "(configs/*.toml, docs/deploy-distributed.md). serial-adapter bridges the serial "
        "ports listed in the config's [serial] section to a msg_server (docs/serial.md). "
        "A role serves until Ctrl-C or SIGTERM; with --json it prints one JSON line when "
        "ready.",
    )
    p.add_argument("role", metavar="ROLE", choices=ROLES, help=f"one of: {', '.join(ROLES)}")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_role)


def run_role(args: argparse.Namespace) -> int:
    if args.role in CLUSTER_ROLES:
        return _run_cluster_role(args)
    if not getattr(args, "config", None):
        raise CliError(
            "run serial-adapter needs --config FILE with a [serial] section listing its ports "
            "(see docs/serial.md and configs/serial-adapter.toml)"
        )
    settings = settings_from_args(args)
    if args.log_level is not None:
        settings.node.log_level = args.log_level
    if not settings.serial.ports:
        raise CliError(
            f"{args.config} lists no serial ports: add [[serial.ports]] tables with a url "
            "(see docs/serial.md and configs/serial-adapter.toml)"
        )
    from device_adapters.serial.adapter import SerialAdapter
    from fishchat_iot.cli.up import run_loop, setup_logging

    try:
        adapter = SerialAdapter(settings.serial)
    except ConfigError as exc:
        raise CliError(f"{args.config}: {exc}") from None
    setup_logging(settings.node.log_level)
    return run_loop(_serve(adapter, args.json))


async def _serve(adapter: Any, as_json: bool) -> int:
    from fishchat_iot.cli.up import stop_on_signals

    await adapter.start()
    with stop_on_signals() as stop:
        try:
            _print_ports(adapter, as_json)
            await stop.wait()
        finally:
            await adapter.stop()
    stats = adapter.stats()
    if as_json:
        print_json({"role": "serial-adapter", "stopped": True, "ports": stats})
    else:
        keys = ["frames_in", "frames_out", "corrupt", "oversize", "bad", "nacks", "reopens"]
        print(
            format_table(
                ["port", *keys],
                [[name, *(s[k] for k in keys)] for name, s in stats.items()],
                right=range(1, len(keys) + 1),
            )
        )
    return 0


def _print_ports(adapter: Any, as_json: bool) -> None:
    ports = [
        {"name": b.name, "url": b.cfg.url, "crc": b.crc.name, "upstream": b.cfg.upstream}
        for b in adapter.ports
    ]
    if as_json:
        print_json({"role": "serial-adapter", "pid": os.getpid(), "ports": ports})
    else:
        print(f"FishChat IoT serial adapter: {len(ports)} port(s)")
        print(
            format_table(
                ["port", "url", "crc", "upstream"],
                [[p["name"], p["url"], p["crc"], p["upstream"]] for p in ports],
            )
        )
        print("Stop: Ctrl-C")
    sys.stdout.flush()


def _cluster_settings(args: argparse.Namespace) -> Settings:
    if not getattr(args, "config", None):
        raise CliError(
            f"run {args.role} needs --config FILE: start from configs/{_example(args.role)} "
            "(docs/deploy-distributed.md)"
        )
    settings = settings_from_args(args)
    if args.log_level is not None:
        settings.node.log_level = args.log_level
    try:
        settings.check()
    except ConfigError as exc:
        raise CliError(f"{args.config}: {exc}") from None
    if settings.bus.backend != "redis" or settings.store.backend != "mongodb":
        raise CliError(
            f"{args.config}: the {args.role} role shares its state through Redis and "
            'MongoDB: set [bus] backend = "redis" and [store] backend = "mongodb" '
            "(or run every role in one process with 'fishchat-iot up')"
        )
    return settings


def _example(role: str) -> str:
    return "msg_server.19000.toml" if role == "msg-server" else f"{role}.toml"


def _run_cluster_role(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    from fishchat_iot.cli.up import run_loop, setup_logging

    setup_logging(settings.node.log_level)
    return run_loop(_serve_role(args.role, settings, args.json))


def _make_role(role: str, settings: Settings) -> Any:
    if role == "msg-server":
        from fishchat_iot.app import EmbeddedApp

        return EmbeddedApp(settings, gateway=False)
    if role == "gateway":
        from fishchat_iot.roles.gateway_node import GatewayNode

        return GatewayNode(settings)
    if role == "router":
        from fishchat_iot.roles.router_node import RouterNode

        return RouterNode(settings)
    if role == "manager":
        from fishchat_iot.roles.manager_node import ManagerNode

        return ManagerNode(settings)
    from fishchat_iot.roles.monitor_cluster import MonitorNode

    return MonitorNode(settings)


def _describe(role: str, node: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"role": role, "pid": os.getpid()}
    if role == "msg-server":
        assert node.msg_server is not None
        doc["node_id"] = node.msg_server.node_id
        doc.update(node.listeners())
    else:
        doc["node_id"] = node.node_id
        if node.address:
            doc["address"] = node.address
    return doc


async def _serve_role(role: str, settings: Settings, as_json: bool) -> int:
    from device_adapters.tcp.listener import ListenError
    from fishchat_iot.cli.up import stop_on_signals
    from fishchat_iot.tls import TlsError

    node = _make_role(role, settings)
    try:
        await node.start()
    except (ListenError, ConfigError, TlsError) as exc:
        raise CliError(str(exc)) from None
    with stop_on_signals() as stop:
        try:
            _print_role(role, node, as_json)
            await stop.wait()
        finally:
            await node.stop()
    return 0


def _print_role(role: str, node: Any, as_json: bool) -> None:
    doc = _describe(role, node)
    if as_json:
        print_json(doc)
    else:
        print(f"FishChat IoT {role} {doc['node_id']} is up")
        for key, value in doc.items():
            if key not in ("role", "node_id"):
                print(f"  {key:<14} {value}")
        print("Stop: Ctrl-C")
    sys.stdout.flush()
