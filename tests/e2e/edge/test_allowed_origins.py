"""Rule 12: `allowed_origins` on a route lets browser origins in or refuses them with a 403
before anything reaches the upstream; no Origin and plain HTTP are not checked; refusals are
counted by route."""

from __future__ import annotations

import logging

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.access_log import access_records
from tests.support.clients import (
    raw_client,
    read_response,
)
from tests.support.configs import proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.waiting import WAIT, eventually
from tests.support.wire import ws_request

ORIGINS = {
    "allowed_origins": [
        "https://chat.example.com", "https://*.apps.example.com", "http://localhost:3000"
    ]
}  # fmt: skip


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        pytest.param("https://chat.example.com", True, id="exact"),
        pytest.param("https://chat.example.com:443", True, id="default-port"),
        pytest.param("https://CHAT.example.com", True, id="case"),
        pytest.param("https://eu.apps.example.com", True, id="wildcard"),
        pytest.param("https://apps.example.com", False, id="wildcard-needs-a-label"),
        pytest.param("http://localhost:3000", True, id="port"),
        pytest.param("http://localhost:3001", False, id="other-port"),
        pytest.param("https://evil.example", False, id="other-site"),
        pytest.param("null", False, id="null"),
    ],
)
def test_browser_origin_is_allowed_or_refused(make_proxy, ws_upstream, origin, allowed):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    if allowed:
        with connect(proxy.url("/chat"), origin=origin, open_timeout=WAIT) as ws:  # type: ignore[arg-type]
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        assert len(up.requests) == 1
        return
    with pytest.raises(InvalidStatus) as info:
        connect(proxy.url("/chat"), origin=origin, open_timeout=WAIT)  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    assert up.requests == []  # never reached the upstream


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"Origin: \xff\xfe garbage\x7f\r\n", id="bytes"),
        pytest.param(b"Origin: https://\r\n", id="no-host"),
        pytest.param(b"Origin: https://chat.example.com/path\r\n", id="path"),
        pytest.param(b"Origin: https://chat.example.com:99999\r\n", id="bad-port"),
        pytest.param(
            b"Origin: https://chat.example.com\r\nOrigin: https://chat.example.com\r\n",
            id="two-headers",
        ),
    ],
)
def test_malformed_origin_is_a_403_never_a_500(make_proxy, raw_upstream, extra, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = raw_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(*extra.splitlines(), target=b"/", host=b"chat.example.com"))
        status, _, body, _ = read_response(sock)
    assert (status, body) == (403, b"403 Forbidden\n")
    assert up.conns == []
    assert eventually(lambda: access_records(caplog, "http"))
    assert "Origin" in str(access_records(caplog, "http")[-1]["error"])


def test_no_origin_and_plain_http_are_not_checked(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, route=ORIGINS))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n")
        assert read_response(sock)[0] == 200
    with raw_client(proxy.address) as sock:
        sock.sendall(ws_request(target=b"/", host=b"chat.example.com"))  # no Origin: not a browser
        assert read_response(sock)[0] == 200  # the raw upstream declines with a 200


def test_origin_refusals_are_counted_by_route(make_proxy, ws_upstream):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, route={"path_prefix": "/ws", **ORIGINS}))
    for _ in range(2):
        with raw_client(proxy.address) as sock:
            origin = b"Origin: https://evil.example"
            sock.sendall(ws_request(origin, target=b"/ws", host=b"chat.example.com"))
            assert read_response(sock)[0] == 403
    text = proxy.telemetry.render()
    assert 'upgradeproxy_origin_refusals_total{route="*/ws"} 2.0' in text
