"""The cluster monitor's page in real headless Chromium (see test_browser.py): both
msg_server nodes and the monitor itself in the nodes table, one of them going down,
a device online on its node, and a revocation from the page reaching the store."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from support.mongo import mongo_url
from support.redis import shared_redis

from .test_browser import log_in, page, playwright_api, row
from .test_cluster import TOKEN, Cluster, cluster, eventually

__all__ = ["cluster", "mongo_url", "page", "shared_redis"]  # fixtures, used here


def node_row(pg: Any, node_id: str) -> Any:
    return pg.locator(f'#nodes tr[data-node="{node_id}"]')


async def test_cluster_page(cluster: Cluster, page: Any) -> None:
    expect = playwright_api.expect
    a_id, b_id = cluster.a.ms.node_id, cluster.b.ms.node_id
    await log_in(page, SimpleNamespace(base=cluster.base, token=TOKEN))
    await expect(node_row(page, a_id)).to_contain_text("127.0.0.1:19000")
    await expect(node_row(page, b_id)).to_contain_text("127.0.0.1:19001")
    await expect(page.locator("#nodes tbody tr", has_text="monitor")).to_have_count(1)
    await expect(page.locator("#t-sessions")).to_have_text("3")
    await expect(page.locator("#t-accepted")).to_have_text("107")
    await expect(row(page, "cm-lamp").locator(".dev-state")).to_have_text("online")
    await expect(row(page, "cm-lamp")).to_contain_text("127.0.0.1:19000")
    await expect(row(page, "cm-door").locator(".dev-state")).to_have_text("offline")

    cluster.b.beating = False  # node b dies: the page marks it down, live
    await expect(node_row(page, b_id).locator("td").last).to_have_text("down")
    await expect(page.locator("#t-sessions")).to_have_text("2")

    await row(page, "cm-door").locator("button.revoke").click()
    await expect(page.locator("#confirm-text")).to_contain_text("Revoke device cm-door")
    await page.click("#confirm-ok")
    await expect(row(page, "cm-door").locator(".dev-state")).to_have_text("revoked")

    async def revoked() -> bool:
        record = await cluster.store.get_device("cm-door")
        return record is not None and record.revoked

    async def broadcast() -> bool:
        return {"kind": "revoke", "device": "cm-door"} in cluster.a.events

    await eventually(revoked, "cm-door revoked in MongoDB")
    await eventually(broadcast, "the revoke event heard by msg_server a")
