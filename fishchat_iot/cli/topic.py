"""``fishchat-iot topic ...``: create topics, add and remove members, list and show
them (DESIGN sections 4 and 6).

A topic is *open* (any registered device may join, as v1's ``CREATE_TOPIC`` made them)
or *closed* (only its owner or an operator, with this command, adds members). Owners and
new members must be registered, active devices.
"""

from __future__ import annotations

import argparse
from typing import Any

from fishchat_iot.cli.context import run_with_store, settings_from_args, store_exists
from fishchat_iot.cli.device import get_active_device, unknown_device
from fishchat_iot.cli.output import (
    CliError,
    cell,
    format_ms,
    now_ms,
    print_fields,
    print_json,
    print_table,
    quoted,
)
from fishchat_iot.stores.base import AlreadyExists, NotFound, Store, TopicRecord

TOPIC_NAME_MAX = 128
# '/' would split the MQTT topic fc/{id}/topic/{name}; '+' and '#' are MQTT wildcards.
TOPIC_NAME_FORBIDDEN = "/+#\0"
TOPIC_NAME_RULE = (
    f"use 1 to {TOPIC_NAME_MAX} characters without '/', '+', '#', NUL or other control "
    "characters (the name becomes part of MQTT topics)"
)
MEMBERS_SHOWN = 60  # display columns of member ids in `topic list` before "... (+N)"


def check_topic_name(name: str) -> str:
    """``name`` if it is a valid new topic name, else a CliError saying the rule."""
    ok = (
        1 <= len(name) <= TOPIC_NAME_MAX
        and not any(c in TOPIC_NAME_FORBIDDEN for c in name)
        and name.isprintable()  # no control characters, which MQTT discourages too
    )
    if ok:
        try:
            name.encode("utf-8")  # a non-UTF-8 argv byte arrives as a lone surrogate
        except UnicodeEncodeError:
            ok = False
    if not ok:
        raise CliError(f"invalid topic name {quoted(name)}: {TOPIC_NAME_RULE}")
    return name


def unknown_topic(name: str) -> CliError:
    return CliError(
        f"no topic {quoted(name)}: check the name with 'fishchat-iot topic list' "
        "(and --data-dir), or create it with 'fishchat-iot topic create NAME --owner ID'"
    )


def access(topic: TopicRecord) -> str:
    return "open" if topic.open else "closed"


def topic_json(topic: TopicRecord) -> dict[str, Any]:
    return {
        "name": topic.name,
        "owner": topic.owner,
        "open": topic.open,
        "created_ms": topic.created_ms,
        "members": sorted(topic.members),
    }


def _members_summary(members: frozenset[str]) -> str:
    ids = sorted(members)
    shown: list[str] = []
    used = 0
    for i, member in enumerate(ids):
        text = cell(member)
        if shown and used + len(text) + 2 > MEMBERS_SHOWN:
            return f"{', '.join(shown)} ... (+{len(ids) - i})"
        shown.append(text)
        used += len(text) + 2
    return ", ".join(shown) if shown else "-"


async def _get_topic(store: Store, name: str) -> TopicRecord:
    topic = await store.get_topic(name)
    if topic is None:
        raise unknown_topic(name)
    return topic


# -- create ---------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    name = check_topic_name(args.name)
    owner: str = args.owner
    settings = settings_from_args(args)
    if not store_exists(settings):
        raise unknown_device(owner)

    async def work(store: Store) -> TopicRecord:
        await get_active_device(store, owner)
        topic = TopicRecord(
            name=name,
            owner=owner,
            open=not args.closed,
            created_ms=now_ms(),
            members=frozenset({owner}),
        )
        try:
            await store.create_topic(topic)
        except AlreadyExists:
            raise CliError(
                f"topic {quoted(name)} already exists: choose another name, or add members "
                f"with 'fishchat-iot topic add NAME ID'"
            ) from None
        return await store.get_topic(name) or topic

    topic = run_with_store(settings, work)
    if args.json:
        print_json(topic_json(topic))
        return 0
    how = (
        "open: any registered device may join"
        if topic.open
        else "closed: only its owner or an operator adds members"
    )
    print(f"created topic {quoted(topic.name)} ({how}); owner {quoted(topic.owner)}")
    return 0


