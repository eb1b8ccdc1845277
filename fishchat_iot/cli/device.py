"""``fishchat-iot device ...``: register devices (token, provisioning bundle), list,
show and revoke them (DESIGN sections 4 and 6).

The token is shown once, at registration; the registry keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path
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
from fishchat_iot.cli.context import run_with_store, settings_from_args, store_exists
from fishchat_iot.cli.output import (
    CliError,
    format_ms,
    now_ms,
    print_fields,
    print_json,
    print_table,
    quoted,
)
from fishchat_iot.config import Settings
from fishchat_iot.crypto import b64e, generate_keypair
from fishchat_iot.crypto.atrest import AtRest, load_server_key
from fishchat_iot.crypto.seal import KEY_LEN, CryptoError
from fishchat_iot.stores.base import AlreadyExists, DeviceRecord, NotFound, Store, TopicRecord

# The id becomes part of MQTT topics (fc/{id}/...) and of the bundle's file name.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
DEVICE_ID_RULE = (
    "use 1 to 64 characters from A-Z a-z 0-9 _ . : - (no '/': the id becomes part of MQTT topics)"
)


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is a valid new device id, else a CliError saying the rule."""
    if DEVICE_ID_RE.fullmatch(device_id) is None:
        raise CliError(f"invalid device id {quoted(device_id)}: {DEVICE_ID_RULE}")
    return device_id


def unknown_device(device_id: str) -> CliError:
    return CliError(
        f"no device {quoted(device_id)}: check the id with 'fishchat-iot device list' "
        "(and --data-dir), or register it with 'fishchat-iot device register ID'"
    )


def revoked_device(device_id: str) -> CliError:
    return CliError(
        f"device {quoted(device_id)} is revoked: choose an active device "
        "('fishchat-iot device list' shows which are)"
    )


async def get_active_device(store: Store, device_id: str) -> DeviceRecord:
    """The device, which must be registered and not revoked (topic owners and members)."""
    device = await store.get_device(device_id)
    if device is None:
        raise unknown_device(device_id)
    if device.revoked:
        raise revoked_device(device_id)
    return device


# -- register -------------------------------------------------------------------------


