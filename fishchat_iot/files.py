"""Files the roles and the CLI write for each other (operators, certificates, the
Mosquitto password file, status snapshots): written atomically, so a reader sees the
old whole file or the new whole file and never part of one, with their mode from the
first byte (a secret is never readable by others, not even for a moment).

``create_once`` is the other rule: a file made only when it is missing, never over one,
by whichever of several racing processes comes first (the server key)."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def write_atomic(path: Path, data: str | bytes, mode: int = PRIVATE, sync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory that is
    renamed over it. The temporary's name is unique to the call, so writers in other
    processes or threads never share one. ``sync``: on disk before the rename, and the
    rename on disk after it (keys, certificates, operators; not the status snapshots
    rewritten every second)."""
    tmp = _write_temporary(path, data, mode, sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        sync_dir(path.parent)


def create_once(path: Path, data: str | bytes, mode: int = PRIVATE) -> bool:
    """Create ``path`` holding ``data`` unless it exists, never over it; False when it
    did. Written and synced in a temporary file that is then hard-linked into place (a
    link never replaces a file), so processes racing to create it all end up reading
    the one that won, whole: none sees it half-written. Durable before returning."""
    tmp = _write_temporary(path, data, mode, sync=True)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(path.parent)
    return True


def _write_temporary(path: Path, data: str | bytes, mode: int, sync: bool) -> Path:
    """A new file next to ``path``, named for this call only, holding ``data`` with
    ``mode`` from the first byte whatever the umask; removed again if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def sync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable: without it a crash can leave the
    directory entry behind although the file's bytes were synced."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
