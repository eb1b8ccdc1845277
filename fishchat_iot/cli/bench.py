"""``fishchat-iot bench``: our gateway (p2p over TCP and over MQTT) against plain amqtt
and plain Mosquitto pub→sub, the same workload in one run on this machine; a table (or
``--json``) of msgs/s delivered, latency p50/p99, loss, server CPU per 1000 messages
and memory per idle connection. The logic is ``firmware_sim.bench``."""

from __future__ import annotations

import argparse
import sys
import time

from fishchat_iot.cli.output import EXIT_OK, CliError, print_json

SYSTEMS = ("gateway-tcp", "gateway-mqtt", "amqtt-qos0", "amqtt-qos1", "mosquitto-c")


def _idle(value: str) -> list[int]:
    if value.strip() in ("", "0", "none"):
        return []
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "a comma-separated list of counts, e.g. 1000,10000"
        ) from None
    if any(n < 1 or n > 15000 for n in counts):
        raise argparse.ArgumentTypeError("idle counts are 1 to 15000")
    return counts


def _rates(value: str) -> list[float]:
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "a comma-separated list of msgs/s, e.g. 20000,40000,60000"
        ) from None
    if any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates are msgs/s above 0")
    return rates


def cmd_bench(args: argparse.Namespace) -> int:
    from firmware_sim.bench import BenchConfig, run_bench, table

    if min(args.count, args.payload, args.pairs, args.batch, args.repeat) < 1:
        raise CliError("--count, --payload, --pairs, --batch and --repeat must be 1 or more")
    systems = tuple(args.only.split(",")) if args.only else SYSTEMS
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise CliError(f"unknown system {unknown[0]!r}: choose from {', '.join(SYSTEMS)}")
    cfg = BenchConfig(
        count=args.count,
        payload=args.payload,
        pairs=args.pairs,
        batch=args.batch,
        window=max(args.window, args.batch),
        idle=args.idle,
        systems=systems,
        timeout=args.timeout,
        profile=args.profile or "",
        latency_seconds=args.paced,
        rates=args.rates,
        repeat=args.repeat,
    )
    t0 = time.monotonic()

    def say(line: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"[{time.monotonic() - t0:6.1f}s] {line}\n")
            sys.stderr.flush()

    try:
        report = run_bench(cfg, say)
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise CliError(f"bench failed: {exc}") from None
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(table(report) + "\n")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="the gateway (TCP and MQTT p2p) against plain amqtt and Mosquitto pub->sub",
        description="Runs the same workload through our gateway (p2p over TCP with raw "
        "clients; over MQTT on the embedded broker), plain amqtt pub->sub (QoS 0 and 1) and "
        "plain Mosquitto pub->sub with its C clients (when installed), each server on a "
        "free loopback port, and prints msgs/s delivered, latency p50/p99, loss, server "
        "CPU seconds per 1000 messages and memory per idle connection (docs/benchmarks.md).",
    )
    p.add_argument("--count", type=int, default=20000, help="messages per system (default 20000)")
    p.add_argument("--payload", type=int, default=64, help="bytes of body (default 64)")
    p.add_argument("--pairs", type=int, default=20, help="TCP sender/receiver pairs (default 20)")
    p.add_argument("--batch", type=int, default=100, help="TCP frames per write (default 100)")
    p.add_argument(
        "--window",
        type=int,
        default=500,
        help="TCP messages per sender without a receipt (default 500; keep it well below "
        "the server's inflight_window, 1000, or recipients fall back to the store)",
    )
    p.add_argument(
        "--idle",
        type=_idle,
        default=[1000, 10000],
        metavar="N[,N]",
        help="idle connections for memory per connection (default 1000,10000; 0 = skip)",
    )
    p.add_argument(
        "--only", metavar="SYSTEMS", help=f"comma-separated subset of: {', '.join(SYSTEMS)}"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per throughput run (default 120)"
    )
    p.add_argument(
        "--paced",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds of each paced TCP latency run, at 1000 msgs/s and at 80%% of the "
        "measured peak (default 3; 0 = skip)",
    )
    p.add_argument(
        "--rates",
        type=_rates,
        default=[],
        metavar="R[,R]",
        help="more paced TCP runs at these msgs/s (a latency sweep: where it turns)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="runs of the gateway's TCP and of Mosquitto, which last under a second: the "
        "median is reported, every run listed (default 3)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="record the gateway with py-spy (raw, collapsed stacks) during the TCP run",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)
