"""Rule 17 with a real browser: Debian's Chromium loads the demo page over TLS from a listener
with `http2: true` (`upgradeproxy demo --tls`, a trustme certificate made for the run) and opens
its WebSocket to the same origin. Chromium sends it as an extended CONNECT (RFC 8441) on the
page's HTTP/2 connection, because the proxy's SETTINGS say ENABLE_CONNECT_PROTOCOL: the
proxy's log and the page both say HTTP/2."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.processes import DemoProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# As tests/e2e/demo/test_demo_browser.py, plus the run's own certificate.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--ignore-certificate-errors",
]
TIMEOUT_MS = 15_000


@pytest.fixture
def tls_demo() -> Iterator[DemoProcess]:
    """`upgradeproxy demo --tls --port 0`, ready once its banner is out."""
    with DemoProcess("--tls") as demo:
        assert demo.url.startswith("https://localhost:"), demo.banner
        yield demo


def test_chromium_carries_the_pages_websocket_inside_http2(tls_demo: DemoProcess) -> None:
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is missing: install the Debian package 'chromium'"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(tls_demo.url)
            expect(page.locator("#status")).to_have_text("connected")
            expect(page.locator("#carrier")).to_have_attribute("data-version", "2")
            expect(page.locator("#carrier")).to_contain_text("HTTP/2")
            page.fill("#msg", "over h2")
            page.click("#send")
            expect(page.locator("#log")).to_contain_text("echo: over h2")
            # The page's /metrics poll counts the socket as an open tunnel (every label set
            # of upgradeproxy_tunnels_active summed).
            expect(page.locator("#tunnels")).to_have_text("1")
            page.close()
        finally:
            browser.close()

    def lines(kind: str) -> list[dict[str, Any]]:
        records = tls_demo.log_records()
        return [r for r in records if r.get("msg") == kind and r.get("path") == "/ws"]

    assert eventually(lambda: bool(lines("tunnel")), timeout=15), tls_demo.text()
    (handshake,) = lines("http")
    assert (handshake["method"], handshake["status"], handshake["http_version"]) == (
        "CONNECT",
        200,
        "2",
    )
    (tunnel,) = lines("tunnel")
    assert tunnel["http_version"] == "2"
    assert tunnel["protocol"] == "websocket"
    records = tls_demo.log_records()
    page_line = next(r for r in records if r.get("msg") == "http" and r["path"] == "/")
    assert page_line["http_version"] == "2"
