"""Rule 18 on HTTP/2 tunnels (RFC 8441): a route's `websocket` block reads the frames of an
extended CONNECT stream's tunnel as it does an HTTP/1.1 one: counts, limits, Close frames."""

from __future__ import annotations

import logging
import queue
from typing import Any

import h2.events
from websockets.exceptions import ConnectionClosed

from tests.support.access_log import access_records
from tests.support.configs import h2_yaml
from tests.support.h2_clients import H2Peer, WsOverH2
from tests.support.waiting import WAIT, eventually
from tests.support.ws_frames import close_code, frames_of

BLOCK = {"websocket": {"max_frame_bytes": 100}}


def recording_echo(closes: queue.Queue[int | None]) -> Any:
    async def handler(ws: Any) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        closes.put(ws.close_code)

    return handler


def test_messages_over_http2_are_counted(make_proxy, ws_upstream, caplog):
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = ws_upstream()
    proxy = make_proxy(h2_yaml(up.port, route=BLOCK))
    client = H2Peer(proxy.address)
    sid = client.websocket("/h2-counted")
    assert client.head(sid)[b":status"] == b"200"
    ws = WsOverH2(client, sid)
    for message in ("one", b"two", "three"):
        ws.send(message)
        assert ws.recv() == message
    client.send(sid, b"", end=True)  # END_STREAM: the upstream sees the half-close
    assert eventually(lambda: access_records(caplog, "tunnel"))
    (line,) = access_records(caplog, "tunnel")
    assert (line["http_version"], line["messages_in"], line["messages_out"]) == ("2", 3, 3)


def test_a_violation_over_http2_closes_both_sides(make_proxy, ws_upstream, caplog):
    """The stream's client gets Close 1009 in its DATA, on a frame boundary; the upstream a
    masked Close 1001; the log line says `policy` and the rule."""
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    closes: queue.Queue[int | None] = queue.Queue()
    up = ws_upstream(recording_echo(closes))
    proxy = make_proxy(h2_yaml(up.port, route=BLOCK))
    client = H2Peer(proxy.address)
    sid = client.websocket("/h2-over")
    assert client.head(sid)[b":status"] == b"200"
    ws = WsOverH2(client, sid)
    ws.send("fits")
    assert ws.recv() == "fits"
    ws.send(b"x" * 101)
    assert client.until(lambda: client.finished(sid), WAIT)
    data = b"".join(e.data for e in client.of(sid, h2.events.DataReceived))
    got = frames_of(data, masked=False)
    assert [f.data for f in got[:-1]] == [b"fits"]
    assert close_code(got[-1]) == 1009
    assert closes.get(timeout=WAIT) == 1001  # `websockets` fails unmasked client frames
    assert eventually(lambda: access_records(caplog, "tunnel"))
    (line,) = access_records(caplog, "tunnel")
    assert (line["first_close"], line["messages_in"]) == ("policy", 1)
    assert "max_frame_bytes" in line["error"]
