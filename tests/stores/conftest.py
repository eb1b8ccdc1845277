"""The ``store`` fixture: one fresh, opened store per backend, so the contract suite
runs once against each. A new backend is one more entry in ``BACKENDS``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fishchat_iot.stores.base import Store
from fishchat_iot.stores.sqlite import SqliteStore

# A factory gets the test's request, so a backend that needs a server (MongoDB) can
# ask for its own fixture with ``request.getfixturevalue(...)``. It returns an opened
# store; the fixture closes it.
StoreFactory = Callable[[pytest.FixtureRequest], Awaitable[Store]]


async def _sqlite(request: pytest.FixtureRequest) -> Store:
    tmp_path = request.getfixturevalue("tmp_path")
    store = SqliteStore(tmp_path / "data" / "fishchat.db")
    await store.open()
    return store


BACKENDS: dict[str, StoreFactory] = {
    "sqlite": _sqlite,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = await BACKENDS[request.param](request)
    try:
        yield opened
    finally:
        await opened.close()
