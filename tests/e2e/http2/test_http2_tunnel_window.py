"""Rule 17, flow control of a tunnel: an accepted extended CONNECT's stream may hold 256 KiB
of the client's bytes (a request's 64 KiB), so bulk bytes cost a WINDOW_UPDATE per 128 KiB;
a refused one, and every request, keeps RFC 9113's initial 64 KiB; the connection's window
covers every stream's at once."""

from __future__ import annotations

from tests.support.configs import h2_yaml
from tests.support.h2_clients import H2Peer, WsOverH2
from tests.support.peers import respond_ok_forever

TUNNEL_WINDOW = 262144
REQUEST_WINDOW = 65535


def test_an_accepted_tunnel_may_send_256_kib_ahead(make_proxy, ws_upstream):
    up = ws_upstream()
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    sid = client.websocket("/chat")
    assert client.head(sid)[b":status"] == b"200"
    assert client.until(lambda: client.conn.local_flow_control_window(sid) == TUNNEL_WINDOW)
    ws = WsOverH2(client, sid)
    big = bytes(range(256)) * 4096  # 1 MiB: the window is credited back as the upstream reads
    ws.send(big)
    assert ws.recv() == big


def test_a_refused_tunnel_and_a_request_keep_64_kib(make_proxy, raw_upstream):
    def refuse(conn):  # type: ignore[no-untyped-def]
        conn.read_head()
        conn.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")

    refusing = raw_upstream(refuse)
    client = H2Peer(make_proxy(h2_yaml(refusing.port)).address)
    tunnel = client.websocket("/chat")
    upload = client.request("/upload", method="POST", end=False)
    assert client.response(tunnel)[0] == 403
    assert client.conn.local_flow_control_window(tunnel) == REQUEST_WINDOW
    assert client.conn.local_flow_control_window(upload) == REQUEST_WINDOW


def test_the_connection_window_covers_every_tunnel_at_once(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    status, _, body = client.response(client.request("/first"))  # the proxy's SETTINGS are in
    assert (status, body) == (200, b"ok")
    streams = client.conn.remote_settings.max_concurrent_streams
    assert client.conn.outbound_flow_control_window == streams * TUNNEL_WINDOW
