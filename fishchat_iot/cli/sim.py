"""``fishchat-iot sim``: simulated devices (the TCP device SDK in ``firmware_sim``) log
in, each sends ``--count`` messages to every other one, and every exchange is printed as
it happens::

    alice -> bob: hello 1 (accepted)
    bob <- alice: hello 1
    ...
    sent 6, accepted 6, delivered 6, duplicates absorbed 0, lost 0

``lost`` counts messages the server accepted that never arrived (by id) within
``--timeout`` seconds after the last send; ``refused`` the ones it did not accept
(``ERROR``). Exit status 0 when every message was accepted and delivered.

The devices come from ``--bundle`` files; without them ``--devices N`` registers
``sim-1`` .. ``sim-N`` in the local registry (bundles written to
``DATA_DIR/bundles/sim-K.json``, pass them with ``--bundle`` on later runs: their
tokens are not stored, so an existing device cannot be registered again).

Fleet mode (``--scenario``, ``--rate``, ``--duration``, or ``--transport serial|mixed``):
``firmware_sim.fleet`` runs N devices (registered for the run as ``fleet-XXXXXX-K``, no
bundles) at ``--rate`` messages per second for ``--duration`` seconds, with a progress
line on stderr and a summary with latency percentiles (docs/cli.md, sim).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

from fishchat_iot.auth import hash_token, new_token
from fishchat_iot.bundle import (
    BundleError,
    BundleExists,
    default_bundle_path,
    new_bundle,
    remove_bundle,
    write_bundle,
)
from fishchat_iot.cli.context import run_with_store, settings_from_args
from fishchat_iot.cli.output import EXIT_OK, CliError, cell, now_ms, print_json
from fishchat_iot.cli.send import bundle_path, connect_devices, device_error, device_for, run_async
from fishchat_iot.config import Settings
from fishchat_iot.crypto import generate_keypair
from fishchat_iot.stores.base import AlreadyExists, DeviceRecord, Store

SIM_PREFIX = "sim-"


@dataclass
class SimReport:
    devices: list[str]
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    delivered: int = 0
    duplicates: int = 0  # redeliveries absorbed by the SDK's dedupe (and any seen here)
    earlier: int = 0  # delivered messages not sent by this run (left from an earlier one)
    lost_ids: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # error code -> count

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    def summary(self) -> str:
        parts = [
            f"sent {self.sent}",
            f"accepted {self.accepted}",
            f"delivered {self.delivered}",
            f"duplicates absorbed {self.duplicates}",
            f"lost {self.lost}",
        ]
        if self.refused:
            codes = ", ".join(f"{c} {n}" for c, n in sorted(self.refusals.items()))
            parts.insert(2, f"refused {self.refused} ({codes})")
        if self.earlier:
            parts.append(f"from earlier runs {self.earlier}")
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "sent": self.sent,
            "accepted": self.accepted,
            "refused": self.refused,
            "refusals": self.refusals,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "lost_ids": self.lost_ids,
            "earlier": self.earlier,
        }


# -- devices ----------------------------------------------------------------------------


def register_sim_devices(settings: Settings, count: int) -> list[str]:
    """Register ``sim-1`` .. ``sim-N`` and write their bundles; returns the bundle paths.
    Fails (one line, nothing registered) if any of them exists already."""
    ids = [f"{SIM_PREFIX}{i}" for i in range(1, count + 1)]
    paths = [default_bundle_path(settings, i) for i in ids]

    async def work(store: Store) -> list[str]:
        existing = [i for i in ids if await store.get_device(i) is not None]
        if existing:
            have = [str(p) for i, p in zip(ids, paths, strict=True) if p.is_file()]
            if len(have) == len(ids):
                hint = "pass their bundles: " + " ".join(f"--bundle {p}" for p in have)
            else:
                hint = (
                    "pass the bundles written when they were registered with --bundle FILE "
                    "(one per device), or use another --data-dir"
                )
            raise CliError(
                f"device(s) {', '.join(existing)} already exist in {settings.sqlite_path} and "
                f"their tokens are not stored, so sim cannot log them in: {hint}"
            )
        stale = [str(p) for p in paths if p.exists()]
        if stale:
            raise CliError(
                f"bundle file(s) {', '.join(stale)} exist but their devices are not registered: "
                "remove them, or use another --data-dir"
            )
        written: list[str] = []
        try:
            for dev_id, path in zip(ids, paths, strict=True):
                token = new_token()
                keys = generate_keypair()  # E2E: the bundle gets the private half
                created = now_ms()
                bundle = new_bundle(
                    dev_id,
                    token,
                    settings,
                    v1=False,
                    created_ms=created,
                    extra={"private_key": keys.private_b64, "public_key": keys.public_b64},
                )
                written.append(str(write_bundle(path, bundle)))
                await store.add_device(
                    DeviceRecord(
                        id=dev_id,
                        token_hash=hash_token(token),
                        created_ms=created,
                        public_key=keys.public_b64,
                    )
                )
        except (BundleError, AlreadyExists) as exc:
            for p in written:
                remove_bundle(p)
            if isinstance(exc, BundleExists | AlreadyExists):
                raise CliError(f"{exc}: another command registered sim devices meanwhile") from None
            raise CliError(f"{exc}: use another --data-dir") from None
        return written

    return run_with_store(settings, work, create=True)


# -- the exchange ---------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def exchange(
    devices: list[Any],
    count: int,
    interval: float,
    wait: float,
    text: str,
    quiet: bool = False,
) -> SimReport:
    """Every device sends ``count`` messages to every other one (concurrently, one
    sender per device, ``interval`` seconds apart); waits up to ``wait`` seconds
    after the last send for the accepted ones to arrive."""
    from firmware_sim.tcp_device import DeviceError

    report = SimReport(devices=[d.device_id for d in devices])
    expected: dict[tuple[str, str], str] = {}  # (sender, id) -> recipient
    accepted: set[tuple[str, str]] = set()
    delivered: set[tuple[str, str]] = set()
    progress = asyncio.Event()
    stopped: list[BaseException] = []

    def say(line: str) -> None:
        if not quiet:
            _say(line)

    async def sender(dev: Any) -> None:
        others = [d.device_id for d in devices if d is not dev]
        for i in range(1, count + 1):
            for to in others:
                body = f"{text} {i}"
                msg_id = dev.next_id()
                expected[(dev.device_id, msg_id)] = to  # before sending: it may arrive first
                report.sent += 1
                line = f"{cell(dev.device_id)} -> {cell(to)}: {cell(body)}"
                try:
                    await dev.send(to, body, id=msg_id)
                except DeviceError as exc:
                    del expected[(dev.device_id, msg_id)]
                    if dev.final_error is not None:
                        raise
                    report.refused += 1
                    report.refusals[exc.code] = report.refusals.get(exc.code, 0) + 1
                    say(f"{line} (refused: {exc.code}: {cell(exc.text)})")
                    continue
                report.accepted += 1
                accepted.add((dev.device_id, msg_id))
                progress.set()
                say(f"{line} (accepted)")
            if interval > 0 and i < count:
                await asyncio.sleep(interval)

    async def receiver(dev: Any) -> None:
        try:
            async for msg in dev.messages():
                key = (msg.sender, msg.id)
                me = dev.device_id
                if expected.get(key) != me:
                    report.earlier += 1
                    where = f" [{cell(msg.topic)}]" if msg.kind == "topic" else ""
                    say(f"{cell(me)} <- {cell(msg.sender)}{where}: {cell(msg.text)} (earlier run)")
                elif key in delivered:
                    report.duplicates += 1
                else:
                    delivered.add(key)
                    report.delivered += 1
                    sealed = f" (opened: {msg.enc})" if msg.enc != "none" else ""
                    say(f"{cell(me)} <- {cell(msg.sender)}: {cell(msg.text)}{sealed}")
                dev.ack(msg)
                progress.set()
        except DeviceError as exc:
            stopped.append(exc)
            progress.set()

    receivers = [asyncio.create_task(receiver(d), name=f"sim-recv-{d.device_id}") for d in devices]
    try:
        await asyncio.gather(*(sender(d) for d in devices))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not accepted <= delivered and not stopped:
            left = deadline - loop.time()
            if left <= 0:
                break
            progress.clear()
            try:
                async with asyncio.timeout(left):
                    await progress.wait()
            except TimeoutError:
                break
    finally:
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    report.duplicates += sum(d.duplicates for d in devices)
    report.lost_ids = sorted(f"{s}:{i}" for s, i in accepted - delivered)
    if stopped:
        raise stopped[0]
    return report


async def _sim(args: argparse.Namespace, settings: Settings, bundles: list[str]) -> int:
    from firmware_sim.tcp_device import DeviceError

    # Acked once recorded: nothing the run receives is swallowed unseen.
    keys = [_private_key(settings, b) if args.e2e else None for b in bundles]
    if args.transport == "mqtt":
        from fishchat_iot.cli.mqtt import mqtt_device_for

        devices = [
            mqtt_device_for(settings, b, args.mqtt, auto_ack=False, private_key=k)
            for b, k in zip(bundles, keys, strict=True)
        ]
    else:
        devices = [
            device_for(settings, b, args.gateway, auto_ack=False, private_key=k)
            for b, k in zip(bundles, keys, strict=True)
        ]
    ids = [d.device_id for d in devices]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CliError(f"device {dup[0]!r} is given twice: one session per device")
    await connect_devices(devices)
    try:
        report = await exchange(
            devices, args.count, args.interval, args.timeout, args.text, quiet=args.json
        )
    except DeviceError as exc:
        dev = next((d for d in devices if d.final_error is not None), devices[0])
        raise device_error(dev.device_id, exc) from None
    finally:
        await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    if args.json:
        print_json(report.as_json())
    else:
        _say(report.summary())
    if report.lost:
        raise CliError(
            f"{report.lost} accepted message(s) were not delivered within {args.timeout:g}s "
            f"after the last send: {', '.join(report.lost_ids[:5])}"
            + (" ..." if report.lost > 5 else "")
        )
    if report.refused:
        raise CliError(f"the server refused {report.refused} message(s); see the lines above")
    return EXIT_OK


def _private_key(settings: Settings, bundle_file: str) -> str:
    """``--e2e``: the device's X25519 private key from its bundle."""
    from firmware_sim.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(bundle_path(settings, bundle_file))
    except BundleError as exc:
        raise CliError(str(exc)) from None
    key = bundle.raw.get("private_key")
    if not isinstance(key, str) or not key:
        raise CliError(
            f"--e2e: the bundle of {bundle.id!r} has no private_key (registered before end-to-end "
            "encryption): 'fishchat-iot device rotate' gives it one"
        )
    return key


