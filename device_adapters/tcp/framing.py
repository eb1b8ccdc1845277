"""FishChat v1 frames: a 4-byte big-endian length, then UTF-8 JSON
``{"CmdName": str, "Args": [str, ...]}`` (the length counts a trailing newline).

The decoder is incremental and parses every complete frame in one ``feed`` call, so a
read with a hundred frames costs one Python call (DESIGN section 9).
"""

from __future__ import annotations

import orjson

from fishchat_iot import errors

HEADER = 4


class FrameError(Exception):
    """A frame that cannot be used. ``fatal`` means the byte stream cannot be resynced
    (bad length prefix) and the connection must close."""

    def __init__(self, code: str, text: str, fatal: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.fatal = fatal


def encode_frame(cmd: str, args: list[str]) -> bytes:
    body = orjson.dumps({"CmdName": cmd, "Args": args}) + b"\n"
    return len(body).to_bytes(4, "big") + body


def append_frame(out: bytearray, cmd: str, args: list[str]) -> None:
    """Append one frame to an output buffer (the hot path builds writes this way)."""
    body = orjson.dumps({"CmdName": cmd, "Args": args})
    out += (len(body) + 1).to_bytes(4, "big")
    out += body
    out += b"\n"


def parse_body(body: bytes) -> tuple[str, list[str]]:
    """Decode one frame body; raises FrameError(BAD_FRAME) with a reason."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = "not UTF-8" if "utf-8" in str(exc).lower() else "invalid JSON"
        raise FrameError(errors.BAD_FRAME, f"frame is {reason}: {exc}") from None
    if type(obj) is not dict:
        raise FrameError(errors.BAD_FRAME, 'frame is not a JSON object {"CmdName", "Args"}')
    cmd = obj.get("CmdName")
    args = obj.get("Args", [])
    if type(cmd) is not str or not cmd:
        raise FrameError(errors.BAD_FRAME, "frame has no CmdName string")
    if args is None:
        args = []
    if type(args) is not list or any(type(a) is not str for a in args):
        raise FrameError(errors.BAD_FRAME, "frame Args must be a list of strings")
    return cmd, args


class FrameDecoder:
    """Accumulates bytes and yields every complete frame.

    ``feed`` returns the frames completed by this call, in order. An error in one frame is
    returned in-line as a FrameError item, so the frames around it still count. A fatal
    error (length prefix 0 or above ``max_frame``) is always the last item: the stream
    cannot be resynchronised and the caller closes the connection.
    """

    __slots__ = ("_buf", "_fatal", "max_frame")

    def __init__(self, max_frame: int = 65536) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._fatal: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[str, list[str]] | FrameError]:
        buf = self._buf
        buf += data
        out: list[tuple[str, list[str]] | FrameError] = []
        pos = 0
        end = len(buf)
        max_frame = self.max_frame
        while end - pos >= HEADER:
            n = int.from_bytes(buf[pos : pos + HEADER], "big")
            if n == 0 or n > max_frame:
                del buf[:]
                err = FrameError(
                    errors.FRAME_TOO_LARGE if n else errors.BAD_FRAME,
                    f"frame length {n} is above the limit of {max_frame} bytes"
                    if n
                    else "frame length 0",
                    fatal=True,
                )
                out.append(err)
                return out
            start = pos + HEADER
            if end - start < n:
                break
            try:
                out.append(parse_body(bytes(buf[start : start + n])))
            except FrameError as exc:
                out.append(exc)
            pos = start + n
        if pos:
            del buf[:pos]
        return out
