"""`X-Request-ID`: a fresh id goes upstream, back on the response and into the log line; a
trusted peer's passes through; `request_id: false` turns it off; the proxy's own errors and a
relayed 101 carry one too."""

from __future__ import annotations

import re

from websockets.sync.client import connect

from tests.support.access_log import access_records
from tests.support.clients import http
from tests.support.configs import proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.waiting import eventually
from tests.support.wire import values

HEX32 = re.compile(rb"[0-9a-f]{32}")


def test_a_fresh_request_id_goes_upstream_on_the_response_and_in_the_log(
    make_proxy, raw_upstream, logs
):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port))
    extra = b"X-Request-ID: from-the-client\r\n"
    status, headers, _ = http(proxy.address, host="app.test", close=False, extra=extra)
    assert status == 200
    (sent,) = values(up.accept().heads[0], b"X-Request-ID")
    assert HEX32.fullmatch(sent), "an untrusted client's id is replaced by a fresh one"
    assert headers[b"x-request-id"] == sent
    assert eventually(lambda: access_records(logs))
    assert access_records(logs)[0]["request_id"] == sent.decode()


def test_a_trusted_peers_request_id_passes_through(make_proxy, raw_upstream, logs):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, trusted_proxies=["127.0.0.1"]))
    extra = b"X-Request-ID: abc-123\r\n"
    _, headers, _ = http(proxy.address, host="app.test", close=False, extra=extra)
    assert values(up.accept().heads[0], b"X-Request-ID") == [b"abc-123"]
    assert headers[b"x-request-id"] == b"abc-123"


def test_request_id_false_turns_it_all_off(make_proxy, raw_upstream, logs):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, request_id=False))
    extra = b"X-Request-ID: kept\r\n"
    _, headers, _ = http(proxy.address, host="app.test", close=False, extra=extra)
    assert values(up.accept().heads[0], b"X-Request-ID") == [b"kept"]
    assert b"x-request-id" not in headers
    _, headers, _ = http(proxy.address, host="app.test", close=False)
    assert b"x-request-id" not in headers
    assert values(up.accept().heads[-1], b"X-Request-ID") == []


def test_the_proxys_own_error_carries_a_request_id_and_counts_its_bytes(make_proxy, logs):
    proxy = make_proxy(proxy_yaml(1, route={"host": "only.test"}))
    status, headers, body = http(proxy.address, "/nowhere", host="app.test", close=False)
    assert status == 404
    assert HEX32.fullmatch(headers[b"x-request-id"])
    assert eventually(lambda: access_records(logs))
    (line,) = access_records(logs)
    assert line["status"] == 404
    assert line["bytes_out"] == len(body) > 0
    assert line["request_id"] == headers[b"x-request-id"].decode()


def test_a_relayed_101_carries_the_request_id(make_proxy, ws_upstream, logs):
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port))
    with connect(proxy.url("/ws")) as ws:
        rid = ws.response.headers["X-Request-ID"]
        ws.send("hi")
        assert ws.recv() == "hi"
    assert HEX32.fullmatch(rid.encode())
    assert up.requests[0].headers["X-Request-ID"] == rid
