"""telemetry/metrics.py: the /metrics exposition (contract "Admin endpoints"), including the
totals across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.telemetry.metrics import (
    DURATION_BUCKETS,
    MULTIPROC_ENV,
    Telemetry,
)

# Family name (as the parser reports it, `_total` dropped), type, label names of its samples.
CONTRACT = {
    "upgradeproxy_requests": ("counter", {"route", "code"}),
    "upgradeproxy_upgrades": ("counter", {"route", "protocol", "result"}),
    "upgradeproxy_tunnels_active": ("gauge", {"route", "protocol"}),
    "upgradeproxy_tunnel_bytes": ("counter", {"direction"}),
    "upgradeproxy_upstream_errors": ("counter", {"upstream", "kind"}),
    "upgradeproxy_request_duration_seconds": ("histogram", set()),
}


def exchange(route: str = "*/", status: int = 200, duration: float = 0.02) -> ExchangeRecord:
    return ExchangeRecord(
        client="192.0.2.7", method="GET", host="a.test", path="/x", route=route,
        upstream="app", server="127.0.0.1:9000", status=status, duration=duration,
    )  # fmt: skip


TUNNEL = ExchangeRecord(client="c", route="*/ws", protocol="websocket", kind="tunnel")


def feed(t: Telemetry) -> None:
    """One of every hook, as the exchange code calls them."""
    t.exchange_done(exchange(status=200, duration=0.003))
    t.exchange_done(exchange(status=200, duration=0.3))
    t.exchange_done(exchange(route="*/ws", status=101, duration=20.0))
    t.upgrade("*/ws", "websocket", "switched")
    t.upstream_error("app", "connect")
    t.tunnel_opened(TUNNEL)
    t.tunnel_moved("up", 11)
    t.tunnel_moved("down", 7)


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    raise KeyError(f"{sample}{labels}")


def absent(text: str, sample: str) -> bool:
    return all(s.name != sample for f in text_string_to_metric_families(text) for s in f.samples)


def test_every_contract_metric_has_help_type_and_its_labels():
    """`/metrics` names each contract metric with `# HELP`/`# TYPE` lines and exactly the
    labels the contract lists."""
    t = Telemetry()
    feed(t)
    text = t.render()
    found = families(text)
    for name, (kind, labels) in CONTRACT.items():
        family = found[name]
        assert family.type == kind, name
        assert family.documentation, name
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# TYPE {exposed} {kind}\n" in text
        assert f"# HELP {exposed} " in text
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample


def test_counter_values_by_label():
    t = Telemetry()
    feed(t)
    text = t.render()
    assert value(text, "upgradeproxy_requests_total", route="*/", code="200") == 2
    assert value(text, "upgradeproxy_requests_total", route="*/ws", code="101") == 1
    assert (
        value(
            text, "upgradeproxy_upgrades_total",
            route="*/ws", protocol="websocket", result="switched",
        )
        == 1
    )  # fmt: skip
    assert value(text, "upgradeproxy_upstream_errors_total", upstream="app", kind="connect") == 1
    assert value(text, "upgradeproxy_tunnel_bytes_total", direction="up") == 11
    assert value(text, "upgradeproxy_tunnel_bytes_total", direction="down") == 7
    assert value(text, "upgradeproxy_tunnels_active", route="*/ws", protocol="websocket") == 1


def test_duration_histogram_buckets_are_cumulative_and_end_in_inf():
    """Buckets are the documented bounds plus +Inf, cumulative; +Inf equals _count."""
    t = Telemetry()
    feed(t)
    text = t.render()
    name = "upgradeproxy_request_duration_seconds"
    buckets = {
        s.labels["le"]: s.value for s in families(text)[name].samples if s.name == f"{name}_bucket"
    }
    assert list(buckets) == [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
    assert buckets["0.005"] == 1  # 0.003
    assert buckets["0.5"] == 2  # + 0.3
    assert buckets["10.0"] == 2  # 20 s is above every finite bound
    assert buckets["+Inf"] == 3 == value(text, f"{name}_count")
    assert value(text, f"{name}_sum") == pytest.approx(20.303)
    counts = list(buckets.values())
    assert counts == sorted(counts)


def test_label_values_are_escaped():
    t = Telemetry()
    t.exchange_done(exchange(route='odd"\\route\n'))
    assert value(t.render(), "upgradeproxy_requests_total", route='odd"\\route\n', code="200") == 1


def test_properties_read_this_process_values():
    """Tests elsewhere read `tunnels_active` and `tunnel_bytes` directly."""
    t = Telemetry()
    assert (t.tunnels_active, t.tunnel_bytes) == (0, {"up": 0, "down": 0})
    feed(t)
    t.tunnel_opened(ExchangeRecord(client="c", route="*/", protocol="SPDY/3.1"))
    t.tunnel_closed(ExchangeRecord(client="c", route="*/", protocol="spdy/3.1"))
    assert (t.tunnels_active, t.tunnel_bytes) == (1, {"up": 11, "down": 7})


def test_two_telemetries_in_one_process_do_not_collide():
    a, b = Telemetry(), Telemetry()
    a.tunnel_moved("up", 5)
    assert (a.tunnel_bytes["up"], b.tunnel_bytes["up"]) == (5, 0)
    assert "upgradeproxy_tunnel_bytes_total" in b.render()


_WORKER = textwrap.dedent(
    """
    import os
    from upgradeproxy.telemetry.access import ExchangeRecord
    from upgradeproxy.telemetry.metrics import Telemetry
    t = Telemetry()
    for _ in range({n}):
        t.exchange_done(ExchangeRecord(client="c", route="*/", status=200, duration=0.01))
    t.tunnel_opened(ExchangeRecord(client="c", route="*/", protocol="websocket"))
    t.tunnel_moved("up", {n})
    print(os.getpid())
    """
)


def _worker(directory: str, n: int) -> int:
    env = {**os.environ, MULTIPROC_ENV: directory}
    done = subprocess.run(
        [sys.executable, "-c", _WORKER.format(n=n)],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return int(done.stdout)


def test_multiprocess_render_sums_workers_and_drops_dead_gauges(tmp_path, monkeypatch):
    """With $PROMETHEUS_MULTIPROC_DIR any process renders the totals of every worker;
    a dead worker's counters stay (totals never drop), its open-tunnel gauge goes."""
    directory = str(tmp_path)
    first, second = _worker(directory, 3), _worker(directory, 4)
    monkeypatch.setenv(MULTIPROC_ENV, directory)
    scraper = Telemetry()
    text = scraper.render()
    assert value(text, "upgradeproxy_requests_total", route="*/", code="200") == 7
    assert value(text, "upgradeproxy_request_duration_seconds_count") == 7
    assert value(text, "upgradeproxy_tunnel_bytes_total", direction="up") == 7
    assert value(text, "upgradeproxy_tunnels_active", route="*/", protocol="websocket") == 2
    assert families(text)["upgradeproxy_tunnels_active"].type == "gauge"
    mark_process_dead(first, directory)
    text = scraper.render()
    assert value(text, "upgradeproxy_tunnels_active", route="*/", protocol="websocket") == 1
    assert value(text, "upgradeproxy_requests_total", route="*/", code="200") == 7
    mark_process_dead(second, directory)
    # No live worker has a gauge file left (a real scrape always comes from a live one).
    assert absent(scraper.render(), "upgradeproxy_tunnels_active")
