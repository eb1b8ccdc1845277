"""``fishchat-iot certs``: the project's certificate authority and the certificates of
the TLS listeners and of devices (docs/security.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fishchat_iot.cli.context import run_with_store, settings_from_args
from fishchat_iot.cli.output import CliError, print_json, quoted
from fishchat_iot.config import Settings


def _paths(settings: Settings):  # type: ignore[no-untyped-def]
    from fishchat_iot import tls

    t = settings.tls
    return tls.paths(settings.data_dir / "certs", t.cert, t.key, t.ca)


def cmd_init(args: argparse.Namespace) -> int:
    from fishchat_iot import tls

    settings = settings_from_args(args)
    p = _paths(settings)
    if p.ca_cert.exists() and not args.force:
        raise CliError(
            f"a CA already exists at {p.ca_cert}: certificates it issued would stop working "
            "if it were replaced; pass --force to replace it anyway"
        )
    try:
        tls.create_ca(p, args.name)
    except OSError as exc:
        raise CliError(f"cannot write the CA into {p.ca_cert.parent}: {exc.strerror}") from None
    if args.json:
        print_json({"ca_cert": str(p.ca_cert), "ca_key": str(p.ca_key)})
    else:
        print(f"created CA {quoted(args.name)}: {p.ca_cert} (key {p.ca_key}, mode 0600)")
        print("Next: fishchat-iot certs issue server --host HOST")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from fishchat_iot import tls

    settings = settings_from_args(args)
    p = _paths(settings)
    if args.kind == "server":
        if args.id:
            raise CliError("'certs issue server' takes no id: give its hosts with --host")
        hosts = args.host or ["localhost", "127.0.0.1", settings.node.advertise_host]
        hosts = list(dict.fromkeys(hosts))
        cn, cert_path, key_path = hosts[0], p.cert, p.key
    else:
        if not args.id:
            raise CliError("'certs issue device' needs the device id: certs issue device ID")
        device_id: str = args.id
        if args.host:
            raise CliError("--host is for server certificates")

        async def check(store):  # type: ignore[no-untyped-def]
            return await store.get_device(device_id)

        rec = run_with_store(settings, check)
        if rec is None:
            raise CliError(
                f"no device {quoted(device_id)}: register it first with "
                "'fishchat-iot device register ID'"
            )
        if rec.revoked:
            raise CliError(f"device {quoted(device_id)} is revoked: no certificate for it")
        hosts = []
        cn = device_id
        out = Path(args.out) if args.out else p.devices
        cert_path, key_path = out / f"{device_id}.pem", out / f"{device_id}.key"
    try:
        cert, key = tls.issue(p, cn, server=args.kind == "server", hosts=hosts, days=args.days)
        tls.write_pair(cert, key, cert_path, key_path)
    except tls.TlsError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {cert_path}: {exc.strerror}") from None
    doc = {
        "kind": args.kind,
        "cn": cn,
        "cert": str(cert_path),
        "key": str(key_path),
        "ca_cert": str(p.ca_cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    if hosts:
        doc["hosts"] = ", ".join(hosts)
    if args.json:
        print_json(doc)
    else:
        what = f"hosts {', '.join(hosts)}" if hosts else f"CN {cn}"
        print(f"issued {args.kind} certificate ({what}), valid until {doc['not_after']}")
        print(f"  certificate {cert_path}")
        print(f"  key         {key_path} (mode 0600)")
        print(f"  CA          {p.ca_cert}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "certs",
        help="the TLS certificate authority and certificates for the server and devices",
        description="Create the project's CA and issue certificates from it "
        "(files under {data_dir}/certs; docs/security.md).",
    )
    csub = parser.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    p = csub.add_parser("init", help="create the CA (key + self-signed certificate)")
    p.add_argument("--name", default="FishChat IoT CA", help="the CA's common name")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=cmd_init)
    p = csub.add_parser(
        "issue",
        help="issue a server certificate, or a device's client certificate (CN = its id)",
    )
    p.add_argument("kind", choices=["server", "device"])
    p.add_argument("id", nargs="?", default="", help="the device id (device certificates)")
    p.add_argument(
        "--host",
        action="append",
        help="server certificates: a DNS name or IP address devices connect to "
        "(repeatable; default localhost, 127.0.0.1 and node.advertise_host)",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument(
        "--out", help="device certificates: directory (default {data_dir}/certs/devices)"
    )
    p.set_defaults(func=cmd_issue)
