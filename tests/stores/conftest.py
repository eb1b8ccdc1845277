"""The ``store`` fixture: one fresh, opened store per backend, so the contract suite
runs once against each. A new backend is one more entry in ``BACKENDS``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from support.mongo import fresh_database_name, mongo_url

from fishchat_iot.stores.base import Store
from fishchat_iot.stores.mongo import MongoStore
from fishchat_iot.stores.sqlite import SqliteStore

__all__ = ["mongo_url"]  # the session fixture, re-exported for the tests here

# A factory gets the test's request, so a backend that needs a server (MongoDB) can
# ask for its own fixture with ``request.getfixturevalue(...)``. It returns an opened
# store; the fixture closes it.
StoreFactory = Callable[[pytest.FixtureRequest], Awaitable[Store]]


async def _sqlite(request: pytest.FixtureRequest) -> Store:
    tmp_path = request.getfixturevalue("tmp_path")
    store = SqliteStore(tmp_path / "data" / "fishchat.db")
    await store.open()
    return store


async def _mongodb(request: pytest.FixtureRequest) -> Store:
    # A fresh database per test (dropped afterwards): the test server slows down as
    # its collections grow, and a real server may be shared.
    url = request.getfixturevalue("mongo_url")
    store = MongoStore(url, fresh_database_name(), timeout_s=10.0)
    await store.open()
    request.addfinalizer(lambda: _drop_database(url, store.database))
    return store


def _drop_database(url: str, name: str) -> None:
    from pymongo import MongoClient

    with MongoClient(url, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


BACKENDS: dict[str, StoreFactory] = {
    "sqlite": _sqlite,
    "mongodb": _mongodb,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = await BACKENDS[request.param](request)
    try:
        yield opened
    finally:
        await opened.close()
