"""Rule 17 with a real browser: Debian's Chromium loads the demo page over TLS from a listener
with `http2: true` (`upgradeproxy demo --tls`, a trustme certificate made for the run) and opens
its WebSocket to the same origin. Chromium sends it as an extended CONNECT (RFC 8441) on the
page's HTTP/2 connection, because the proxy's SETTINGS say ENABLE_CONNECT_PROTOCOL: the
proxy's log and the page both say HTTP/2."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# As tests/e2e/test_demo_browser.py, plus the run's own certificate.
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


class TlsDemo:
    """`upgradeproxy demo --tls --port 0`; stderr (the JSON log) goes to a file."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "upgradeproxy", "demo", "--tls", "--port", "0",
             "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        banner = ""
        while "Ctrl-C" not in banner:
            try:
                banner += lines.get(timeout=15)
            except queue.Empty:
                pytest.fail(f"no banner from demo --tls:\n{banner}\n{self.log_text()}")
        found = re.search(r"Open\s+(https://localhost:\d+/)", banner)
        assert found, banner
        self.url = found[1]

    def log_text(self) -> str:
        fd = self.stderr.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()


@pytest.fixture
def tls_demo() -> Iterator[TlsDemo]:
    demo = TlsDemo()
    yield demo
    demo.stop()


def test_chromium_carries_the_pages_websocket_inside_http2(tls_demo: TlsDemo) -> None:
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
        return [r for r in tls_demo.records() if r.get("msg") == kind and r.get("path") == "/ws"]

    assert eventually(lambda: bool(lines("tunnel")), timeout=15), tls_demo.log_text()
    (handshake,) = lines("http")
    assert (handshake["method"], handshake["status"], handshake["http_version"]) == (
        "CONNECT",
        200,
        "2",
    )
    (tunnel,) = lines("tunnel")
    assert tunnel["http_version"] == "2"
    assert tunnel["protocol"] == "websocket"
    page_line = next(r for r in tls_demo.records() if r.get("msg") == "http" and r["path"] == "/")
    assert page_line["http_version"] == "2"
