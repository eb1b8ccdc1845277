"""FishChat v1 frames: a 4-byte big-endian length, then UTF-8 JSON
``{"CmdName": str, "Args": [str, ...]}`` (the length counts a trailing newline).

The decoder is incremental and parses every complete frame in one ``feed`` call, so a
read with a hundred frames costs one Python call (DESIGN section 9).
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from fishchat_iot import errors

HEADER = 4
_length = struct.Struct(">I").unpack_from
_loads = orjson.loads


class FrameError(Exception):
    """A frame that cannot be used. ``fatal`` means the byte stream cannot be resynced
    (bad length prefix) and the connection must close."""

    def __init__(self, code: str, text: str, fatal: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.fatal = fatal


# Each command's bytes up to its Args, encoded once: a frame is then this prefix, the
# args list and "}" — the same bytes orjson gives for the whole object, without building
# a dict per frame.
_PREFIXES: dict[str, bytes] = {}


def _prefix(cmd: str) -> bytes:
    prefix = _PREFIXES.get(cmd)
    if prefix is None:
        prefix = b'{"CmdName":' + orjson.dumps(cmd) + b',"Args":'
        if len(_PREFIXES) < 256:  # commands the server sends: a handful
            _PREFIXES[cmd] = prefix
    return prefix


def encode_frame(cmd: str, args: list[str]) -> bytes:
    body = _prefix(cmd) + orjson.dumps(args) + b"}\n"
    return len(body).to_bytes(4, "big") + body


def append_frame(out: bytearray, cmd: str, args: list[str]) -> None:
    """Append one frame to an output buffer (the hot path builds writes this way)."""
    prefix = _prefix(cmd)
    argv = orjson.dumps(args)
    out += (len(prefix) + len(argv) + 2).to_bytes(4, "big")
    out += prefix
    out += argv
    out += b"}\n"


def parse_body(body: bytes | bytearray | memoryview) -> tuple[str, list[str]]:
    """Decode one frame body; raises FrameError(BAD_FRAME) with a reason."""
    try:
        obj = _loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad_json(exc) from None
    return _checked(obj)


def _bad_json(exc: orjson.JSONDecodeError) -> FrameError:
    reason = "not UTF-8" if "utf-8" in str(exc).lower() else "invalid JSON"
    return FrameError(errors.BAD_FRAME, f"frame is {reason}: {exc}")


def _checked(obj: Any) -> tuple[str, list[str]]:
    """``(CmdName, Args)`` of a decoded frame, or FrameError(BAD_FRAME) saying why not."""
    if type(obj) is not dict:
        raise FrameError(errors.BAD_FRAME, 'frame is not a JSON object {"CmdName", "Args"}')
    cmd = obj.get("CmdName")
    args = obj.get("Args", [])
    if type(cmd) is not str or not cmd:
        raise FrameError(errors.BAD_FRAME, "frame has no CmdName string")
    if args is None:
        args = []
    if type(args) is not list:
        raise FrameError(errors.BAD_FRAME, "frame Args must be a list of strings")
    for a in args:
        if type(a) is not str:
            raise FrameError(errors.BAD_FRAME, "frame Args must be a list of strings")
    return cmd, args


Item = tuple[str, list[str]] | FrameError


def decode(
    buf: bytearray | None, data: bytes | bytearray, max_frame: int
) -> tuple[list[Item], bytearray | None]:
    """Every complete frame of ``buf`` (the previous reads' incomplete tail, or None)
    followed by ``data``, and the new tail (None when nothing is left over). What
    ``FrameDecoder.feed`` does, for a caller that keeps the tail itself (a TCP session:
    one object less per connection)."""
    src: bytes | bytearray
    if buf is None:
        src = data
    else:
        buf += data
        src = buf
    out: list[Item] = []
    append = out.append
    loads = _loads
    pos = 0
    end = len(src)
    # Per frame: the length, one orjson call on a slice of the read, and the checks
    # of _checked inlined for the usual case (its messages for the others).
    while end - pos >= HEADER:
        n = _length(src, pos)[0]
        if n == 0 or n > max_frame:
            append(
                FrameError(
                    errors.FRAME_TOO_LARGE if n else errors.BAD_FRAME,
                    f"frame length {n} is above the limit of {max_frame} bytes"
                    if n
                    else "frame length 0",
                    fatal=True,
                )
            )
            return out, None
        start = pos + HEADER
        pos = start + n
        if pos > end:
            pos = start - HEADER
            break
        try:
            obj = loads(src[start:pos])
        except orjson.JSONDecodeError as exc:
            append(_bad_json(exc))
            continue
        if type(obj) is dict:
            cmd = obj.get("CmdName")
            args = obj.get("Args")
            if type(cmd) is str and cmd and type(args) is list:
                for a in args:
                    if type(a) is not str:
                        break
                else:
                    append((cmd, args))
                    continue
        try:
            append(_checked(obj))
        except FrameError as err:
            append(err)
    if pos == end:
        return out, None
    if src is data:
        return out, bytearray(data[pos:])
    if pos and buf is not None:
        del buf[:pos]
    return out, buf


class FrameDecoder:
    """Accumulates bytes and yields every complete frame.

    ``feed`` returns the frames completed by this call, in order. An error in one frame is
    returned in-line as a FrameError item, so the frames around it still count. A fatal
    error (length prefix 0 or above ``max_frame``) is always the last item: the stream
    cannot be resynchronised and the caller closes the connection.

    Only the incomplete tail of a read is kept between calls: an idle connection holds
    no buffer, and a read of whole frames is parsed without being copied first.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = 65536) -> None:
        self.max_frame = max_frame
        self._buf: bytearray | None = None  # a frame's first part, until the rest comes

    @property
    def buffered(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[Item]:
        out, self._buf = decode(self._buf, data, self.max_frame)
        return out
