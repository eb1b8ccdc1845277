"""``docs/protocol.md`` shows frames as hex dumps; every one is recomputed here from
the command and arguments named above it, so the reference cannot drift from the code
(``<!-- hexdump CMD [args as JSON] -->`` followed by a ```text block)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from device_adapters.tcp.framing import FrameDecoder, encode_frame

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
BLOCK = re.compile(r"<!-- hexdump (\S+) (\[.*?\]) -->\n```text\n(.*?)```", re.S)


def hexdump(data: bytes) -> str:
    """Offset, 16 bytes in hex, printable ASCII (anything else as '.')."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:04x}  {hexes:<47}  {text}")
    return "\n".join(lines) + "\n"


def test_every_hex_dump_in_the_protocol_doc_is_what_the_code_sends() -> None:
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 3, "the hex dump examples are gone from docs/protocol.md"
    for cmd, args_json, shown in blocks:
        args = json.loads(args_json)
        frame = encode_frame(cmd, args)
        assert shown == hexdump(frame), f"docs/protocol.md: the dump of {cmd} {args} is stale"
        # ... and it decodes back to what it claims to be.
        assert FrameDecoder().feed(frame) == [(cmd, args)]
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
