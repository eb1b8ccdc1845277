"""``fishchat-iot send`` and ``fishchat-iot listen``: act as one device over TCP, with
its provisioning bundle — send one message and print its accepted id, or print the
messages that arrive. The README walk-through: one terminal listens as bob, another
sends as alice::

    fishchat-iot listen --as data/bundles/bob.json
    fishchat-iot send --as data/bundles/alice.json --to bob "hello bob"

``--as`` takes a bundle file, or a device id whose bundle is ``DATA_DIR/bundles/ID.json``.
Where to connect: ``--gateway HOST:PORT`` if given; else the server running on this
data directory (its ``status.json``), then the bundle's addresses.

A device has one session at a time: sending as the device that is listening replaces
the listener's session (it stops with SESSION_REPLACED).

The helpers here (``device_for``, ``connect_devices``, ``device_error``) are shared with
``fishchat-iot sim``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fishchat_iot import errors
from fishchat_iot.bundle import default_bundle_path, host_port
from fishchat_iot.cli.context import settings_from_args
from fishchat_iot.cli.output import EXIT_ERROR, EXIT_OK, CliError, cell, now_ms, print_json
from fishchat_iot.config import Settings

DEFAULT_TIMEOUT = 30.0


def _dedupe(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def check_address(value: str, option: str = "--gateway") -> str:
    from firmware_sim.tcp_device import parse_address

    try:
        parse_address(value)
    except ValueError:
        raise CliError(f"{option} {value!r} is not HOST:PORT (e.g. 127.0.0.1:17000)") from None
    return value


def running_server(settings: Settings) -> dict[str, str]:
    """The listeners of the server running on this data directory, or {}."""
    try:
        from fishchat_iot.cli.status import server_state, status_path
    except ImportError:  # pragma: no cover - status is part of the same package
        return {}
    state = server_state(status_path(settings), now_ms())
    listeners = (state.doc or {}).get("listeners") if state.running else None
    if not isinstance(listeners, dict):
        return {}
    return {str(k): str(v) for k, v in listeners.items() if isinstance(v, str)}


def addresses(
    settings: Settings, override: str | None, bundle_gw: Sequence[str], bundle_ms: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(gateways, msg_servers) to try, best first."""
    if override:
        return [check_address(override)], []
    live = running_server(settings)
    gateways = _dedupe([live.get("gateway", ""), *bundle_gw])
    msg_servers = _dedupe([live.get("msg_server", ""), *bundle_ms])
    if not gateways and not msg_servers:
        host = settings.node.advertise_host
        gateways = [host_port(host, settings.tcp.gateway_port)]
    return gateways, msg_servers


def bundle_path(settings: Settings, value: str) -> Path:
    """``--as`` / ``--bundle``: a file, or a device id with a bundle in the data dir."""
    path = Path(value)
    if path.is_file() or "/" in value or value.endswith(".json"):
        return path
    default = default_bundle_path(settings, value)
    if default.is_file():
        return default
    return path  # load_bundle says it does not exist


def device_for(
    settings: Settings, bundle_file: str, gateway: str | None, **kwargs: Any
) -> Any:  # -> firmware_sim.tcp_device.TcpDevice (imported lazily: --help needs no SDK)
    from firmware_sim.bundle import BundleError, load_bundle
    from firmware_sim.tcp_device import TcpDevice

    path = bundle_path(settings, bundle_file)
    if not path.exists() and path == Path(bundle_file) and "/" not in bundle_file:
        raise CliError(
            f"no bundle {bundle_file!r}: it is neither a file nor a device id with a bundle in "
            f"{default_bundle_path(settings, bundle_file).parent}; pass the bundle file "
            "'fishchat-iot device register' wrote (and check --data-dir)"
        )
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        raise CliError(str(exc)) from None
    gateways, msg_servers = addresses(settings, gateway, bundle.gateway, bundle.msg_server)
    if bundle.raw.get("psk"):  # a gateway-terminated device seals with its pre-shared key
        kwargs.setdefault("psk", bundle.raw["psk"])
    return TcpDevice(bundle.id, bundle.token, gateways, msg_servers, **kwargs)