# -- add / remove ---------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    name: str = args.name
    device_id: str = args.id
    settings = settings_from_args(args)

    async def work(store: Store) -> tuple[TopicRecord, bool]:
        await _get_topic(store, name)
        await get_active_device(store, device_id)
        try:
            added = await store.add_member(name, device_id)
        except NotFound:
            raise unknown_topic(name) from None
        return await _get_topic(store, name), added

    topic, added = run_with_store(settings, work)
    if args.json:
        print_json({"topic": name, "device": device_id, "changed": added, **_members(topic)})
        return 0
    if added:
        print(f"added device {quoted(device_id)} to topic {quoted(name)} ({_count(topic.members)})")
    else:
        print(f"device {quoted(device_id)} is already a member of topic {quoted(name)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    name: str = args.name
    device_id: str = args.id
    settings = settings_from_args(args)

    async def work(store: Store) -> tuple[TopicRecord, bool]:
        topic = await _get_topic(store, name)
        if device_id not in topic.members:
            # Not a member: fine if the device exists (idempotent), a typo if it does not.
            if await store.get_device(device_id) is None:
                raise unknown_device(device_id)
            return topic, False
        try:
            removed = await store.remove_member(name, device_id)
        except NotFound:
            raise unknown_topic(name) from None
        return await _get_topic(store, name), removed

    topic, removed = run_with_store(settings, work)
    if args.json:
        print_json({"topic": name, "device": device_id, "changed": removed, **_members(topic)})
        return 0
    if removed:
        note = " (it still owns the topic)" if topic.owner == device_id else ""
        print(
            f"removed device {quoted(device_id)} from topic {quoted(name)}{note} "
            f"({_count(topic.members)} left)"
        )
    else:
        print(f"device {quoted(device_id)} is not a member of topic {quoted(name)}")
    return 0


def _count(members: frozenset[str]) -> str:
    return f"{len(members)} member{'' if len(members) == 1 else 's'}"


def _members(topic: TopicRecord) -> dict[str, Any]:
    return {"members": sorted(topic.members)}


# -- list / show ----------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

    async def work(store: Store) -> list[TopicRecord]:
        return await store.list_topics()

    topics = run_with_store(settings, work) if store_exists(settings) else []
    if args.json:
        print_json([topic_json(t) for t in topics])
        return 0
    if not topics:
        print(
            f"no topics in {settings.data_dir}: "
            "create one with 'fishchat-iot topic create NAME --owner ID'"
        )
        return 0
    print_table(
        ("NAME", "OWNER", "ACCESS", "MEMBERS", "MEMBER IDS"),
        (
            (t.name, t.owner or "-", access(t), len(t.members), _members_summary(t.members))
            for t in topics
        ),
        right={3},
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    name: str = args.name
    settings = settings_from_args(args)

    async def work(store: Store) -> TopicRecord:
        return await _get_topic(store, name)

    if not store_exists(settings):
        raise unknown_topic(name)
    topic = run_with_store(settings, work)
    if args.json:
        print_json(topic_json(topic))
        return 0
    print_fields(
        [
            ("name", topic.name),
            ("owner", topic.owner or "-"),
            ("access", access(topic)),
            ("created", f"{format_ms(topic.created_ms)} UTC"),
            ("members", len(topic.members)),
        ]
    )
    for member in sorted(topic.members):
        print(f"  {cell(member)}")
    return 0


# -- parser ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "topic",
        help="create topics, add and remove members, list them",
        description="Topics (groups) and their members.",
    )
    cmds = parser.add_subparsers(dest="topic_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser(
        "create",
        help="create a topic owned by a device (open unless --closed)",
        description="Create a topic. Its owner, a registered device, is its first member.",
    )
    p.add_argument("name", metavar="NAME", help=f"topic name: {TOPIC_NAME_RULE}")
    p.add_argument("--owner", metavar="ID", required=True, help="the owning device")
    p.add_argument(
        "--closed",
        action="store_true",
        help="only the owner or an operator adds members (default: open, any registered "
        "device may join, as v1's CREATE_TOPIC)",
    )
    p.set_defaults(func=cmd_create)

    p = cmds.add_parser("add", help="add a registered device to a topic")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_add)

    p = cmds.add_parser("remove", help="remove a device from a topic")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_remove)

    p = cmds.add_parser("list", help="list topics with owner, access and members")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("show", help="show one topic with all its members")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_show)
