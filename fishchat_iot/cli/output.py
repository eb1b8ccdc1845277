"""How the CLI talks back: aligned plain-text tables for people, one JSON document for
scripts (``--json``), and ``CliError`` for the one-line ``error: ...`` messages.

Everything printed from the registry goes through ``cell``: names a device created over
the wire (a v1 ``CREATE_TOPIC``) may hold control characters, which must not reach the
operator's terminal raw.
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

# Exit codes shared by every command (docs/cli.md lists them).
EXIT_OK = 0
EXIT_ERROR = 1  # an operational error: unknown device, unreadable config, store locked ...
EXIT_USAGE = 2  # argparse's own usage errors
EXIT_NOT_RUNNING = 3  # `status`: no server is running (LSB "program is not running")
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An expected failure. ``main`` prints ``error: <message>`` as one line on stderr and
    exits with ``exit_code``. Say what is wrong and what to do about it."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(text.split())


def print_error(message: str, stream: TextIO | None = None) -> None:
    """Print ``error: <message>`` as exactly one line."""
    out = stream if stream is not None else sys.stderr
    out.write(f"error: {one_line(message)}\n")
    out.flush()


def print_json(obj: Any) -> None:
    """One JSON document on one line (easy for ``jq`` and for line-oriented scripts)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n")


def cell(value: object) -> str:
    """A value as table text: booleans as yes/no, None as "-", non-printable characters
    escaped (``\\n``, ``\\x1b`` ...) so they cannot break the layout or drive the terminal."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


def quoted(value: str) -> str:
    """A name from the command line or the registry, quoted for a message: ``'lamp-1'``."""
    return f"'{cell(value)}'"


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide CJK characters count 2, combining marks 0."""
    width = 0
    for c in text:
        if unicodedata.combining(c):
            continue
        width += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return width


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    right: Collection[int] = (),
) -> str:
    """Columns separated by two spaces, padded to the widest cell; the columns whose
    index is in ``right`` (numbers) are right-aligned. No trailing spaces."""
    text_rows = [[cell(v) for v in row] for row in rows]
    all_rows = [list(headers), *text_rows]
    widths = [max(display_width(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = []
    for row in all_rows:
        parts = []
        for i, text in enumerate(row):
            pad = " " * (widths[i] - display_width(text))
            parts.append(pad + text if i in right else text + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    right: Collection[int] = (),
) -> None:
    print(format_table(headers, rows, right))


def print_fields(fields: Sequence[tuple[str, object]]) -> None:
    """``key: value`` lines with the values aligned (the ``show`` commands)."""
    width = max((len(k) for k, _ in fields), default=0)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {cell(value)}".rstrip())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def format_ms(ms: int) -> str:
    """A wall-clock time in ms as ``YYYY-MM-DD HH:MM:SS`` UTC; 0 (never) as ``-``."""
    if ms <= 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_age(ms: int) -> str:
    """A duration in ms as ``4s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    seconds = max(ms, 0) // 1000
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
