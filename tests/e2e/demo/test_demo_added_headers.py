"""The demo says what the proxy did to each header: every header the upstream received that
the client did not send is marked as the proxy's (X-Request-ID included), on the selftest's
output and on the page alike."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.processes import run_cli
from upgradeproxy.demo import selftest

PAGE = Path(selftest.__file__).with_name("static") / "demo.html"
MARKS = ("<- added by the proxy", "<- hop-by-hop, rebuilt by the proxy")


def _section(out: str, title: str) -> list[str]:
    """The header lines under a `title` line of the selftest's output, up to a blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line) + 2  # past the start line
    end = lines.index("", start)
    return lines[start:end]


def test_selftest_marks_every_header_the_proxy_added() -> None:
    result = run_cli("demo", "--selftest", "--log-format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    sent = {line.split(":")[0].lower() for line in _section(result.stdout, "request head sent")}
    received = _section(result.stdout, "request head the upstream received")
    new = [line for line in received if line.split(":")[0].lower() not in sent]
    assert {line.split(":")[0].lower() for line in new} >= {
        "x-request-id",
        "via",
        "x-forwarded-for",
    }
    unmarked = [line for line in new if not line.endswith(MARKS)]
    assert not unmarked, "headers the proxy added but the selftest does not say so"


def test_the_page_marks_the_same_headers_as_the_selftest() -> None:
    found = re.search(r"const ADDED = new Set\(\[(.*?)\]\);", PAGE.read_text(), flags=re.S)
    assert found, "demo.html lost its ADDED list"
    assert set(re.findall(r'"([^"]+)"', found[1])) == selftest.ADDED
