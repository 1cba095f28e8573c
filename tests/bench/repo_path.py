"""The bench runs as scripts from tests/bench; importing this puts the repository root on
sys.path, so they share the test suite's helpers (`tests.support`)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
