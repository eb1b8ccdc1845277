"""``fishchat-iot run ROLE --config F``: one role on its own.

Only ``serial-adapter`` exists so far: it runs on the host the serial devices are wired
to and bridges each port of the config's ``[serial]`` section to a msg_server
(``docs/serial.md``). The other roles run on their own in the distributed mode, which is
not built yet; ``up`` runs them all in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from fishchat_iot.cli.context import settings_from_args
from fishchat_iot.cli.output import CliError, format_table, print_json
from fishchat_iot.config import ConfigError

ROLES = ("gateway", "msg-server", "router", "manager", "monitor", "serial-adapter")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run one role on its own (for now: serial-adapter)",
        description="Run one role on its own with the settings of --config. For now the "
        "only one is serial-adapter: it bridges the serial ports listed in the config's "
        "[serial] section to a msg_server (docs/serial.md). It serves until Ctrl-C; with "
        "--json it prints one JSON line when ready and one with the port counters when "
        "it stops.",
    )
    p.add_argument("role", metavar="ROLE", choices=ROLES, help=f"one of: {', '.join(ROLES)}")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_role)


def run_role(args: argparse.Namespace) -> int:
    if args.role != "serial-adapter":
        raise CliError(
            f"the {args.role} role runs on its own only in the distributed mode, which "
            "arrives in a later release: run every role in one process with 'fishchat-iot up'"
        )
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
    await adapter.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
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
