"""Fixtures for the distributed mode: ``cluster`` is the seed's deployment (gateway, two
msg_servers, router, manager as real processes from configs/) on the session's Redis
and MongoDB-wire server, with a key prefix and a database of its own, not started yet;
``cluster_on(redis_url, mongo_url)`` builds one on servers the test controls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cluster import Cluster
from support.mongo import fresh_database_name, mongo_url
from support.redis import RedisServer, redis_server, shared_redis, unique_prefix

__all__ = ["mongo_url", "redis_server", "shared_redis"]  # fixtures used here

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def cluster_on(tmp_path: Path) -> Iterator[MakeCluster]:
    made: list[Cluster] = []

    def make(redis_url: str, mongo: str, **kwargs: object) -> Cluster:
        c = Cluster(
            tmp_path / f"cluster{len(made) + 1}",
            redis_url,
            mongo,
            fresh_database_name(),
            unique_prefix(),
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(c)
        return c

    yield make
    problems = []
    for c in made:
        codes = c.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            problems.append(f"roles did not stop cleanly on SIGTERM: {bad}\n{c.logs()}")
        if not c.expect_errors and c.errors():
            problems.append("roles logged errors:\n" + "\n".join(c.errors()[:20]))
    assert not problems, "\n".join(problems)


@pytest.fixture
def cluster(cluster_on: MakeCluster, shared_redis: RedisServer, mongo_url: str) -> Cluster:
    return cluster_on(shared_redis.url, mongo_url)
