"""The soak in the default run: `tests/soak/soak.py` for SOAK_SECONDS (default 30) must PASS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))


@pytest.mark.slow
@pytest.mark.soak
def test_soak_passes_every_check():
    run = subprocess.run(
        [sys.executable, "-m", "tests.soak.soak", "--seconds", str(SECONDS)],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120, check=False,
    )  # fmt: skip
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "PASS"
