"""From the global options to what a command works with: ``Settings`` (defaults <
``--config`` file < ``FISHCHAT_*`` environment < ``--data-dir``) and an open store,
with every expected failure on the way turned into a one-line ``CliError``.

Command functions are synchronous; ``run_with_store`` runs one coroutine against an
open store with ``asyncio.run`` and always closes the store afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fishchat_iot.backends import describe_store, make_store
from fishchat_iot.cli.output import CliError
from fishchat_iot.config import ConfigError, Settings, load_settings
from fishchat_iot.stores.base import Store, StoreUnavailable

T = TypeVar("T")

DATA_DIR_HINT = "choose another directory with --data-dir (or FISHCHAT_DATA_DIR)"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for this invocation. ``--data-dir`` wins over the environment and the
    config file; without it they decide (default ``./data``)."""
    data_dir: str | None = getattr(args, "data_dir", None)
    if data_dir is not None and not data_dir.strip():
        raise CliError("--data-dir is empty: give a directory, e.g. --data-dir ./data")
    try:
        return load_settings(getattr(args, "config", None), overrides={"node.data_dir": data_dir})
    except ConfigError as exc:
        message = str(exc)
        if any(s in message for s in ("invalid TOML", "invalid JSON", "not UTF-8")):
            message += ": fix the file (docs/configuration.md) or pass another --config"
        raise CliError(message) from None


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileExistsError | NotADirectoryError):
        return "a part of the path is a file, not a directory"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return (exc.strerror or str(exc)).lower()


def make_dir(path: Path, what: str, hint: str, mode: int = 0o777) -> None:
    """Create ``path`` and its parents, or raise a one-line CliError naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:
        raise CliError(
            f"cannot create {what} {path}: it exists and is not a directory: {hint}"
        ) from None
    except OSError as exc:
        raise CliError(f"cannot create {what} {path}: {_os_reason(exc)}: {hint}") from None


def ensure_data_dir(settings: Settings) -> None:
    """Create the data directory and the SQLite file's directory if they are missing."""
    make_dir(settings.data_dir, "data directory", DATA_DIR_HINT)
    make_dir(settings.sqlite_path.parent, "store directory", DATA_DIR_HINT)


def store_exists(settings: Settings) -> bool:
    """A MongoDB store always "exists": it is created on first use."""
    return settings.store.backend != "sqlite" or settings.sqlite_path.is_file()


def no_store_error(settings: Settings) -> CliError:
    return CliError(
        f"no store at {settings.sqlite_path}: nothing is registered there yet; check --data-dir "
        "(or FISHCHAT_DATA_DIR), or register a device first with 'fishchat-iot device register ID'"
    )


def store_error(settings: Settings, exc: BaseException) -> CliError | None:
    """The one-line error for a failure of the store itself, or None if ``exc`` is not one.
    The SQLite store wraps SQLite's errors in StoreUnavailable; the cause says more."""
    if settings.store.backend == "mongodb":
        if isinstance(exc, StoreUnavailable):
            return CliError(
                f"the store ({describe_store(settings)}) is unavailable ({exc}): check that "
                "MongoDB runs and store.mongo_url, then retry"
            )
        return None
    path = settings.sqlite_path
    cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
    if isinstance(cause, sqlite3.OperationalError):
        text = str(cause)
        if "locked" in text or "busy" in text:
            return CliError(
                f"the store {path} is locked by another process: retry in a moment, or stop "
                "the process that holds it (another fishchat-iot command or a stuck server)"
            )
        if "upgrade" in text:  # the file was written by a newer fishchat-iot
            return CliError(f"cannot use the store {path}: {text}")
        if "unable to open" in text or "readonly" in text or "disk I/O" in text:
            return CliError(
                f"cannot open the store {path}: {text}: check that its directory is writable, "
                f"or {DATA_DIR_HINT}"
            )
        return CliError(f"the store {path} failed: {text}: retry, or check the disk")
    if isinstance(cause, sqlite3.DatabaseError):
        return CliError(
            f"{path} is not a usable FishChat store ({cause}): {DATA_DIR_HINT}, "
            "or restore the file from a backup"
        )
    if isinstance(cause, OSError):
        return CliError(f"cannot open the store {path}: {_os_reason(cause)}: {DATA_DIR_HINT}")
    if isinstance(exc, StoreUnavailable):
        detail = f" ({one})" if (one := str(exc)) else ""
        return CliError(f"the store {path} is busy or unavailable{detail}: retry in a moment")
    return None


def new_store(settings: Settings) -> Store:
    """The store these settings name (``store.backend``)."""
    return make_store(settings)


async def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    store = new_store(settings)
    try:
        try:
            await store.open()
            result = await work(store)
        except BaseException:
            # The first failure is the one to report; a close failure after it is noise.
            with contextlib.suppress(Exception):
                await store.close()
            raise
        await store.close()
        return result
    except CliError:
        raise
    except Exception as exc:
        mapped = store_error(settings, exc)
        if mapped is None:
            raise
        raise mapped from exc


def run_with_store(
    settings: Settings, work: Callable[[Store], Awaitable[T]], *, create: bool = False
) -> T:
    """Open the store, run ``work(store)``, close the store; return what ``work`` returned.

    Without ``create``, a store that does not exist yet is an error (no command but
    ``device register`` should leave a fresh ``./data`` behind after a typo in
    ``--data-dir``); with it, the data directory and the store are created."""
    try:
        settings.check()
    except ConfigError as exc:
        raise CliError(f"{exc}: fix the config (docs/configuration.md)") from None
    if create:
        ensure_data_dir(settings)
    elif not store_exists(settings):
        raise no_store_error(settings)
    return asyncio.run(_with_store(settings, work))
