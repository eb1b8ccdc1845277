"""The two CRCs a serial port can use, both from the standard library's C code.

- ``crc16``: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, not reflected, no final
  xor); check value ``crc16(b"123456789") == 0x29B1``. ``binascii.crc_hqx`` is this CRC
  when it starts from 0xFFFF.
- ``crc32``: CRC-32 (ISO-HDLC: poly 0x04C11DB7 reflected, init and final xor
  0xFFFFFFFF, as zlib, Ethernet and PNG); check value ``0xCBF43926``.

On the wire the CRC follows the body big-endian (most significant byte first).
"""

from __future__ import annotations

import binascii
import zlib
from collections.abc import Callable
from dataclasses import dataclass


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/CCITT-FALSE of ``data``."""
    return binascii.crc_hqx(data, 0xFFFF)


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 (zlib's) of ``data``."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Crc:
    """A CRC as a port uses it: its config name, its size on the wire, the function."""

    name: str
    size: int  # bytes on the wire
    compute: Callable[[bytes | bytearray | memoryview], int]

    def trailer(self, body: bytes | bytearray | memoryview) -> bytes:
        """The CRC bytes that follow ``body`` on the wire (big-endian)."""
        return self.compute(body).to_bytes(self.size, "big")


CRC16 = Crc("crc16", 2, crc16)
CRC32 = Crc("crc32", 4, crc32)
CRCS = {c.name: c for c in (CRC16, CRC32)}


def get_crc(name: str | Crc) -> Crc:
    """The CRC named ``name`` (``"crc16"`` or ``"crc32"``); ValueError otherwise."""
    if isinstance(name, Crc):
        return name
    crc = CRCS.get(name.strip().lower())
    if crc is None:
        raise ValueError(f"unknown CRC {name!r}: use one of {', '.join(CRCS)}")
    return crc
