"""Fixtures for the bus suites: ``cluster`` makes handles on one bus backend (each
handle is a node's view; LocalBus is one process, so its handles are one object), so
the contract suite runs once per backend. A new backend is one more entry in
``BACKENDS``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support.redis import RedisServer, redis_server, shared_redis, unique_prefix

from fishchat_iot.bus.base import Bus
from fishchat_iot.bus.local import LocalBus
from fishchat_iot.bus.redis import RedisBus

__all__ = ["redis_server", "shared_redis"]  # fixtures, re-exported for the tests here

# make(**options) -> an opened handle on the test's backend. Options every backend
# takes: node_ttl (s). The fixture closes every handle.
MakeBus = Callable[..., Awaitable[Bus]]
BackendFactory = Callable[[pytest.FixtureRequest, list[Bus]], MakeBus]


def _local(request: pytest.FixtureRequest, opened: list[Bus]) -> MakeBus:
    shared: list[LocalBus] = []

    async def make(**options: Any) -> Bus:
        if not shared:
            bus = LocalBus(node_ttl=options.get("node_ttl", 10.0))
            await bus.open()
            shared.append(bus)
            opened.append(bus)
        return shared[0]

    return make


def _redis(request: pytest.FixtureRequest, opened: list[Bus]) -> MakeBus:
    server: RedisServer = request.getfixturevalue("shared_redis")
    prefix = unique_prefix()

    async def make(**options: Any) -> Bus:
        bus = RedisBus(server.url, prefix=prefix, **options)
        await bus.open()
        opened.append(bus)
        return bus

    return make


BACKENDS: dict[str, BackendFactory] = {"local": _local, "redis": _redis}


@pytest.fixture(params=sorted(BACKENDS))
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[MakeBus]:
    opened: list[Bus] = []
    try:
        yield BACKENDS[request.param](request, opened)
    finally:
        for bus in opened:
            await bus.close()