def device_error(device_id: str, exc: Exception, where: Sequence[str] = ()) -> CliError:
    """The one-line error for a device that could not connect or was stopped."""
    code = getattr(exc, "code", "")
    text = getattr(exc, "text", "") or str(exc)
    at = f" at {', '.join(where)}" if where else ""
    if code == errors.AUTH_FAILED:
        return CliError(
            f"device {device_id!r} was refused by the server{at} ({text}): its bundle does not "
            "match that server's registry; check the bundle, --data-dir and --gateway"
        )
    if code == errors.REVOKED:
        return CliError(
            f"device {device_id!r} is revoked: register a new device "
            "('fishchat-iot device register ID') and use its bundle"
        )
    if code == errors.SESSION_REPLACED:
        return CliError(
            f"device {device_id!r} logged in elsewhere and this session was replaced: one "
            "device, one session; use another device's bundle here"
        )
    if code in ("CONNECT_FAILED", "TIMEOUT", errors.UNAVAILABLE):
        return CliError(
            f"cannot reach the server for device {device_id!r}{at} ({text}): is "
            "'fishchat-iot up' running? pass --gateway HOST:PORT if it listens elsewhere"
        )
    return CliError(f"device {device_id!r}: {code or type(exc).__name__}: {text}")


async def connect_devices(devices: Sequence[Any]) -> None:
    """Connect every device; on the first failure close them all and raise CliError."""
    from firmware_sim.tcp_device import DeviceError

    results = await asyncio.gather(*(d.connect() for d in devices), return_exceptions=True)
    failed = [(d, r) for d, r in zip(devices, results, strict=True) if isinstance(r, BaseException)]
    if not failed:
        return
    await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    dev, exc = failed[0]
    if isinstance(exc, DeviceError):
        raise device_error(dev.device_id, exc, dev.gateways or dev.msg_servers)
    if isinstance(exc, Exception):
        raise CliError(f"device {dev.device_id!r}: {exc}")
    raise exc


def run_async(coro: Any) -> int:
    """Run a command's coroutine (Ctrl-C: KeyboardInterrupt, reported by ``main``)."""
    result: int = asyncio.run(coro)
    return result


# -- send -------------------------------------------------------------------------------


async def _send(args: argparse.Namespace, settings: Settings) -> int:
    from firmware_sim.tcp_device import DeviceError

    dev = device_for(settings, args.as_, args.gateway, reconnect=True)
    where = list(dev.gateways or dev.msg_servers)
    try:
        async with asyncio.timeout(args.timeout):
            await connect_devices([dev])
            try:
                msg_id = await dev.send(args.to, args.text, id=args.id)
            except DeviceError as exc:
                if exc.code in (errors.AUTH_FAILED, errors.REVOKED, errors.SESSION_REPLACED):
                    raise device_error(dev.device_id, exc, where) from None
                raise CliError(
                    f"message to {args.to!r} not accepted: {exc.code}: {exc.text}" + _hint(exc.code)
                ) from None
    except TimeoutError:
        raise CliError(
            f"no receipt for the message to {args.to!r} within {args.timeout:g}s: it may or may "
            "not have been accepted; re-running with the same --id is safe (a retry is never "
            "delivered twice)"
        ) from None
    finally:
        await dev.close()
    if args.json:
        print_json({"id": msg_id, "from": dev.device_id, "to": args.to, "accepted": True})
    else:
        print(msg_id)
    return EXIT_OK


def _hint(code: str) -> str:
    return {
        errors.UNKNOWN_DEVICE: " (register it with 'fishchat-iot device register ID')",
        errors.QUEUE_FULL: " (the recipient is offline with a full queue: retry later)",
        errors.DUPLICATE_ID: " (choose another --id)",
    }.get(code, "")


