"""The soak in the default run: `tests/soak/soak.py` for SOAK_SECONDS (default 30) must PASS,
as one process and as two workers upgraded (SIGUSR2) every 10 s."""

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
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="one-process"),
        pytest.param(["--workers", "2", "--upgrade-every", "10"], id="workers-and-upgrades"),
    ],
)
def test_soak_passes_every_check(extra):
    run = subprocess.run(
        [sys.executable, "-m", "tests.soak.soak", "--seconds", str(SECONDS), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120, check=False,
    )  # fmt: skip
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "PASS"
