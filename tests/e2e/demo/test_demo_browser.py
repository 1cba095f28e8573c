"""The demo page in headless Chromium: a real browser's `new WebSocket()` through the proxy.

Uses the system browser (Debian package `chromium`) via Playwright's `executable_path`;
Playwright's own browser download is never used. `UPDATE_SCREENSHOT=1` rewrites the
README's screenshot, `tests/e2e/demo-screenshot.png`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.processes import DemoProcess

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# No sandbox (containers run as root), and nothing that phones home or needs a GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT = Path(__file__).parents[1] / "demo-screenshot.png"  # the README shows it
TIMEOUT_MS = 10_000


@pytest.fixture
def chromium() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is missing: install the Debian package 'chromium' (tests/run.sh does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def counter(page: Page, element_id: str) -> int:
    """A byte counter as a number (the page formats it with thousands separators)."""
    return int(re.sub(r"\D", "", page.locator(f"#{element_id}").inner_text()) or 0)


def header_rows(page: Page) -> dict[str, str]:
    """The handshake table as lower-cased header name -> value."""
    rows = page.eval_on_selector_all(
        "#headers tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    return {row[0].lower(): row[1] for row in rows if len(row) == 3}


def test_page_echoes_through_the_proxy(chromium: Browser, demo: DemoProcess) -> None:
    """Open the page, see the handshake, send a message, see its echo and the byte counts."""
    page = chromium.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(demo.url)
    expect(page.locator("#status")).to_have_text("connected")
    expect(page.locator("#headers tr.added").first).to_be_visible()
    seen = header_rows(page)
    assert seen["upgrade"] == "websocket"
    assert seen["connection"].lower() == "upgrade"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "sec-websocket-key" in seen
    assert "origin" in seen  # end-to-end headers pass through untouched

    page.fill("#msg", "hello from chromium")
    page.click("#send")
    expect(page.locator("#log")).to_contain_text("echo: hello from chromium")
    _chat_from_another_tab(chromium, demo)
    expect(page.locator("#log")).to_contain_text("hello from another tab")
    page.wait_for_function(
        "() => ['bytes-up', 'bytes-down'].every(id =>"
        " Number(document.getElementById(id).textContent.replace(/\\D/g, '')) > 0)"
    )
    assert counter(page, "bytes-up") > 0
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()

    assert demo.interrupt() == 0
    tunnels = demo.tunnel_records("/ws")
    assert tunnels, demo.text()
    assert all(t["protocol"] == "websocket" and t["status"] == 101 for t in tunnels)
    assert max(t["bytes_in"] for t in tunnels) > 0
    pages = [r for r in demo.log_records() if r.get("msg") == "http" and r["path"] == "/"]
    assert pages, demo.text()


def _chat_from_another_tab(chromium: Browser, demo: DemoProcess) -> None:
    other = chromium.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(demo.url)
    expect(other.locator("#status")).to_have_text("connected")
    other.fill("#msg", "hello from another tab")
    other.click("#send")
    expect(other.locator("#log")).to_contain_text("echo: hello from another tab")
    other.close()
