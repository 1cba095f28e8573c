"""The access log of an in-process proxy (`make_proxy`), as pytest's `caplog` captured it."""

from __future__ import annotations

from typing import Any

import pytest


def access_records(caplog: pytest.LogCaptureFixture, kind: str = "http") -> list[dict[str, Any]]:
    """The access-log records of one `kind` (`http` or `tunnel`), oldest first."""
    return [
        r.record  # type: ignore[attr-defined]
        for r in list(caplog.records)
        if r.name == "upgradeproxy.access" and r.getMessage() == kind
    ]
