"""Metrics added by issue 11 (item 5), read from a running proxy's own /metrics text."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import raw_client, read_response
from tests.support.configs import proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.waiting import eventually


def sample(proxy, name: str, **labels: str) -> float:
    text = proxy.call(proxy.telemetry.render)
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def get(sock: socket.socket) -> int:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    return read_response(sock)[0]


def test_connections_active_and_limited(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, limits={"max_connections": 1}))
    first = raw_client(proxy.address)
    assert get(first) == 200
    assert sample(proxy, "upgradeproxy_connections_active") == 1
    assert sample(proxy, "upgradeproxy_connections_limited_total") == 0
    with raw_client(proxy.address) as second:  # waits in the backlog
        second.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert eventually(lambda: sample(proxy, "upgradeproxy_connections_limited_total") == 1)
        first.close()
        assert read_response(second)[0] == 200
        assert sample(proxy, "upgradeproxy_connections_active") == 1
    assert eventually(lambda: sample(proxy, "upgradeproxy_connections_active") == 0)


def test_upstream_connect_and_header_histograms_by_upstream(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port))
    with raw_client(proxy.address) as sock:
        assert get(sock) == 200
        assert get(sock) == 200  # on the pooled connection: no new connect
    connect = "upgradeproxy_upstream_connect_seconds"
    header = "upgradeproxy_upstream_header_seconds"
    assert sample(proxy, f"{connect}_count", upstream="app") == 1
    assert sample(proxy, f"{header}_count", upstream="app") == 2
    assert 0 < sample(proxy, f"{connect}_sum", upstream="app") <= sample(
        proxy, f"{header}_sum", upstream="app"
    )


def test_process_metrics_in_one_process(make_proxy):
    proxy = make_proxy(proxy_yaml(1))
    assert sample(proxy, "process_resident_memory_bytes") > 0
    assert sample(proxy, "process_open_fds") > 0
