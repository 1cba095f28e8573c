"""The scale run, small: tests/scale/run.sh opens 1,500 idle WebSocket tunnels through the
proxy to three upstream servers, waits until every one is parked, checks a sample still
echoes, wakes 10% at once, drains them all, and says PASS (exit 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.scale
def test_the_scale_run_passes_small() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "tests" / "scale" / "run.sh"), "--tunnels", "1500", "--idle", "1",
         "--drain-window", "3"],
        capture_output=True, text=True, timeout=180, check=False,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.rstrip().splitlines()[-1].startswith("PASS"), out
    for row in ("opened", "parked", "echo check", "proxy RSS", "kernel sockets", "wake", "drain"):
        assert f"| {row}" in out, out


def test_the_scale_run_refuses_what_the_limits_cannot_hold() -> None:
    """More tunnels than 16 workers of 20,000 descriptors hold: a clear message, exit 2,
    before anything starts."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scale" / "scale.py"), "--tunnels", "10000000"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot fit: " in done.stdout
    assert done.stdout.rstrip().endswith("FAIL")