# -- fleet mode -------------------------------------------------------------------------


def _fleet_mode(args: argparse.Namespace) -> bool:
    return (
        args.scenario is not None
        or args.rate is not None
        or args.duration is not None
        or args.transport in ("serial", "mixed")
    )


def register_fleet(
    settings: Settings, ids: list[str], e2e: bool = False
) -> tuple[dict[str, str], dict[str, str]]:
    """Register the fleet's devices (no bundles: the tokens live for this run); with
    ``e2e`` each gets a key pair. Returns (id -> token, id -> private key)."""
    tokens = {i: new_token() for i in ids}
    pairs = {i: generate_keypair() for i in ids} if e2e else {}

    async def work(store: Store) -> None:
        created = now_ms()
        for dev_id, token in tokens.items():
            pair = pairs.get(dev_id)
            await store.add_device(
                DeviceRecord(
                    id=dev_id,
                    token_hash=hash_token(token),
                    created_ms=created,
                    public_key=pair.public_b64 if pair else "",
                )
            )

    try:
        run_with_store(settings, work)
    except AlreadyExists as exc:
        raise CliError(f"{exc}: pick another --prefix") from None
    return tokens, {i: p.private_b64 for i, p in pairs.items()}


def _cmd_fleet(args: argparse.Namespace, settings: Settings) -> int:
    import secrets

    from firmware_sim.fleet import (
        Endpoints,
        FleetConfig,
        Progress,
        check_config,
        fleet_ids,
        run_fleet,
    )
    from fishchat_iot.cli.send import addresses, check_address, running_server

    if args.bundle:
        raise CliError("fleet mode registers its own devices: leave out --bundle")
    if not 2 <= args.devices <= 15000:
        raise CliError("--devices must be 2 to 15000")
    cfg = FleetConfig(
        devices=args.devices,
        transport=args.transport,
        scenario=args.scenario or "p2p",
        rate=100.0 if args.rate is None else args.rate,
        duration=5.0 if args.duration is None else args.duration,
        wait=args.timeout,
        payload=args.payload,
        e2e=bool(getattr(args, "e2e", False)),
    )
    if cfg.rate <= 0 or cfg.duration <= 0:
        raise CliError("--rate and --duration must be above 0")
    try:
        check_config(cfg, cfg.devices)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    gateways, msg_servers = addresses(settings, args.gateway, [], [])
    mqtt = (
        check_address(args.mqtt, "--mqtt")
        if args.mqtt
        else running_server(settings).get("mqtt", "")
    )
    if cfg.transport in ("mqtt", "mixed") and not mqtt:
        raise CliError("no MQTT broker: start the server with its MQTT edge, or give --mqtt")
    prefix = args.prefix or f"fleet-{secrets.token_hex(3)}-"
    tokens, keys = register_fleet(settings, fleet_ids(prefix, cfg.devices), cfg.e2e)
    progress = Progress(sys.stderr, enabled=not args.no_progress)
    if not args.json:
        _say(
            f"fleet: {cfg.devices} devices ({prefix}1..{cfg.devices}) over {cfg.transport}, "
            f"scenario {cfg.scenario}, {cfg.rate:g} msgs/s for {cfg.duration:g}s"
        )
    try:
        report = asyncio.run(
            run_fleet(cfg, Endpoints(gateways, msg_servers, mqtt), tokens, progress, keys)
        )
    except Exception as exc:
        code = getattr(exc, "code", "")
        raise CliError(f"fleet failed: {code + ': ' if code else ''}{exc}") from None
    if args.json:
        print_json(report.as_json())
    else:
        _say(report.summary())
    if report.lost:
        raise CliError(f"{report.lost} accepted deliveries lost: {', '.join(report.lost_ids[:5])}")
    if report.refused:
        raise CliError(f"the server refused {report.refused} message(s): {report.refusals}")
    return EXIT_OK


