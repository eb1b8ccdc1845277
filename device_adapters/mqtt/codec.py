"""The MQTT topic scheme and JSON envelopes of ``docs/protocol.md`` (MQTT section):
parsing what a device publishes under ``fc/{id}/`` and building what the gateway
publishes on ``fc/{id}/in``. Shared by the embedded broker and the external-broker mode;
knows nothing about sockets or the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fishchat_iot import errors
from fishchat_iot.core.envelope import Envelope
from fishchat_iot.crypto.seal import CryptoError, parse_enc
from fishchat_iot.roles.msg_server import MAX_ID_LEN, valid_name

ROOT = "fc"
INBOX = "in"
MAX_ACK_IDS = 1000  # ids in one ack envelope
CTL_OPS = frozenset(
    {
        "create_topic",
        "join_topic",
        "leave_topic",
        "hello",
        "bye",
        "ping",
        "public_key",
        "topic_owner",
    }
)
# The uplink topic kinds under fc/{id}/, and the ones that name a target after them.
KINDS_WITH_TARGET = frozenset({"p2p", "topic"})
KINDS = frozenset({"p2p", "topic", "ack", "ctl"})


def prefix(device_id: str) -> str:
    """``fc/{id}/``: everything a device may publish starts with it."""
    return f"{ROOT}/{device_id}/"


def inbox(device_id: str) -> str:
    """``fc/{id}/in``: the one topic a device may subscribe to."""
    return f"{ROOT}/{device_id}/{INBOX}"


class BadEnvelope(Exception):
    """What a device published cannot be used; told on its inbox as an error."""

    def __init__(self, code: str, text: str, ref: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.ref = ref


@dataclass(slots=True)
class Uplink:
    """One decoded device publish. ``kind`` is the topic kind (p2p, topic, ack, ctl);
    ``target`` the recipient or topic name from the topic."""

    kind: str
    target: str
    id: str = ""
    body: str = ""
    enc: str = "none"  # how body is sealed (docs/crypto.md); the server never opens it
    ids: list[str] | None = None  # ack
    op: str = ""  # ctl
    token: str = ""  # ctl hello (external mode)
    session: str = ""  # ctl hello / bye (external mode)


def split_topic(topic: str, device_prefix: str) -> tuple[str, str]:
    """``fc/{id}/p2p/bob`` -> ``("p2p", "bob")``. Raises BadEnvelope for a topic outside
    the device's prefix or of an unknown shape."""
    if not topic.startswith(device_prefix):
        raise BadEnvelope(
            errors.FORBIDDEN,
            f"publish only under {device_prefix} (not {topic[:150]!r})",
            topic[:150],
        )
    kind, sep, target = topic[len(device_prefix) :].partition("/")
    if kind not in KINDS:
        raise BadEnvelope(
            errors.UNKNOWN_COMMAND,
            f"unknown topic {topic[:150]!r}: use {device_prefix}p2p/TO, topic/NAME, ack or ctl",
            topic[:150],
        )
    if kind in KINDS_WITH_TARGET:
        if not sep or not valid_name(target):
            what = "device id" if kind == "p2p" else "topic name"
            raise BadEnvelope(errors.BAD_ARGS, f"invalid {what} {target[:150]!r} in the topic")
    elif sep:
        raise BadEnvelope(
            errors.UNKNOWN_COMMAND, f"unknown topic {topic[:150]!r}: nothing goes after /{kind}"
        )
    return kind, target


def _string(
    doc: dict[str, Any], key: str, ref: str, required: bool = True, max_len: int = 0
) -> str:
    value = doc.get(key)
    if value is None:
        if required:
            raise BadEnvelope(errors.BAD_ARGS, f"the envelope has no {key!r}", ref)
        return ""
    if not isinstance(value, str):
        raise BadEnvelope(errors.BAD_ARGS, f"{key!r} must be a string", ref)
    if max_len and len(value) > max_len:
        raise BadEnvelope(errors.BAD_ARGS, f"{key!r} is longer than {max_len} characters", ref)
    return value


