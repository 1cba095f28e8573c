"""Rule 17, abuse: rapid reset (CVE-2023-44487), CONTINUATION floods (CVE-2024-27316), PING
and SETTINGS floods, oversized header blocks get GOAWAY and a close, with no upstream request
per reset stream and other clients served meanwhile; a client that stops reading, or sends
nothing, meets `timeouts.idle`."""

from __future__ import annotations

import contextlib
import logging

import h2.errors
import h2.events
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.support.access_log import access_records
from tests.support.configs import h2_yaml
from tests.support.h2_clients import H2Peer
from tests.support.peers import respond_ok_forever
from tests.support.waiting import eventually


def _served(proxy) -> bool:
    """A sentinel client on its own connection gets its answer."""
    other = H2Peer(proxy.address)
    try:
        return other.response(other.request("/sentinel"))[0] == 200
    finally:
        other.close()


def _calmed(client: H2Peer) -> bool:
    assert client.until(lambda: client.goaway() is not None or client.closed)
    goaway = client.goaway()
    return goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_gets_goaway_without_an_upstream_request_per_stream(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    for _ in range(20):  # 20 writes of 50 open-and-reset streams each
        for _ in range(50):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                sid,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"a"),
                    (b":path", b"/reset"),
                ],
                end_stream=True,
            )
            client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        try:
            client.flush()
        except OSError:
            break
    assert _calmed(client)
    assert client.until(lambda: client.closed)
    assert _served(proxy)
    resets = sum(h.startswith(b"GET /reset ") for c in up.conns for h in c.heads)
    assert resets < 50  # 1000 streams reset; at most a few reached a stream task


def test_continuation_flood_gets_goaway(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    block = client.conn.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/c")]
    )
    headers = HeadersFrame(1)
    headers.data = block
    frames = [headers.serialize()]
    for _ in range(2000):
        frame = ContinuationFrame(1)
        frame.data = b""
        frames.append(frame.serialize())
    with contextlib.suppress(OSError):
        client.send_raw(b"".join(frames))
    assert client.until(lambda: client.closed)
    assert client.goaway() is not None
    assert _served(proxy)
    assert not any(c.heads for c in up.conns if c.heads and c.heads[0].startswith(b"GET /c "))


def test_ping_flood_gets_goaway(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    pings = []
    for i in range(1000):
        frame = PingFrame(0)
        frame.opaque_data = i.to_bytes(8, "big")
        pings.append(frame.serialize())
    with contextlib.suppress(OSError):
        client.send_raw(b"".join(pings))
    assert _calmed(client)
    assert _served(proxy)


def test_settings_flood_gets_goaway(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    client = H2Peer(proxy.address)
    frame = SettingsFrame(0)
    frame.settings = {SettingsFrame.MAX_FRAME_SIZE: 16384}
    with contextlib.suppress(OSError):
        client.send_raw(frame.serialize() * 1000)
    assert _calmed(client)
    assert _served(proxy)


def test_a_header_block_over_max_request_header_bytes_gets_goaway(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, limits={"max_request_header_bytes": 4096}))
    client = H2Peer(proxy.address)
    client.request("/big", extra=[(b"x-big", b"v" * 8000)])
    assert _calmed(client)
    assert client.until(lambda: client.closed)
    assert _served(proxy)
    assert [h.split(b" ")[1] for c in up.conns for h in c.heads] == [b"/sentinel"]


def test_a_client_that_never_reads_gets_timeouts_idle(make_proxy, raw_upstream, caplog):
    """Window 0: the response's DATA cannot leave; after `timeouts.idle` the stream is reset
    (as an HTTP/1.1 client that stops reading is cut off), and the log says why."""
    caplog.set_level(logging.INFO, "upgradeproxy.access")
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, timeouts={"idle": 0.5}))
    client = H2Peer(proxy.address, window=0)
    sid = client.request("/stuck")
    assert client.until(lambda: bool(client.of(sid, h2.events.StreamReset)))
    assert not client.data(sid)
    assert eventually(lambda: access_records(caplog))
    assert "stopped reading" in access_records(caplog)[0]["error"]


def test_an_idle_connection_is_closed_after_timeouts_idle(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, timeouts={"idle": 0.3}))
    client = H2Peer(proxy.address)
    assert client.response(client.request("/one"))[0] == 200
    assert client.until(lambda: client.closed)
    goaway = client.goaway()
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR


def test_a_silent_connection_is_closed_after_request_header(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port, timeouts={"request_header": 0.3, "idle": 60}))
    client = H2Peer(proxy.address)
    assert client.until(lambda: client.closed)


def test_streams_beyond_max_concurrent_streams_are_refused(make_proxy, raw_upstream):
    silent = raw_upstream(lambda conn: conn.read_until_close(30))
    proxy = make_proxy(h2_yaml(silent.port, limits={"http2_max_concurrent_streams": 2}))
    client = H2Peer(proxy.address)
    assert client.until(lambda: client.conn.remote_settings.max_concurrent_streams == 2)
    first = [client.request(f"/s{i}") for i in range(2)]
    # A third, sent raw past the client library (which honours the limit).
    block = client.conn.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/s2")]
    )
    frame = HeadersFrame(first[-1] + 2)
    frame.data = block
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    client.send_raw(frame.serialize())
    assert client.until(lambda: client.goaway() is not None or client.closed)
    assert len(silent.conns) <= 2
