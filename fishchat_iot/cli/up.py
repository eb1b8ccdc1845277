"""``fishchat-iot up``: every role in one process on the embedded default (SQLite, the
in-process bus); prints where devices connect and runs until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from fishchat_iot.cli.context import settings_from_args
from fishchat_iot.cli.output import CliError
from fishchat_iot.config import ConfigError, Settings

MQTT_MODES = ("embedded", "external", "off")

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run every role in one process (embedded store; no server to install)",
        description="Run gateway, msg_server, router and manager in one process on the "
        "embedded SQLite store, print where devices connect, and serve until Ctrl-C.",
    )
    p.add_argument(
        "--host", help="bind address of the listeners (tcp.host, mqtt.host; default 127.0.0.1)"
    )
    p.add_argument("--gateway-port", type=int, help="gateway port (default 17000; 0 = any free)")
    p.add_argument("--msg-port", type=int, help="msg_server port (default 19000; 0 = any free)")
    p.add_argument(
        "--mqtt-port", type=int, help="embedded MQTT broker port (default 1883; 0 = any free)"
    )
    p.add_argument(
        "--mqtt-mode",
        choices=MQTT_MODES,
        help="embedded amqtt broker (default), attach to an external broker, or no MQTT",
    )
    p.add_argument(
        "--monitor-port",
        type=int,
        help="monitor (dashboard, API, /metrics) port (default 30000; 0 = any free)",
    )
    p.add_argument("--no-v1", action="store_true", help="refuse token-less v1 logins")
    p.add_argument("--keepalive", type=float, help="seconds of silence before a session closes")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_up)


def settings_for_up(args: argparse.Namespace) -> Settings:
    settings = settings_from_args(args)
    tcp = settings.tcp
    if args.host is not None:
        tcp.host = args.host
        settings.mqtt.host = args.host
    if args.gateway_port is not None:
        tcp.gateway_port = args.gateway_port
    if args.msg_port is not None:
        tcp.msg_port = args.msg_port
    if args.no_v1:
        tcp.allow_v1 = False
    if args.keepalive is not None:
        tcp.keepalive = args.keepalive
    if args.log_level is not None:
        settings.node.log_level = args.log_level
    mqtt = settings.mqtt
    if args.mqtt_port is not None:
        mqtt.port = args.mqtt_port
    if args.mqtt_mode is not None:
        mqtt.mode = args.mqtt_mode
    if args.monitor_port is not None:
        settings.monitor.port = args.monitor_port
    if mqtt.mode not in MQTT_MODES:
        raise CliError(
            f"mqtt.mode {mqtt.mode!r} is not one of {', '.join(MQTT_MODES)}: fix the config "
            "or pass --mqtt-mode"
        )
    ports = (
        ("--gateway-port", tcp.gateway_port),
        ("--msg-port", tcp.msg_port),
        ("--mqtt-port", mqtt.port),
        ("--monitor-port", settings.monitor.port),
    )
    for name, port in ports:
        if not 0 <= port <= 65535:
            raise CliError(f"{name} {port} is not a port number: use 0 to 65535 (0 = any free)")
    return settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_up(args: argparse.Namespace) -> int:
    settings = settings_for_up(args)
    setup_logging(settings.node.log_level)
    return run_loop(_serve(settings, args.json))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event SIGINT or SIGTERM sets while the block runs (install before printing the
    ready line, so a signal right after it is a graceful stop, not a kill)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


# The message path allocates a few container objects per message (the decoded frame,
# the envelope, the in-flight entry) and frees nearly all of them by reference counting
# at once; the cyclic collector's default (a young-generation pass every 700 such
# allocations) then only walks what is still in flight, over and over. Every 50,000
# instead (docs/benchmarks.md, third round).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect young objects less often, and leave what exists before serving (modules,
    settings, the parsed configuration) out of every later collection."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (the loop the hot path was measured on; the
    bench's clients run on it too), with the collector tuned for it (``tune_gc``)."""
    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(settings: Settings, as_json: bool) -> int:
    from device_adapters.tcp.listener import ListenError
    from fishchat_iot.app import EmbeddedApp
    from fishchat_iot.tls import TlsError

    app = EmbeddedApp(settings)
    try:
        await app.start()
    except (ListenError, ConfigError, TlsError) as exc:  # ConfigError: a [serial] port
        raise CliError(str(exc)) from None
    with stop_on_signals() as stop:
        try:
            _print_ready(settings, app, as_json)
            await stop.wait()
        finally:
            await app.stop()
    return 0


def _print_ready(settings: Settings, app: Any, as_json: bool) -> None:
    addrs = app.listeners()
    if as_json:
        monitor = {"monitor": addrs.get("monitor")}  # null when it is off or could not bind
        print(
            json.dumps(
                {**addrs, **monitor, "data_dir": str(settings.data_dir), "pid": app.status()["pid"]}
            )
        )
    else:
        print("FishChat IoT is up (embedded: every role in this process)")
        print(f"  gateway     {addrs['gateway']}   devices ask here for their msg_server")
        print(f"  msg_server  {addrs['msg_server']}   FishChat v1 TCP protocol (docs/protocol.md)")
        if "msg_server_tls" in addrs:
            print(f"  msg_server  {addrs['msg_server_tls']}   the same over TLS (docs/security.md)")
        if "mqtt" in addrs:
            how = "embedded broker" if settings.mqtt.mode == "embedded" else "external broker"
            print(f"  mqtt        {addrs['mqtt']}   MQTT, {how} (docs/protocol.md)")
        if "mqtt_tls" in addrs:
            print(f"  mqtt        {addrs['mqtt_tls']}   MQTT over TLS (docs/security.md)")
        if "monitor" in addrs:
            print(f"  monitor     http://{addrs['monitor']}/   dashboard, API, /metrics")
        print(f"  data        {settings.sqlite_path}")
        print("Register a device: fishchat-iot device register NAME   Stop: Ctrl-C")
    sys.stdout.flush()
