"""Files the roles and the CLI write for each other (operators, certificates, the
Mosquitto password file, status snapshots): written atomically, so a reader sees the
old whole file or the new whole file and never part of one, with their mode from the
first byte (a secret is never readable by others, not even for a moment).

Creating a file only when it is missing, never over one (the server key, device
bundles), is a different rule: see ``crypto/atrest.py`` and ``bundle.py``."""

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # the mode asked for, whatever the umask
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable: without it a crash can leave the
    directory entry behind although the file's bytes were synced."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
