"""Consistent Overhead Byte Stuffing (Cheshire and Baker, 1999): the encoded data has no
0x00 byte, so 0x00 can delimit frames on a byte stream that may lose or corrupt bytes.

The encoding is a sequence of blocks ``code, data[code - 1]``: each block stands for
``code - 1`` non-zero bytes followed by a 0x00, except that the 0x00 is left out after a
block of code 0xFF (254 data bytes) and after the last block. Overhead: one byte per 254
bytes, at least one.

``encode`` writes the shortest form: when the data ends right after a full 254-byte
block it ends there (no extra ``01`` block). ``decode`` accepts that form and the
longer one (an ``01`` block at the end), as every standard decoder does.
"""

from __future__ import annotations


class CobsError(ValueError):
    """Input that is not a valid COBS encoding."""


def max_encoded_len(n: int) -> int:
    """The longest encoding of ``n`` bytes (without the frame delimiter)."""
    return n + n // 254 + 1


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """COBS-encode ``data`` (the result has no 0x00 byte; the delimiter is not added)."""
    out = bytearray()
    pieces = bytes(data).split(b"\x00")  # k zeros -> k + 1 pieces
    last = len(pieces) - 1
    for k, piece in enumerate(pieces):
        size = len(piece)
        pos = 0
        while size - pos >= 254:
            out.append(0xFF)
            out += piece[pos : pos + 254]
            pos += 254
        rest = size - pos
        if k == last and rest == 0 and size > 0:
            break  # the data ended right after a full block: no final "01"
        out.append(rest + 1)
        out += piece[pos:]
    return bytes(out)


def decode(data: bytes | bytearray | memoryview) -> bytes:
    """Decode one COBS frame (without its delimiter); CobsError if it is not valid."""
    data = bytes(data)
    if b"\x00" in data:
        raise CobsError("a 0x00 byte inside the frame")
    out = bytearray()
    n = len(data)
    i = 0
    while i < n:
        code = data[i]
        end = i + code
        if end > n:
            raise CobsError(f"block at offset {i} needs {code - 1} bytes, {n - i - 1} left")
        out += data[i + 1 : end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)
