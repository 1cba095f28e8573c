"""Reading the admin listener: /metrics as Prometheus families, /upstreams as JSON."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import http

Families = dict[str, Any]


def metrics_text(admin: int) -> str:
    status, headers, body = http(admin, "/metrics")
    assert status == 200, (status, body)
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    return body.decode()


def parse(text: str) -> Families:
    """Prometheus text as {family name: family}."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def scrape(admin: int) -> Families:
    """GET /metrics from the admin listener on `admin`, parsed."""
    return parse(metrics_text(admin))


def value(families: Families, name: str, **labels: str) -> float:
    """The sum of samples `name` whose labels include `labels` (0 if none)."""
    return sum(
        float(s.value)
        for f in families.values()
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def admin_json(admin: int, path: str = "/upstreams") -> Any:
    status, headers, body = http(admin, path)
    assert status == 200, (status, body)
    assert headers[b"content-type"] == b"application/json"
    return json.loads(body)