def cmd_sim(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if _fleet_mode(args):
        if args.timeout <= 0:
            raise CliError("--timeout must be above 0 seconds")
        return _cmd_fleet(args, settings)
    if args.count < 1:
        raise CliError("--count must be 1 or more")
    if args.interval < 0:
        raise CliError("--interval must be 0 or more seconds")
    if args.timeout <= 0:
        raise CliError("--timeout must be above 0 seconds")
    bundles: list[str] = list(args.bundle or [])
    if bundles:
        if len(bundles) < 2:
            raise CliError("give at least two --bundle files: the devices talk to each other")
    else:
        if not 2 <= args.devices <= 1000:
            raise CliError("--devices must be 2 to 1000")
        bundles = register_sim_devices(settings, args.devices)
        if not args.json:
            _say(
                f"registered {', '.join(f'{SIM_PREFIX}{i}' for i in range(1, args.devices + 1))}"
                f" (bundles in {default_bundle_path(settings, 'x').parent})"
            )
    return run_async(_sim(args, settings, bundles))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="simulated devices exchange messages over TCP; prints each exchange and a summary",
        description="Simulated devices log in, each sends --count messages to every other "
        "one, and each exchange is printed as it happens, then a summary (sent, accepted, "
        "delivered, duplicates absorbed, lost). Devices come from --bundle files, or are "
        "registered as sim-1..N in the local registry.",
    )
    p.add_argument(
        "--bundle",
        action="append",
        metavar="FILE",
        help="a device's provisioning bundle (repeat: at least two); or a device id whose "
        "bundle is in DATA_DIR/bundles/",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=2,
        metavar="N",
        help="without --bundle: register sim-1..N and use them (default 2)",
    )
    p.add_argument(
        "--count", type=int, default=3, metavar="N", help="messages per device pair (default 3)"
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.2,
        metavar="S",
        help="seconds between one device's sends (default 0.2)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for deliveries after the last send (default 10)",
    )
    p.add_argument("--text", default="hello", help="message text; ' N' is appended")
    p.add_argument(
        "--e2e",
        action="store_true",
        help="seal every message end to end with the bundles' private keys (docs/crypto.md): "
        "the server only carries ciphertext; each delivery line says how it was opened",
    )
    p.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="gateway to ask for a msg_server (default: the server running on --data-dir, "
        "then the bundles' addresses)",
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "mqtt", "serial", "mixed"),
        default="tcp",
        help="how the devices connect: FishChat TCP (default), MQTT (docs/protocol.md), "
        "serial (pseudo-terminals through an in-process serial adapter; fleet mode) or "
        "mixed (a third of each; fleet mode)",
    )
    p.add_argument(
        "--mqtt",
        metavar="HOST:PORT",
        help="with --transport mqtt: the broker (default: the running server's MQTT listener, "
        "then the bundles' 'mqtt' addresses, then mqtt.port on node.advertise_host)",
    )
    fleet = p.add_argument_group(
        "fleet mode",
        "any of these (or --transport serial|mixed) runs a fleet: devices registered for "
        "the run, a fixed total rate, a progress line on stderr, latency percentiles",
    )
    fleet.add_argument(
        "--scenario",
        choices=("p2p", "topic", "offline", "mixed"),
        help="p2p (default), topic (groups of 5 on a topic each), offline (p2p; every "
        "4th device goes offline for 30%% of the run), mixed (all of them)",
    )
    fleet.add_argument(
        "--rate", type=float, metavar="R", help="messages per second, whole fleet (default 100)"
    )
    fleet.add_argument("--duration", type=float, metavar="S", help="seconds of sending (default 5)")
    fleet.add_argument(
        "--payload", type=int, default=64, metavar="BYTES", help="message size (default 64)"
    )
    fleet.add_argument(
        "--prefix", metavar="TEXT", help="device id prefix (default fleet-<random>-)"
    )
    fleet.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_sim)
