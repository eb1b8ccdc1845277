"""The dashboard in real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright through ``executable_path``; no browser download): log in, watch two
simulated devices and their counts, revoke one; the device list at 1,000 devices.

``FISHCHAT_SCREENSHOT=docs/monitor-dashboard.png`` saves the dashboard screenshot the
README shows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# A plain import, never importorskip: playwright is a dev dependency (make test installs
# it), and a browser test skipped for want of it would prove nothing.
from playwright import async_api as playwright_api
from support.waiting import eventually

from firmware_sim.tcp_device import TcpDevice
from fishchat_iot.auth import hash_token
from fishchat_iot.stores.base import DeviceRecord
from fishchat_iot.stores.sqlite import SqliteStore

from .conftest import Monitored, add_operator

CHROMIUM = os.environ.get("FISHCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_present() -> bool:
    return Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    if not _chromium_present():
        # Never a skip: a browser test that does not run proves nothing.
        pytest.fail(f"no Chromium at {CHROMIUM}: 'make test' installs Debian's chromium")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 1100})
            pg = await ctx.new_page()
            pg.set_default_timeout(15_000)
            yield pg
        finally:
            await browser.close()


async def log_in(page: Any, mon: Monitored) -> None:
    await page.goto(mon.base + "/")
    assert page.url.endswith("/login")
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    await playwright_api.expect(page.locator(".err")).to_contain_text("Wrong token")
    await page.fill("#token", mon.token)
    await page.click("button[type=submit]")
    await page.wait_for_url(mon.base + "/")
    await playwright_api.expect(page.locator("#live")).to_have_text("live")


def row(page: Any, device_id: str) -> Any:
    return page.locator(f'#devices tr[data-device="{device_id}"]')


async def test_dashboard_live_counts_and_revoke(monitored: Monitored, page: Any) -> None:
    expect = playwright_api.expect
    srv = monitored.server
    tokens = srv.register_many(["sim-one", "sim-two"])
    one = TcpDevice("sim-one", tokens["sim-one"], msg_server=srv.msg_server)
    two = TcpDevice("sim-two", tokens["sim-two"], msg_server=srv.msg_server)
    async with one, two:
        for i in range(3):
            await one.send("sim-two", f"hello {i}")
        await log_in(page, monitored)
        await expect(page.locator("#t-sessions")).to_have_text("2")
        for dev in ("sim-one", "sim-two"):
            await expect(row(page, dev).locator(".dev-state")).to_have_text("online")
            await expect(row(page, dev)).to_contain_text("tcp")
        await expect(page.locator("#t-accepted")).to_have_text("3")
        await expect(page.locator("#nodes tbody tr")).to_have_count(1)
        await expect(page.locator("#nodes tbody")).to_contain_text(srv.msg_server)

        # Counts follow what the devices send, without a reload.
        for i in range(7):
            await two.send("sim-one", f"back {i}")
        await expect(page.locator("#t-accepted")).to_have_text("10")
        await expect(page.locator("#t-delivered")).to_have_text("10")

        shot = os.environ.get("FISHCHAT_SCREENSHOT")
        if shot:
            await asyncio.sleep(2.5)  # a few chart points
            await page.screenshot(path=shot, full_page=True)

        # Revoke sim-two from the page, through the confirmation dialog.
        await row(page, "sim-two").locator("button.revoke").click()
        await expect(page.locator("#confirm")).to_be_visible()
        await expect(page.locator("#confirm-text")).to_contain_text("Revoke device sim-two")
        await page.click("#confirm-ok")
        await expect(row(page, "sim-two").locator(".dev-state")).to_have_text("revoked")
        await expect(page.locator("#t-sessions")).to_have_text("1")
        await eventually(lambda: two.closed, "sim-two's session closed by the revocation")
        assert two.final_error is not None and two.final_error.code == "REVOKED"
        await expect(row(page, "sim-one").locator(".dev-state")).to_have_text("online")


async def _add_devices(db: Path, n: int) -> None:
    store = SqliteStore(db, 100000)
    await store.open()
    try:
        await asyncio.gather(
            *(
                store.add_device(DeviceRecord(f"fleet-{i:04d}", hash_token(f"t{i}"), created_ms=1))
                for i in range(n)
            )
        )
    finally:
        await store.close()


async def test_device_list_is_paged_at_1000_devices(up_server_factory: Any, page: Any) -> None:
    expect = playwright_api.expect
    server = up_server_factory(start=False)
    server.data_dir.mkdir(parents=True, exist_ok=True)
    await _add_devices(server.data_dir / "fishchat.db", 1000)
    await asyncio.to_thread(server.start)
    mon = Monitored(server, add_operator(server))
    doc = mon.get("/api/devices?per_page=50&page=20").json()
    assert doc["total"] == 1000 and doc["pages"] == 20 and len(doc["devices"]) == 50
    assert doc["devices"][-1]["id"] == "fleet-0999"

    await log_in(page, mon)
    await expect(page.locator("#devices tbody tr")).to_have_count(50)
    await expect(page.locator("#dev-page")).to_have_text("page 1 of 20")
    await page.click("#dev-next")
    await expect(page.locator("#dev-page")).to_have_text("page 2 of 20")
    await expect(page.locator("#devices tbody tr").first).to_have_attribute(
        "data-device", "fleet-0050"
    )
    await page.fill("#dev-q", "fleet-0777")
    await expect(page.locator("#devices tbody tr")).to_have_count(1)
    await expect(row(page, "fleet-0777").locator(".dev-state")).to_have_text("offline")
    with contextlib.suppress(Exception):
        await page.close()
