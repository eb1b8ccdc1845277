"""COBS, the CRCs and the serial frame decoder, byte by byte."""

from __future__ import annotations

import random
import re
from pathlib import Path

import orjson
import pytest

from device_adapters.serial import cobs
from device_adapters.serial.crc import CRC16, CRC32, crc16, crc32, get_crc
from device_adapters.serial.framing import (
    NACK_BAD_FRAME,
    NACK_COBS,
    NACK_CRC,
    NACK_SHORT,
    NACK_TOO_LARGE,
    SerialDecoder,
    SerialFrame,
    SerialFrameError,
    encode_body,
    encode_frame,
    max_encoded_len,
    tcp_bodies,
)

ROOT = Path(__file__).resolve().parents[2]


# -- CRC ---------------------------------------------------------------------------------
def test_crc_check_values() -> None:
    assert crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE
    assert crc32(b"123456789") == 0xCBF43926  # CRC-32 (ISO-HDLC, zlib)
    assert crc16(b"") == 0xFFFF
    assert crc32(b"") == 0
    assert CRC16.trailer(b"123456789") == b"\x29\xb1"  # big-endian on the wire
    assert CRC32.trailer(b"123456789") == b"\xcb\xf4\x39\x26"


def test_crc_by_name() -> None:
    assert get_crc("crc16") is CRC16
    assert get_crc(" CRC32 ") is CRC32
    with pytest.raises(ValueError, match="unknown CRC 'crc8'"):
        get_crc("crc8")


