"""``fishchat-iot operator add|list|remove``: the monitor's operator tokens
(docs/monitor.md). Kept as SHA-256 hashes in ``{data_dir}/operators.json`` (mode 0600);
a token is printed once, when it is created. A running monitor sees changes at once."""

from __future__ import annotations

import argparse
import re
from typing import Any

from fishchat_iot.auth import new_token
from fishchat_iot.cli.context import ensure_data_dir, settings_from_args
from fishchat_iot.cli.output import CliError, format_ms, now_ms, print_json, print_table
from fishchat_iot.roles.monitor import (
    hash_operator_token,
    operators_path,
    read_operators,
    write_operators,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def cmd_add(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    path = operators_path(settings.data_dir)
    if not NAME_RE.match(args.name):
        raise CliError(
            f"invalid operator name {args.name!r}: use letters, digits and . _ @ - (max 64)"
        )
    try:
        ops = read_operators(path)
    except OSError as exc:
        raise CliError(f"{exc}: fix or remove the file") from None
    if args.name in ops and not args.replace:
        raise CliError(
            f"operator {args.name!r} exists: pass --replace to give it a new token "
            "(the old one stops working)"
        )
    ensure_data_dir(settings)
    token = new_token()
    ops[args.name] = {"token_sha256": hash_operator_token(token), "created_ms": now_ms()}
    try:
        write_operators(path, ops)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    if args.json:
        print_json({"name": args.name, "token": token, "file": str(path)})
    else:
        print(f"operator {args.name} added; its token (shown only now):")
        print(token)
        print("Log in to the monitor with it, or send 'Authorization: Bearer TOKEN'.")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        ops = read_operators(operators_path(settings.data_dir))
    except OSError as exc:
        raise CliError(f"{exc}: fix or remove the file") from None
    rows: list[dict[str, Any]] = [
        {"name": name, "created_ms": int(v.get("created_ms") or 0)}
        for name, v in sorted(ops.items())
    ]
    if args.json:
        print_json({"operators": rows})
    elif not rows:
        print("no operators: add one with 'fishchat-iot operator add NAME'")
    else:
        print_table(
            ("NAME", "CREATED (UTC)"), ((r["name"], format_ms(r["created_ms"])) for r in rows)
        )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    path = operators_path(settings.data_dir)
    try:
        ops = read_operators(path)
    except OSError as exc:
        raise CliError(f"{exc}: fix or remove the file") from None
    if args.name not in ops:
        raise CliError(f"no operator {args.name!r} (see 'fishchat-iot operator list')")
    del ops[args.name]
    write_operators(path, ops)
    if args.json:
        print_json({"removed": args.name})
    else:
        print(f"operator {args.name} removed: its token and login sessions stop working")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "operator",
        help="monitor operator tokens: add, list, remove",
        description="Operator tokens for the monitor's dashboard and API (docs/monitor.md). "
        "There is no default password: add an operator to log in.",
    )
    ops = p.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    a = ops.add_parser("add", help="create an operator and print its token once")
    a.add_argument("name")
    a.add_argument("--replace", action="store_true", help="give an existing operator a new token")
    a.set_defaults(func=cmd_add)
    ls = ops.add_parser("list", help="operators (names and creation times; never tokens)")
    ls.set_defaults(func=cmd_list)
    rm = ops.add_parser("remove", help="remove an operator: its token stops working")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)
