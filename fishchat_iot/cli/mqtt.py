"""``fishchat-iot mqtt export-mosquitto``: Mosquitto's ``password_file`` and
``acl_file`` for the external-broker mode, from the registry (docs/deploy-mosquitto.md)::

    fishchat-iot --config gw.toml mqtt export-mosquitto --out /etc/mosquitto/fishchat

writes ``passwd`` (mode 0600: the gateway accounts and every unrevoked device whose
current token is in a provisioning bundle) and ``acl``. Re-run it after registering,
rotating or revoking devices, then ``kill -HUP`` Mosquitto to reload both files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fishchat_iot.bundle import host_port
from fishchat_iot.cli.context import run_with_store, settings_from_args
from fishchat_iot.cli.output import EXIT_OK, CliError, print_json
from fishchat_iot.cli.send import bundle_path, check_address, running_server
from fishchat_iot.config import Settings
from fishchat_iot.files import PUBLIC, write_atomic
from fishchat_iot.stores.base import Store


def mqtt_device_for(
    settings: Settings, bundle_file: str, broker: str | None, **kwargs: Any
) -> Any:  # -> firmware_sim.mqtt_device.MqttDevice (imported lazily, like the TCP SDK)
    """An MQTT device for ``sim --transport mqtt`` (and ``send``-like commands): the
    broker is ``--mqtt``, else the server running on the data directory, else the
    bundle's ``mqtt`` addresses, else ``mqtt.port`` on ``node.advertise_host``."""
    from firmware_sim.bundle import BundleError, load_bundle
    from firmware_sim.mqtt_device import MqttDevice

    try:
        bundle = load_bundle(bundle_path(settings, bundle_file))
    except BundleError as exc:
        raise CliError(str(exc)) from None
    if broker:
        brokers = [check_address(broker, "--mqtt")]
    else:
        raw = bundle.raw.get("mqtt")
        listed = [raw] if isinstance(raw, str) else [a for a in raw or [] if isinstance(a, str)]
        live = running_server(settings).get("mqtt", "")
        brokers = list(dict.fromkeys(a for a in [live, *listed] if a))
        if not brokers:
            brokers = [host_port(settings.node.advertise_host, settings.mqtt.port)]
    if bundle.raw.get("psk"):  # a gateway-terminated device seals with its pre-shared key
        kwargs.setdefault("psk", bundle.raw["psk"])
    return MqttDevice(bundle.id, bundle.token, brokers, **kwargs)


def cmd_export(args: argparse.Namespace) -> int:
    from device_adapters.mqtt import mosquitto

    settings = settings_from_args(args)
    password = settings.mqtt.password
    if not password:
        raise CliError(
            "mqtt.password is empty: the gateway's broker account needs a password; set it "
            "in the --config file ([mqtt] password) or FISHCHAT_MQTT_PASSWORD"
        )
    users = list(dict.fromkeys(args.gateway_user or [settings.mqtt.username]))
    if not all(users) or any(c in u for u in users for c in ":\n"):
        raise CliError("--gateway-user names must be non-empty, without ':' or newlines")
    if args.iterations < 1:
        raise CliError("--iterations must be 1 or more")
    sources = [Path(b) for b in args.bundle or []] or [settings.data_dir / "bundles"]
    missing = [str(p) for p in sources if not p.exists()]
    if args.bundle and missing:
        raise CliError(f"no bundle file or directory {missing[0]}: check --bundle")

    async def work(store: Store) -> mosquitto.Tokens:
        return mosquitto.match_tokens(await store.list_devices(), mosquitto.bundle_files(sources))

    found = run_with_store(settings, work)
    out = Path(args.out)
    passwd, acl = out / "passwd", out / "acl"
    try:
        write_atomic(
            passwd,
            mosquitto.password_text(found.tokens, dict.fromkeys(users, password), args.iterations),
        )
        write_atomic(acl, mosquitto.acl_text(users), PUBLIC)
    except OSError as exc:
        raise CliError(
            f"cannot write to {out}: {(exc.strerror or str(exc)).lower()}: choose another --out"
        ) from None
    if args.json:
        print_json(
            {
                "password_file": str(passwd),
                "acl_file": str(acl),
                "gateway_users": users,
                "devices": sorted(found.tokens),
                "skipped": found.skipped,
                "revoked": found.revoked,
            }
        )
        return EXIT_OK
    print(f"wrote {passwd} ({len(users)} gateway account(s), {len(found.tokens)} device(s))")
    print(f"wrote {acl}")
    if found.revoked:
        print(f"left out {len(found.revoked)} revoked device(s): {', '.join(found.revoked[:10])}")
    if found.skipped:
        print(
            f"skipped {len(found.skipped)} device(s) with no bundle holding their current "
            f"token: {', '.join(found.skipped[:10])}{' ...' if len(found.skipped) > 10 else ''}"
            " (pass their bundles with --bundle)"
        )
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mqtt",
        help="the MQTT edge: export Mosquitto's password and ACL files",
        description="Tools for the MQTT edge's external-broker mode.",
    )
    cmds = p.add_subparsers(dest="mqtt_command", metavar="COMMAND", required=True)
    e = cmds.add_parser(
        "export-mosquitto",
        help="write Mosquitto's password_file and acl_file from the registry",
        description="Write OUT/passwd (Mosquitto's sha512-pbkdf2 format, mode 0600) with "
        "the gateway account(s) and every unrevoked device whose current token is in a "
        "bundle, and OUT/acl (devices: their own fc/ID/ prefix; gateways: the uplink and "
        "the inboxes). Tokens are only kept hashed in the registry, so they come from the "
        "bundles in DATA_DIR/bundles or --bundle.",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="directory for passwd and acl")
    e.add_argument(
        "--bundle",
        action="append",
        metavar="PATH",
        help="a bundle file, or a directory of them (repeat; default DATA_DIR/bundles)",
    )
    e.add_argument(
        "--gateway-user",
        action="append",
        metavar="USER",
        help="a gateway account (repeat: one per gateway process; default mqtt.username); "
        "each gets mqtt.password",
    )
    e.add_argument(
        "--iterations",
        type=int,
        default=101,
        metavar="N",
        help="PBKDF2 iterations (default 101, as mosquitto_passwd)",
    )
    e.set_defaults(func=cmd_export)
