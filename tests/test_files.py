"""The one way files shared between roles and the CLI are written (fishchat_iot/files.py):
whole or not at all, with their mode from the first byte, by any number of writers."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from fishchat_iot.files import PRIVATE, PUBLIC, write_atomic

A = b"a" * 200_000
B = b"b" * 150_000


def _rewrite(path: str, rounds: int) -> None:
    for i in range(rounds):
        write_atomic(Path(path), A if i % 2 else B, PUBLIC)


def test_a_reader_sees_a_whole_file_while_it_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_atomic(path, A, PUBLIC)
    writer = multiprocessing.get_context("fork").Process(target=_rewrite, args=(str(path), 400))
    writer.start()
    try:
        while writer.is_alive():
            data = path.read_bytes()
            assert data in (A, B), f"a read of {len(data)} bytes"
    finally:
        writer.join(timeout=30)
    assert writer.exitcode == 0
    assert os.listdir(tmp_path) == ["status.json"]  # no temporary left behind


def test_writers_in_threads_of_one_process_do_not_collide(tmp_path: Path) -> None:
    """Two status writes at once (asyncio.to_thread) each get their own temporary: one
    shared temporary name made one writer rename the other's half-written file, or fail
    when the other had renamed it already."""
    path = tmp_path / "status.json"
    errors: list[BaseException] = []

    def hammer(data: bytes) -> None:
        try:
            for _ in range(300):
                write_atomic(path, data, PUBLIC)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(d,)) for d in (A, B, A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in (A, B)
    assert os.listdir(tmp_path) == ["status.json"]


@pytest.mark.parametrize(("mode", "umask"), [(PRIVATE, 0), (PUBLIC, 0o077), (PRIVATE, 0o022)])
def test_the_mode_asked_for_whatever_the_umask(tmp_path: Path, mode: int, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "sub" / "secret", "token\n", mode, sync=True)
    finally:
        os.umask(old)
    st = (tmp_path / "sub" / "secret").stat()
    assert stat.S_IMODE(st.st_mode) == mode
    assert (tmp_path / "sub" / "secret").read_text() == "token\n"


def test_a_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    """The rename fails (a directory is in the way): what was there stays, and the
    temporary is removed."""
    path = tmp_path / "operators.json"
    path.mkdir()
    (path / "kept").write_text("x")
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert (path / "kept").read_text() == "x"
    assert os.listdir(tmp_path) == ["operators.json"]
