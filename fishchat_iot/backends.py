"""The store and bus a role runs on, chosen by ``store.backend`` and ``bus.backend``:
SQLite and the in-process bus for the embedded mode, MongoDB and Redis for the
distributed one (DESIGN sections 1 and 5). Drivers are imported only when chosen."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fishchat_iot.bus.base import Bus, BusUnavailable
from fishchat_iot.config import Settings
from fishchat_iot.stores.base import Store, StoreUnavailable

log = logging.getLogger("fishchat.backends")


def make_store(settings: Settings) -> Store:
    s = settings.store
    if s.backend == "mongodb":
        from fishchat_iot.stores.mongo import MongoStore

        return MongoStore(
            s.mongo_url,
            s.mongo_database,
            max_age_s=settings.delivery.offline_max_age,
            timeout_s=s.timeout,
        )
    from fishchat_iot.stores.sqlite import SqliteStore

    return SqliteStore(str(settings.sqlite_path), queue_max=s.queue_max)


def make_bus(settings: Settings) -> Bus:
    b = settings.bus
    if b.backend == "redis":
        from fishchat_iot.bus.redis import RedisBus

        return RedisBus(
            b.url,
            prefix=b.prefix,
            node_ttl=b.node_ttl,
            presence_ttl=b.presence_ttl,
            claim_idle=b.claim_idle,
            timeout=b.timeout,
        )
    from fishchat_iot.bus.local import LocalBus

    return LocalBus(node_ttl=b.node_ttl)


def describe_store(settings: Settings) -> str:
    s = settings.store
    if s.backend == "mongodb":
        return f"MongoDB at {s.mongo_url} (database {s.mongo_database})"
    return f"SQLite at {settings.sqlite_path}"


def describe_bus(settings: Settings) -> str:
    return f"Redis at {settings.bus.url}" if settings.bus.backend == "redis" else "in-process bus"


async def open_with_retry(
    open_: Callable[[], Awaitable[None]], what: str, retry_max: float = 5.0
) -> None:
    """Open a backend the role cannot work without, waiting for it as long as it takes
    (roles start in any order): one warning when it is not reachable, one line every
    minute while that lasts, and one when it is."""
    delay, waited, next_note = 0.2, 0.0, 60.0
    while True:
        try:
            await open_()
        except (StoreUnavailable, BusUnavailable) as exc:
            if waited == 0.0:
                log.warning("%s is not reachable (%s): waiting for it", what, exc)
            elif waited >= next_note:
                next_note += 60.0
                log.warning("still waiting for %s after %.0f s (%s)", what, waited, exc)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, retry_max)
            continue
        if waited:
            log.warning("%s is reachable: continuing after %.1f s", what, waited)
        return