def _crc16_bitwise(data: bytes) -> int:
    """The textbook definition, to check the table-driven one."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def test_crc16_matches_the_bitwise_definition() -> None:
    rng = random.Random(7)
    for n in (1, 2, 31, 254, 1000):
        data = rng.randbytes(n)
        assert crc16(data) == _crc16_bitwise(data)


# -- COBS ---------------------------------------------------------------------------------
RUN_254 = bytes(range(1, 255))  # 01 .. FE: 254 non-zero bytes
VECTORS = [
    # (decoded, encoded): the examples of the COBS paper / Wikipedia
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (RUN_254, b"\xff" + RUN_254),
    (b"\x00" + RUN_254, b"\x01\xff" + RUN_254),
    (bytes(range(1, 256)), b"\xff" + RUN_254 + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("plain", "encoded"), VECTORS)
def test_cobs_vectors(plain: bytes, encoded: bytes) -> None:
    assert cobs.encode(plain) == encoded
    assert cobs.decode(encoded) == plain


def test_cobs_decodes_the_long_form_of_a_final_full_block() -> None:
    # Some encoders end a final 254-byte block with an extra 01 block: the same data.
    assert cobs.decode(b"\xff" + RUN_254 + b"\x01") == RUN_254


@pytest.mark.parametrize("n", [253, 254, 255, 508, 509, 1000])
def test_cobs_long_runs_and_zeros(n: int) -> None:
    rng = random.Random(n)
    for data in (
        bytes([0x41]) * n,  # no zero at all: one code byte per 254
        bytes(n),  # only zeros
        bytes(rng.choice((0, 0, 1, 2, 255)) for _ in range(n)),
        bytes([0x41]) * n + b"\x00",
        b"\x00" + bytes([0x41]) * n,
    ):
        enc = cobs.encode(data)
        assert 0 not in enc
        assert len(enc) <= cobs.max_encoded_len(len(data))
        assert cobs.decode(enc) == data


def test_cobs_random_round_trips() -> None:
    rng = random.Random(1)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 800))
        assert cobs.decode(cobs.encode(data)) == data


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"\x05\x11\x22", "needs 4 bytes, 2 left"),
        (b"\x02\x11\x00\x01", "0x00 byte inside"),
        (b"\xff\x01", "needs 254 bytes"),
    ],
)
def test_cobs_rejects_invalid_input(bad: bytes, message: str) -> None:
    with pytest.raises(cobs.CobsError, match=message):
        cobs.decode(bad)


# -- frames -------------------------------------------------------------------------------
def _frames(items: list[SerialFrame | SerialFrameError]) -> list[tuple[str, list[str]]]:
    return [(i.cmd, i.args) for i in items if isinstance(i, SerialFrame)]


def _errors(items: list[SerialFrame | SerialFrameError]) -> list[str]:
    return [i.reason for i in items if isinstance(i, SerialFrameError)]


@pytest.mark.parametrize("crc", [CRC16, CRC32])
def test_frame_round_trip(crc: object) -> None:
    crc = get_crc(crc)  # type: ignore[arg-type]
    dec = SerialDecoder(crc)
    frame = encode_frame("SEND_MESSAGE_P2P", ["bob", "héllo\x00 world", "alice", "id-1"], crc)
    assert frame.endswith(b"\x00") and 0 not in frame[:-1]
    items = dec.feed(frame)
    assert items == [
        SerialFrame(
            "SEND_MESSAGE_P2P",
            ["bob", "héllo\x00 world", "alice", "id-1"],
            orjson.dumps(
                {"CmdName": "SEND_MESSAGE_P2P", "Args": ["bob", "héllo\x00 world", "alice", "id-1"]}
            ),
        )
    ]


def test_decoder_is_incremental_byte_by_byte() -> None:
    dec = SerialDecoder()
    stream = b"".join(encode_frame("SEND_PING", [str(i)]) for i in range(5))
    got: list[SerialFrame | SerialFrameError] = []
    for b in stream:
        got += dec.feed(bytes([b]))
    assert _frames(got) == [("SEND_PING", [str(i)]) for i in range(5)]
    assert dec.buffered == 0


def test_many_frames_in_one_feed_and_empty_frames_ignored() -> None:
    dec = SerialDecoder()
    stream = b"\x00\x00" + encode_frame("A", []) + b"\x00" + encode_frame("B", ["x"]) + b"\x00"
    assert _frames(dec.feed(stream)) == [("A", []), ("B", ["x"])]


def test_a_body_with_a_trailing_newline_is_accepted() -> None:
    body = b'{"CmdName":"SEND_PING","Args":["PING"]}\n'
    assert _frames(SerialDecoder().feed(encode_body(body))) == [("SEND_PING", ["PING"])]


def test_bit_flip_truncation_and_garbage_are_dropped_around_good_frames() -> None:
    dec = SerialDecoder()
    good1 = encode_frame("SEND_PING", ["1"])
    good2 = encode_frame("SEND_PING", ["2"])
    flipped = bytearray(encode_frame("SEND_PING", ["flip"]))
    flipped[5] ^= 0x04  # one bit, inside the body
    truncated = encode_frame("SEND_PING", ["cut"])[:-6] + b"\x00"
    garbage = bytes([0x13, 0x37, 0xC0, 0xFF, 0xEE, 0x00])
    items = dec.feed(good1 + bytes(flipped) + truncated + garbage + good2)
    assert _frames(items) == [("SEND_PING", ["1"]), ("SEND_PING", ["2"])]
    errs = _errors(items)
    assert len(errs) == 3
    assert errs[0] == NACK_CRC
    assert errs[1] in (NACK_CRC, NACK_COBS)
    assert errs[2] in (NACK_CRC, NACK_COBS, NACK_SHORT)


def test_cobs_error_and_short_frame() -> None:
    dec = SerialDecoder()
    assert _errors(dec.feed(b"\x09\x41\x41\x00")) == [NACK_COBS]  # block runs past the end
    assert _errors(dec.feed(cobs.encode(b"\x12") + b"\x00")) == [NACK_SHORT]
    assert _errors(dec.feed(cobs.encode(b"\x12\x34") + b"\x00")) == [NACK_SHORT]  # CRC only


def test_valid_crc_but_not_a_command_frame() -> None:
    dec = SerialDecoder()
    for body in (b"not json", b"[1,2]", b'{"CmdName":"X","Args":[1]}', b"\xff\xfe"):
        items = dec.feed(encode_body(body))
        assert _errors(items) == [NACK_BAD_FRAME], body
    raw = SerialDecoder(parse=False).feed(encode_body(b"not json"))
    assert raw == [SerialFrame("", [], b"not json")]


def test_oversize_complete_frame() -> None:
    dec = SerialDecoder(max_frame=100)
    big = encode_frame("SEND_PING", ["x" * 200])
    ok = encode_frame("SEND_PING", ["y" * 50])
    items = dec.feed(big + ok)
    assert _errors(items) == [NACK_TOO_LARGE]
    assert _frames(items) == [("SEND_PING", ["y" * 50])]


def test_body_at_the_limit_is_accepted_one_above_is_not() -> None:
    for crc in (CRC16, CRC32):
        dec = SerialDecoder(crc, max_frame=300)
        head = b'{"CmdName":"P","Args":["'
        fill = 300 - len(head) - 3
        body = head + b"a" * fill + b'"]}'
        assert len(body) == 300
        assert _frames(dec.feed(encode_body(body, crc))) == [("P", ["a" * fill])]
        body = head + b"a" * (fill + 1) + b'"]}'
        assert _errors(dec.feed(encode_body(body, crc))) == [NACK_TOO_LARGE]


def test_endless_frame_is_reported_once_and_skipped_with_bounded_memory() -> None:
    dec = SerialDecoder(max_frame=100)
    limit = max_encoded_len(100)
    items = []
    for _ in range(50):  # 5000 bytes of noise without a delimiter
        items += dec.feed(bytes([0x55]) * 100)
        assert dec.buffered <= limit
    assert _errors(items) == [NACK_TOO_LARGE]
    # The next delimiter ends it; the frame after that is fine.
    items = dec.feed(b"\x55\x00" + encode_frame("SEND_PING", ["after"]))
    assert _errors(items) == []
    assert _frames(items) == [("SEND_PING", ["after"])]


def test_tcp_bodies() -> None:
    data = b"\x00\x00\x00\x02{}" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01x"
    assert tcp_bodies(data) == [b"{}", b"", b"x"]
    with pytest.raises(ValueError):
        tcp_bodies(b"\x00\x00\x00\x05abc")


# -- the worked example in docs/serial.md is what the code produces ----------------------
def _hex_block(doc: str, label: str) -> bytes:
    """The bytes of a hexdump block (``0000  7b 22 ...  {"...``) after ``<!-- label -->``."""
    m = re.search(rf"<!-- {label} -->\s*```text\n(.*?)```", doc, re.S)
    assert m, f"no {label} block in docs/serial.md"
    out = b""
    for line in m.group(1).splitlines():
        out += bytes.fromhex(line[6 : 6 + 47])
    return out


def test_worked_example_in_the_docs() -> None:
    doc = (ROOT / "docs" / "serial.md").read_text()
    body = b'{"CmdName":"SEND_PING","Args":["PING"]}'
    assert _hex_block(doc, "example-body") == body
    assert _hex_block(doc, "example-crc16") == body + CRC16.trailer(body)
    assert _hex_block(doc, "example-frame-crc16") == encode_body(body, CRC16)
    assert _hex_block(doc, "example-frame-crc32") == encode_body(body, CRC32)
    m = re.search(r"<!-- example-stuffing -->\s*```text\n(.*?)```", doc, re.S)
    assert m
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    login_body = lines[0].split("body: ", 1)[1].encode()
    want = bytes.fromhex(lines[-1].split(":", 1)[1].replace(" ", ""))
    assert encode_body(login_body, CRC16) == want
    assert lines[1].split(":", 1)[1].split() == [f"{b:02x}" for b in CRC16.trailer(login_body)]
    # The CRC values quoted in the text.
    assert f"**0x{crc16(body):04X}**" in doc and f"**0x{crc32(body):08X}**" in doc
    assert f"**0x{crc16(login_body):04X}**" in doc
    assert 0 in CRC16.trailer(login_body)  # the example shows a zero being stuffed
