"""The README is the short entry it should be, its two commands are the ones CI runs, and the
docs site is built strictly by the test command; docs/interface.md is the contract verbatim."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.docs.blocks import CONTRACT, ROOT, code_blocks

README = ROOT / "README.md"
SHARED_CONTRACT = ROOT.parent / "shared" / "interface.md"


def quickstart_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quickstart")
    block = next(
        b for b in code_blocks(README) if b.lang == "sh" and text.count("\n", 0, start) < b.line
    )
    return [line for line in block.text.splitlines() if line and not line.startswith("#")]


def test_readme_is_one_short_page() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_quickstart_is_the_two_commands() -> None:
    assert quickstart_commands() == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/upgradeproxy demo",
        "bash tests/run.sh",
    ]


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    ci = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("exec")
    ]
    assert ci == [f"exec {quickstart_commands()[1]}"]


def test_the_test_command_builds_the_site_strictly() -> None:
    lines = (ROOT / "tests" / "run.sh").read_text().splitlines()
    steps = [shlex.split(line) for line in lines if line.startswith(("NO_MKDOCS", ".venv/bin/"))]
    mkdocs = [i for i, s in enumerate(steps) if any(w.endswith("mkdocs") for w in s)]
    pytest_step = [i for i, s in enumerate(steps) if "pytest" in s]
    assert len(mkdocs) == 1
    assert mkdocs[0] < pytest_step[0]
    words = steps[mkdocs[0]]
    assert "--strict" in words
    assert not {"-q", "--quiet"} & set(words)  # quiet hides the warnings strict counts


def test_readme_links_point_at_files() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_readme_maps_every_page_of_the_site() -> None:
    text = README.read_text(encoding="utf-8")
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    pages.discard("docs/index.md")  # the site's home page; the README is its own
    assert {p for p in pages if f"]({p})" not in text} == set()


def test_contract_is_verbatim() -> None:
    if not SHARED_CONTRACT.is_file():
        pytest.skip(f"no shared contract at {SHARED_CONTRACT} to compare with")
    assert CONTRACT.read_bytes() == Path(SHARED_CONTRACT).read_bytes()
