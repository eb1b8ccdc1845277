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


def parse_body(body: bytes | memoryview) -> tuple[str, list[str]]:
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
        fatal: FrameError | None = None
        # Frames are parsed in place through a view (no copy per frame); the view is
        # released before the buffer is resized.
        view = memoryview(buf)
        try:
            while end - pos >= HEADER:
                n = int.from_bytes(view[pos : pos + HEADER], "big")
                if n == 0 or n > max_frame:
                    fatal = FrameError(
                        errors.FRAME_TOO_LARGE if n else errors.BAD_FRAME,
                        f"frame length {n} is above the limit of {max_frame} bytes"
                        if n
                        else "frame length 0",
                        fatal=True,
                    )
                    break
                start = pos + HEADER
                if end - start < n:
                    break
                body = view[start : start + n]
                try:
                    out.append(parse_body(body))
                except FrameError as exc:
                    out.append(exc)  # its traceback may still refer to ``body``
                finally:
                    body.release()
                pos = start + n
        finally:
            view.release()
        if fatal is not None:
            del buf[:]
            out.append(fatal)
        elif pos:
            del buf[:pos]
        return out