def server_atrest(settings: Settings) -> AtRest:
    """The server key (``store.server_key``, by default ``{data_dir}/server.key``;
    created mode 0600 when there is none, as ``up`` does): a pre-shared key is stored
    only sealed under it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.server_key_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return AtRest(load_server_key(settings.server_key_path))
    except CryptoError as exc:
        raise CliError(f"{exc}; the device was not changed") from None
    except OSError as exc:
        raise CliError(
            f"cannot read the server key {settings.server_key_path}: "
            f"{(exc.strerror or str(exc)).lower()}"
        ) from None


def new_credentials(
    settings: Settings, device_id: str, psk: bool
) -> tuple[str, str, dict[str, str]]:
    """-> (public key for the registry, sealed PSK for the registry, the bundle's keys).
    A gateway-terminated device (``psk``) gets a random 32-byte pre-shared key and no
    X25519 key pair; any other an X25519 key pair (only the public half is stored)."""
    if psk:
        key = os.urandom(KEY_LEN)
        return "", server_atrest(settings).seal_psk(device_id, key), {"psk": b64e(key)}
    keys = generate_keypair()
    return keys.public_b64, "", {"private_key": keys.private_b64, "public_key": keys.public_b64}


def _duplicate(device_id: str) -> CliError:
    return CliError(f"device {quoted(device_id)} already exists: choose another id")


def _write_bundle(path: Path, bundle: dict[str, Any], from_option: bool) -> Path:
    try:
        return write_bundle(path, bundle)
    except BundleError as exc:
        if isinstance(exc, BundleExists):
            hint = (
                "remove it (after copying it to its device) or choose another path "
                "with --bundle FILE"
            )
        elif from_option:
            hint = "choose another path with --bundle FILE"
        else:
            hint = "choose a writable path with --bundle FILE or another --data-dir"
        raise CliError(f"{exc}: {hint}; the device was not registered") from None


def cmd_register(args: argparse.Namespace) -> int:
    device_id = check_device_id(args.id)
    settings = settings_from_args(args)
    bundle_path = Path(args.bundle) if args.bundle else default_bundle_path(settings, device_id)
    token = new_token()
    public_key, sealed_psk, secrets = new_credentials(settings, device_id, args.psk)
    created_ms = now_ms()
    record = DeviceRecord(
        id=device_id,
        token_hash=hash_token(token),
        v1=args.v1,
        created_ms=created_ms,
        public_key=public_key,
        psk=sealed_psk,
    )
    bundle = new_bundle(
        device_id, token, settings, v1=args.v1, created_ms=created_ms, extra=secrets
    )

    async def work(store: Store) -> Path:
        if await store.get_device(device_id) is not None:
            raise _duplicate(device_id)
        # Bundle first: a path we cannot write must not leave a device whose token is lost.
        written = _write_bundle(bundle_path, bundle, from_option=args.bundle is not None)
        try:
            await store.add_device(record)
        except Exception as exc:
            # The store wrote nothing, so the bundle's token is useless: take it back.
            # (Not on Ctrl-C: the add may still commit, and then the bundle is the only
            # copy of the token.)
            with contextlib.suppress(OSError):
                remove_bundle(written)
            if isinstance(exc, AlreadyExists):
                raise _duplicate(device_id) from None
            raise
        return written

    written = run_with_store(settings, work, create=True)
    if args.json:
        print_json(
            {
                "id": device_id,
                "token": token,
                "bundle": str(written),
                "v1": args.v1,
                "psk": args.psk,
            }
        )
        return 0
    login = "token or token-less v1 login" if args.v1 else "token login"
    print(f"registered device {quoted(device_id)} ({login})")
    print(f"token:  {token}")
    if args.psk:
        print("pre-shared key: in the bundle (gateway-terminated device; no X25519 keys)")
    else:
        print(f"public key: {public_key}")
    print(f"bundle: {written} (mode 0600)")
    print(
        "warning: the token is shown only now and cannot be shown again "
        "(only its hash is stored); copy the bundle to the device, keep it secret, "
        "then delete it here"
    )
    return 0


# -- list -----------------------------------------------------------------------------


def _device_json(device: DeviceRecord, queued: int) -> dict[str, Any]:
    return {
        "id": device.id,
        "v1": device.v1,
        "revoked": device.revoked,
        "created_ms": device.created_ms,
        "revoked_ms": device.revoked_ms,
        "queued": queued,
        "psk": bool(device.psk),
    }


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

    async def work(store: Store) -> tuple[list[DeviceRecord], dict[str, int]]:
        return await store.list_devices(), await store.queue_depths()

    devices: list[DeviceRecord] = []
    depths: dict[str, int] = {}
    if store_exists(settings):
        devices, depths = run_with_store(settings, work)
    if args.json:
        print_json([_device_json(d, depths.get(d.id, 0)) for d in devices])
        return 0
    if not devices:
        print(
            f"no devices registered in {settings.data_dir}: "
            "add one with 'fishchat-iot device register ID'"
        )
        return 0
    print_table(
        ("ID", "V1", "REVOKED", "CREATED (UTC)", "QUEUED"),
        ((d.id, d.v1, d.revoked, format_ms(d.created_ms), depths.get(d.id, 0)) for d in devices),
        right={4},
    )
    return 0


# -- show -----------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    device_id: str = args.id

    async def work(store: Store) -> tuple[DeviceRecord, int, list[TopicRecord]]:
        device = await store.get_device(device_id)
        if device is None:
            raise unknown_device(device_id)
        topics = [t for t in await store.list_topics() if device_id in t.members]
        return device, await store.queue_depth(device_id), topics

    device, queued, topics = run_with_store(settings, work)
    member_of = [t.name for t in topics]
    if args.json:
        doc = _device_json(device, queued)
        doc.update(public_key=device.public_key, topics=member_of, meta=dict(device.meta))
        print_json(doc)  # never the token (unknown here) nor its hash
        return 0
    state = f"revoked at {format_ms(device.revoked_ms)} UTC" if device.revoked else "active"
    fields: list[tuple[str, object]] = [
        ("id", device.id),
        ("state", state),
        ("v1 login", "allowed" if device.v1 else "not allowed (token only)"),
        ("created", f"{format_ms(device.created_ms)} UTC"),
        ("public key", device.public_key or "-"),
        ("encryption", "gateway-terminated (pre-shared key)" if device.psk else "end to end"),
        ("queued messages", queued),
        ("topics", ", ".join(member_of) if member_of else "-"),
    ]
    fields.extend((f"meta {key}", value) for key, value in sorted(device.meta.items()))
    print_fields(fields)
    return 0


# -- rotate ---------------------------------------------------------------------------


def cmd_rotate(args: argparse.Namespace) -> int:
    """New token and X25519 key pair (a gateway-terminated device: a new pre-shared
    key); the new bundle replaces the old one (which is useless from the moment the
    registry holds the new credentials)."""
    device_id = check_device_id(args.id)
    settings = settings_from_args(args)
    bundle_path = Path(args.bundle) if args.bundle else default_bundle_path(settings, device_id)
    final = Path(os.path.abspath(bundle_path))
    staging = final.with_name(final.name + ".new")
    token = new_token()
    public_key = ""

    async def work(store: Store) -> Path:
        nonlocal public_key
        device = await get_active_device(store, device_id)
        public_key, sealed_psk, secrets = new_credentials(settings, device_id, bool(device.psk))
        bundle = new_bundle(
            device_id, token, settings, v1=device.v1, created_ms=now_ms(), extra=secrets
        )
        remove_bundle(staging)
        written = _write_bundle(staging, bundle, from_option=args.bundle is not None)
        try:
            await store.set_credentials(
                device_id, hash_token(token), public_key, sealed_psk if device.psk else None
            )
        except BaseException:
            with contextlib.suppress(OSError):
                remove_bundle(written)
            raise
        os.replace(written, final)
        return final

    written = run_with_store(settings, work)
    if args.json:
        print_json(
            {"id": device_id, "token": token, "public_key": public_key, "bundle": str(written)}
        )
        return 0
    print(f"rotated credentials of device {quoted(device_id)}: the old token and keys are void")
    print(f"token:  {token}")
    print(f"public key: {public_key or '- (pre-shared key in the bundle)'}")
    print(f"bundle: {written} (mode 0600)")
    print(
        "note: a running server cuts the device's live sessions within seconds (they log "
        "in again only with the new bundle); peers fetch the new public key "
        "(GET_PUBLIC_KEY) after their next failure to open"
    )
    return 0


# -- revoke ---------------------------------------------------------------------------


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    device_id: str = args.id

    async def work(store: Store) -> tuple[DeviceRecord, bool]:
        device = await store.get_device(device_id)
        if device is None:
            raise unknown_device(device_id)
        if device.revoked:
            return device, False
        try:
            await store.revoke_device(device_id, now_ms())
        except NotFound:
            raise unknown_device(device_id) from None
        after = await store.get_device(device_id)
        return (after or device), True

    device, changed = run_with_store(settings, work)
    if args.json:
        print_json(
            {
                "id": device.id,
                "revoked": True,
                "revoked_ms": device.revoked_ms,
                "already_revoked": not changed,
            }
        )
        return 0
    when = f"{format_ms(device.revoked_ms)} UTC"
    if changed:
        print(
            f"revoked device {quoted(device.id)} at {when}: it can no longer log in and "
            "its live sessions are cut within seconds"
        )
    else:
        print(f"device {quoted(device.id)} was already revoked at {when}; nothing changed")
    return 0


# -- parser ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "device",
        help="register, list, show and revoke devices",
        description="The device registry: credentials and provisioning bundles.",
    )
    cmds = parser.add_subparsers(dest="device_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser(
        "register",
        help="register a new device; prints its token once and writes its bundle",
        description="Register a new device with a fresh 256-bit token (only its hash is "
        "stored) and write its provisioning bundle (JSON, mode 0600). The token is shown "
        "only now.",
    )
    p.add_argument("id", metavar="ID", help=DEVICE_ID_RULE.replace("use ", "device id: ", 1))
    p.add_argument(
        "--v1",
        action="store_true",
        help="also allow token-less FishChat v1 logins for this device",
    )
    p.add_argument(
        "--psk",
        action="store_true",
        help="a gateway-terminated device (too small for X25519): give it a random 32-byte "
        "pre-shared key (in its bundle; the registry keeps it only sealed under the server "
        "key) instead of an X25519 key pair",
    )
    p.add_argument(
        "--bundle",
        metavar="FILE",
        help="where to write the provisioning bundle (default: DATA_DIR/bundles/ID.json); "
        "an existing file is never replaced",
    )
    p.set_defaults(func=cmd_register)

    p = cmds.add_parser(
        "rotate",
        help="replace a device's token and X25519 keys; writes a new bundle",
        description="Give a device a new 256-bit token and a new X25519 key pair (only the "
        "token's hash and the public key are stored) and write its new bundle (mode 0600), "
        "replacing the old one.",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--bundle",
        metavar="FILE",
        help="where to write the new bundle (default: DATA_DIR/bundles/ID.json)",
    )
    p.set_defaults(func=cmd_rotate)

    p = cmds.add_parser("list", help="list the registered devices")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("show", help="show one device (never its token)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser(
        "revoke",
        help="revoke a device: it can no longer log in and its sessions are cut",
    )
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_revoke)
