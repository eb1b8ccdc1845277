"""Fixtures for the suites that run a real ``fishchat-iot up`` (tests/support).

- ``up_server``: one default server per test module (tests that share it use their own
  device ids, from ``uid``).
- ``up_server_factory``: ``make(*up_args, config=..., start=True)`` -> a server of the
  test's own (one killed or restarted by the test, or with other settings); with
  ``start=False`` the test sets up the registry through the CLI first and starts it.
- ``connect``: ``await connect(addr, [device_id, token | None])`` -> a RawClient
  (logged in when an id is given; ``token=None`` is a v1 login); closed at teardown.
- ``uid``: a device-id prefix unique to the test.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.raw_client import Connect, RawClient
from support.server import ServerFactory, ServerProcess

_uid_counter = itertools.count(1)


def _finish(server: ServerProcess) -> None:
    """Teardown: the server must still be up, have logged no error of its own, and
    stop gracefully (SIGTERM -> exit 0)."""
    if not server.running:
        server.stop()
        return
    try:
        server.assert_healthy()
    finally:
        code = server.stop()
    assert code == 0, f"fishchat-iot up exited {code} on SIGTERM:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def up_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("up"))
    server.start()
    yield server
    _finish(server)


@pytest.fixture
def up_server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    servers: list[ServerProcess] = []

    def make(
        *up_args: str, config: dict[str, dict[str, Any]] | None = None, start: bool = True
    ) -> ServerProcess:
        server = ServerProcess(tmp_path / f"up{len(servers) + 1}", *up_args, config=config)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    errors = []
    for server in servers:
        try:
            _finish(server)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """``t12-name-of-the-test``: a prefix for device ids and topic names that no
    other test uses (ids are at most 64 characters; keep suffixes short)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_")).strip("-")
    return f"t{next(_uid_counter)}-{slug[:36]}"


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    opened: list[RawClient] = []

    async def make(
        addr: str, device_id: str | None = None, token: str | None = None, name: str = ""
    ) -> RawClient:
        client = await RawClient.connect(addr, name)
        opened.append(client)
        if device_id is not None:
            if token is None:
                await client.login_v1(device_id)
            else:
                await client.login(device_id, token)
        return client

    yield make
    for client in opened:
        await client.close()
