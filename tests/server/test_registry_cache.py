"""The manager's registry cache is bounded: a node serving a large fleet keeps at most
``DEVICE_CACHE_MAX`` device records (the oldest cached go first), and a device whose
record was dropped is read from the store again, correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from fishchat_iot.roles import manager as manager_module
from fishchat_iot.roles.manager import Manager
from fishchat_iot.stores.base import DeviceRecord
from fishchat_iot.stores.sqlite import SqliteStore


async def test_device_cache_keeps_the_newest_records_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "DEVICE_CACHE_MAX", 3)
    async with SqliteStore(tmp_path / "fishchat.db") as store:
        for i in range(5):
            await store.add_device(DeviceRecord(id=f"d{i}", token_hash=bytes([i]) * 32))
        m = Manager(store)
        for i in range(5):
            rec = await m.device(f"d{i}")
            assert rec is not None and rec.token_hash == bytes([i]) * 32
        assert m._devices.keys() == {"d2", "d3", "d4"}  # d0, d1 went first
        rec = await m.device("d0")  # from the store again
        assert rec is not None and rec.token_hash == bytes([0]) * 32
        assert m._devices.keys() == {"d3", "d4", "d0"}
        assert await m.device("nobody") is None  # "not registered" is cached too
        assert len(m._devices) == 3
