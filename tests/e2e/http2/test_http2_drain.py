"""Rule 17, drain: a drain or a SIGUSR2 retirement sends GOAWAY; streams already open (a
request in flight, a tunnel) finish under the drain rules; a stream opened after the GOAWAY
is refused; the connection closes when its streams are done."""

from __future__ import annotations

import threading

import h2.errors
import h2.events
import pytest

from tests.support.configs import config_yaml, listener, route
from tests.support.h2_clients import H2Peer, WsOverH2
from tests.support.peers import RawConn
from tests.support.wire import ok_response


@pytest.mark.parametrize("how", ["drain", "retire"])
def test_goaway_on_drain_and_open_streams_finish(make_proxy, raw_upstream, ws_upstream, how):
    release = threading.Event()

    def slow(conn: RawConn) -> None:
        conn.read_head()
        release.wait(10)
        conn.send(ok_response(b"late but answered"))

    slow_up, echo_up = raw_upstream(slow), ws_upstream()
    proxy = make_proxy(
        config_yaml({"slow": slow_up.port, "echo": echo_up.port},
                    [route("slow", path_prefix="/slow"), route("echo")],
                    listen=listener(http2=True), timeouts={"drain": 30})
    )  # fmt: skip
    client = H2Peer(proxy.address)
    tunnel = client.websocket("/ws")
    assert client.head(tunnel)[b":status"] == b"200"
    ws = WsOverH2(client, tunnel)
    pending = client.request("/slow/x")
    assert slow_up.accept().sock  # the request is upstream, waiting
    if how == "drain":
        proxy.drain()
    else:
        proxy.call(proxy.proxy.retire, 30.0)
    assert client.until(lambda: client.goaway() is not None)
    goaway = client.goaway()
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == pending
    late = client.request("/after-goaway")
    assert client.until(lambda: bool(client.of(late, h2.events.StreamReset)))
    release.set()
    assert client.response(pending)[::2] == (200, b"late but answered")
    ws.send("still open")
    assert ws.recv() == "still open"
    assert not client.closed
    client.send(tunnel, b"", end=True)
    assert client.until(lambda: client.closed, timeout=15)
