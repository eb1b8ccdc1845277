"""Serial frames (``docs/serial.md``): ``COBS(body || CRC) 0x00``.

``body`` is the JSON command frame of the TCP protocol, ``{"CmdName": str, "Args":
[str, ...]}`` (UTF-8, no length prefix: the 0x00 delimiter ends the frame; one trailing
newline is tolerated). The CRC (CRC-16/CCITT-FALSE by default, CRC-32 if the port says
so) covers the body and follows it big-endian. An empty frame (two delimiters in a row)
is ignored: a sender may write a 0x00 first to end whatever noise came before.

``SerialDecoder`` is incremental: ``feed`` returns every frame completed by the bytes
given, each either a :class:`SerialFrame` or a :class:`SerialFrameError` in its place,
so the good frames around a bad one still count. Nothing is fatal: after an error the
decoder is in sync again at the next delimiter, and an endless frame is reported once
and skipped up to its delimiter, with at most ``max_encoded_len(max_frame)`` bytes
buffered.

Two frames are specific to the serial adapter (adapter → device):

- ``NACK [reason, text]``: the adapter dropped a frame it could not use; ``reason`` is
  one of ``CRC``, ``COBS``, ``SHORT``, ``TOO_LARGE``, ``BAD_FRAME``, ``BUSY``.
- ``UPSTREAM_LOST [code, text]``: the device has no msg_server session (any more);
  ``code`` is ``CLOSED``, ``PORT_OPENED``, ``NOT_LOGGED_IN`` or ``ADAPTER_STOPPING``.
  The device logs in again (``SEND_CLIENT_ID``) to get a new one.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from device_adapters.serial import cobs
from device_adapters.serial.crc import CRC16, Crc, get_crc
from device_adapters.tcp.framing import FrameError, parse_body

DELIMITER = b"\x00"

# Adapter -> device frames (docs/serial.md).
NACK = "NACK"
UPSTREAM_LOST = "UPSTREAM_LOST"

# NACK reasons.
NACK_CRC = "CRC"  # the CRC does not match the body
NACK_COBS = "COBS"  # not a valid COBS encoding (a block runs past the delimiter)
NACK_SHORT = "SHORT"  # no body: the frame is not longer than its CRC
NACK_TOO_LARGE = "TOO_LARGE"  # the body is above max_frame (or no delimiter came in time)
NACK_BAD_FRAME = "BAD_FRAME"  # CRC fine, but not a JSON command frame
NACK_BUSY = "BUSY"  # the adapter could not take the frame now (upstream backed up)

# UPSTREAM_LOST codes.
LOST_CLOSED = "CLOSED"  # the msg_server connection ended (server gone, logout, replaced ...)
LOST_PORT_OPENED = "PORT_OPENED"  # the adapter (re)opened the port: no session yet
LOST_NOT_LOGGED_IN = "NOT_LOGGED_IN"  # a command arrived with no session: log in first
LOST_STOPPING = "ADAPTER_STOPPING"  # the adapter is shutting down

# Frame damage that counts as "corrupt" (the others are "oversize" and "bad").
CORRUPT_REASONS = frozenset({NACK_CRC, NACK_COBS, NACK_SHORT})


class SerialFrame(NamedTuple):
    cmd: str
    args: list[str]
    body: bytes  # the JSON body as received (without the CRC)


class SerialFrameError(Exception):
    """A dropped frame: ``reason`` is the NACK reason, ``size`` its encoded length."""

    def __init__(self, reason: str, text: str, size: int = 0) -> None:
        super().__init__(f"{reason}: {text}")
        self.reason = reason
        self.text = text
        self.size = size


def encode_body(body: bytes | bytearray, crc: Crc = CRC16) -> bytes:
    """One serial frame for a body: ``COBS(body || CRC) 0x00``."""
    return cobs.encode(bytes(body) + crc.trailer(body)) + DELIMITER


def encode_frame(cmd: str, args: list[str], crc: Crc = CRC16) -> bytes:
    """One serial frame for a command (the body is compact JSON, no newline)."""
    return encode_body(orjson.dumps({"CmdName": cmd, "Args": args}), crc)


def max_encoded_len(max_frame: int, crc: Crc = CRC16) -> int:
    """The longest encoded frame (without its delimiter) for a body of ``max_frame``."""
    return cobs.max_encoded_len(max_frame + crc.size)


def tcp_bodies(data: bytes | bytearray) -> list[bytes]:
    """The bodies of the whole TCP frames (4-byte big-endian length + body) in ``data``;
    ValueError if ``data`` is not a sequence of whole frames."""
    out = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise ValueError("a partial TCP frame header")
        n = int.from_bytes(data[pos : pos + 4], "big")
        start = pos + 4
        if start + n > end:
            raise ValueError("a partial TCP frame")
        out.append(bytes(data[start : start + n]))
        pos = start + n
    return out


class SerialDecoder:
    """Accumulates bytes and returns every complete frame; see the module docstring.

    With ``parse=False`` the body is not checked as JSON (``cmd`` is ``""`` and
    ``args`` empty): for tools that only need the CRC-checked bytes."""

    __slots__ = ("_buf", "_discarding", "_max_encoded", "crc", "max_frame", "parse")

    def __init__(self, crc: Crc | str = CRC16, max_frame: int = 65536, parse: bool = True) -> None:
        self.crc = get_crc(crc)
        self.max_frame = max_frame
        self.parse = parse
        self._max_encoded = max_encoded_len(max_frame, self.crc)
        self._buf = bytearray()
        self._discarding = False  # inside a frame already reported TOO_LARGE

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[SerialFrame | SerialFrameError]:
        buf = self._buf
        buf += data
        out: list[SerialFrame | SerialFrameError] = []
        start = 0
        while True:
            i = buf.find(0, start)
            if i < 0:
                break
            size = i - start
            if self._discarding:
                self._discarding = False  # the end of the oversize frame
            elif size:
                out.append(self._decode(buf, start, i))
            start = i + 1
        if start:
            del buf[:start]
        if len(buf) > self._max_encoded:
            # No delimiter within the longest valid frame: report it once, then skip
            # everything up to the next delimiter without keeping it.
            if not self._discarding:
                out.append(
                    SerialFrameError(
                        NACK_TOO_LARGE,
                        f"no frame delimiter within {self._max_encoded} bytes "
                        f"(max_frame {self.max_frame})",
                        len(buf),
                    )
                )
                self._discarding = True
            buf.clear()
        return out

    def _decode(self, buf: bytearray, start: int, end: int) -> SerialFrame | SerialFrameError:
        size = end - start
        if size > self._max_encoded:
            return SerialFrameError(
                NACK_TOO_LARGE,
                f"frame of {size} encoded bytes is above the limit (max_frame {self.max_frame})",
                size,
            )
        try:
            raw = cobs.decode(buf[start:end])
        except cobs.CobsError as exc:
            return SerialFrameError(NACK_COBS, f"invalid COBS: {exc}", size)
        crc = self.crc
        if len(raw) <= crc.size:
            return SerialFrameError(
                NACK_SHORT, f"frame of {len(raw)} bytes has no body before its CRC", size
            )
        body = raw[: -crc.size]
        got = int.from_bytes(raw[-crc.size :], "big")
        want = crc.compute(body)
        if got != want:
            width = 2 * crc.size
            return SerialFrameError(
                NACK_CRC,
                f"{crc.name} mismatch: frame has {got:0{width}X}, body gives {want:0{width}X}",
                size,
            )
        if len(body) > self.max_frame:
            return SerialFrameError(
                NACK_TOO_LARGE,
                f"body of {len(body)} bytes is above max_frame {self.max_frame}",
                size,
            )
        if not self.parse:
            return SerialFrame("", [], body)
        try:
            cmd, args = parse_body(body)
        except FrameError as exc:
            return SerialFrameError(NACK_BAD_FRAME, exc.text, size)
        return SerialFrame(cmd, args, body)