def parse_uplink(kind: str, target: str, payload: bytes, max_payload: int) -> Uplink:
    """Decode the JSON envelope of one publish; BadEnvelope says what is wrong."""
    if len(payload) > max_payload:
        raise BadEnvelope(
            errors.FRAME_TOO_LARGE,
            f"the envelope is {len(payload)} bytes, above the {max_payload} limit",
        )
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadEnvelope(errors.BAD_FRAME, "the payload is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise BadEnvelope(errors.BAD_FRAME, "the payload must be a JSON object")
    if kind in KINDS_WITH_TARGET:
        msg_id = doc.get("id")
        ref = msg_id if isinstance(msg_id, str) else ""
        msg_id = _string(doc, "id", ref, max_len=MAX_ID_LEN)
        if not msg_id:
            raise BadEnvelope(errors.BAD_ARGS, "'id' must not be empty", ref)
        body = _string(doc, "body", ref)
        named = _string(doc, "to" if kind == "p2p" else "topic", ref, required=False)
        if named and named != target:
            raise BadEnvelope(
                errors.BAD_ARGS, f"the envelope names {named!r} but the topic names {target!r}", ref
            )
        declared = doc.get("kind")
        if declared is not None and declared != kind:
            raise BadEnvelope(errors.BAD_ARGS, f"'kind' must be {kind!r} on this topic", ref)
        ts = doc.get("ts")
        if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool)):
            raise BadEnvelope(errors.BAD_ARGS, "'ts' must be a whole number of milliseconds", ref)
        enc = doc.get("enc")
        if enc is None or enc == "none":
            return Uplink(kind, target, id=msg_id, body=body)
        try:
            parse_enc(enc if isinstance(enc, str) else "")
        except CryptoError:
            text = f"'enc' {str(enc)[:40]!r} is not supported"
            raise BadEnvelope(errors.BAD_ARGS, text, ref) from None
        if not body:
            raise BadEnvelope(errors.BAD_ARGS, "empty sealed body", ref)
        return Uplink(kind, target, id=msg_id, body=body, enc=enc)
    if kind == "ack":
        ids = doc.get("ids")
        if not isinstance(ids, list) or not ids:
            raise BadEnvelope(errors.BAD_ARGS, 'an ack is {"ids": ["ID", ...]}')
        if len(ids) > MAX_ACK_IDS:
            raise BadEnvelope(errors.BAD_ARGS, f"at most {MAX_ACK_IDS} ids in one ack")
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_LEN for i in ids):
            raise BadEnvelope(errors.BAD_ARGS, "ack ids must be non-empty strings")
        return Uplink(kind, target, ids=ids)
    # ctl
    op = _string(doc, "op", "")
    if op not in CTL_OPS:
        raise BadEnvelope(
            errors.UNKNOWN_COMMAND,
            f"unknown op {op[:40]!r}: use one of {', '.join(sorted(CTL_OPS))}",
        )
    name = ""
    if op == "public_key":
        name = _string(doc, "device", "")
        if not valid_name(name):
            raise BadEnvelope(errors.BAD_ARGS, f"invalid device id {name[:150]!r}", name[:150])
    elif op.endswith("_topic") or op == "topic_owner":
        name = _string(doc, "topic", "")
        if not valid_name(name):
            raise BadEnvelope(errors.BAD_ARGS, f"invalid topic name {name[:150]!r}", name[:150])
    return Uplink(
        kind,
        name,
        op=op,
        token=_string(doc, "token", "", required=False, max_len=256),
        session=_string(doc, "session", "", required=False, max_len=64),
    )


# -- what the gateway publishes on fc/{id}/in ---------------------------------------------


def delivery(env: Envelope) -> bytes:
    if env.kind == "topic":
        doc: dict[str, Any] = {
            "kind": "topic",
            "id": env.id,
            "from": env.sender,
            "topic": env.topic,
            "ts": env.ts,
            "body": env.body,
            "enc": env.enc,
        }
    else:
        doc = {
            "kind": env.kind,
            "id": env.id,
            "from": env.sender,
            "to": env.to,
            "ts": env.ts,
            "body": env.body,
            "enc": env.enc,
        }
    return orjson.dumps(doc)


def accepted(msg_id: str) -> bytes:
    return orjson.dumps({"kind": "accepted", "id": msg_id})


def error(code: str, text: str, ref: str = "") -> bytes:
    doc = {"kind": "error", "code": code, "text": text}
    if ref:
        doc["ref"] = ref
    return orjson.dumps(doc)


def ok(op: str, topic: str = "", **extra: str) -> bytes:
    doc: dict[str, str] = {"kind": "ok", "op": op}
    if topic:
        doc["topic"] = topic
    doc.update(extra)
    return orjson.dumps(doc)