def cmd_send(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.timeout <= 0:
        raise CliError("--timeout must be above 0 seconds")
    if args.id is not None and not 1 <= len(args.id) <= 64:
        raise CliError("--id must be 1 to 64 characters")
    return run_async(_send(args, settings))


# -- listen -----------------------------------------------------------------------------


def format_message(me: str, msg: Any) -> str:
    """``bob <- alice: hello`` (p2p) or ``bob <- alice [room]: hello`` (topic)."""
    where = f" [{cell(msg.topic)}]" if msg.kind == "topic" else ""
    return f"{cell(me)} <- {cell(msg.sender)}{where}: {cell(msg.text)}"


async def _listen(args: argparse.Namespace, settings: Settings, seen: list[int]) -> int:
    from firmware_sim.tcp_device import DeviceError

    # Acked only once printed: stopping after --count must not swallow queued messages.
    dev = device_for(settings, args.as_, args.gateway, auto_ack=False)
    where = list(dev.gateways or dev.msg_servers)
    deadline = None if args.timeout is None else asyncio.get_running_loop().time() + args.timeout
    await connect_devices([dev])
    try:
        if not args.json and sys.stderr.isatty():
            print(f"listening as {cell(dev.device_id)} (Ctrl-C to stop)", file=sys.stderr)
        while args.count is None or seen[0] < args.count:
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                break
            try:
                msg = await dev.receive(timeout=left)
            except TimeoutError:
                break
            except DeviceError as exc:
                raise device_error(dev.device_id, exc, where) from None
            if args.json:
                doc = {
                    "kind": msg.kind,
                    "id": msg.id,
                    "from": msg.sender,
                    "to": dev.device_id,
                    "topic": msg.topic,
                    "text": msg.text,
                    "ts": msg.ts,
                }
                sys.stdout.write(json.dumps(doc, ensure_ascii=True) + "\n")
            else:
                sys.stdout.write(format_message(dev.device_id, msg) + "\n")
            sys.stdout.flush()
            dev.ack(msg)
            seen[0] += 1
    finally:
        await dev.close()
    if args.count is not None and seen[0] < args.count:
        raise CliError(
            f"received {seen[0]} of {args.count} messages within {args.timeout:g}s "
            "(the rest stay queued for the device)"
        )
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.timeout is not None and args.timeout <= 0:
        raise CliError("--timeout must be above 0 seconds")
    if args.count is not None and args.count < 1:
        raise CliError("--count must be 1 or more")
    seen = [0]
    try:
        return run_async(_listen(args, settings, seen))
    except KeyboardInterrupt:
        # Ctrl-C is how a listener is normally stopped: not an error.
        with contextlib.suppress(OSError):
            print(f"stopped after {seen[0]} message(s)", file=sys.stderr)
        return EXIT_OK if args.count is None else EXIT_ERROR


# -- parser -----------------------------------------------------------------------------


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--as",
        dest="as_",
        metavar="BUNDLE",
        required=True,
        help="the device to act as: its bundle file, or its id (bundle in DATA_DIR/bundles/)",
    )
    p.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="gateway to ask for a msg_server (default: the server running on --data-dir, "
        "then the bundle's addresses)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "send",
        help="send one message as a device (TCP) and print its accepted id",
        description="Log in as the device of a provisioning bundle, send one p2p message, "
        "wait for the server's receipt (ACCEPTED) and print the message id.",
    )
    _add_device_options(p)
    p.add_argument("--to", required=True, metavar="ID", help="recipient device id")
    p.add_argument(
        "--id", metavar="MSG_ID", help="message id (default: a fresh one); a retry keeps it"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the receipt, connecting included (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument("text", metavar="TEXT", help="the message")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "listen",
        help="print the messages a device receives (TCP) as they arrive",
        description="Log in as the device of a provisioning bundle and print every message "
        "it receives ('bob <- alice: text'; --json: one JSON object per line). Each message "
        "is acked once printed. Stops after --count messages, after --timeout seconds, or "
        "on Ctrl-C.",
    )
    _add_device_options(p)
    p.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="stop after S seconds (default: never)"
    )
    p.set_defaults(func=cmd_listen)
