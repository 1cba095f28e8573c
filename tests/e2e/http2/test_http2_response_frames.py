"""Rule 17, a response's frames: END_STREAM rides on the last frame that carries something
(the HEADERS of a bodiless answer, the last DATA of a body) rather than on an empty DATA frame
of its own; trailers still end the stream as a HEADERS frame; and reading ahead for the end
never holds back a chunk the upstream sent while it pauses."""

from __future__ import annotations

import threading

import h2.events

from tests.support.configs import h2_yaml
from tests.support.h2_clients import H2Peer
from tests.support.peers import RawConn
from tests.support.wire import ok_response


def _frames(client: H2Peer, sid: int) -> list[tuple[str, bytes, bool]]:
    """(kind, data, ends the stream) of each HEADERS and DATA the stream received."""
    out = []
    for event in client.of(sid):
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            out.append(("headers", b"", event.stream_ended is not None))
        elif isinstance(event, h2.events.DataReceived):
            out.append(("data", event.data, event.stream_ended is not None))
    return out


def _answer(response: bytes):  # type: ignore[no-untyped-def]
    def handler(conn: RawConn) -> None:
        while True:
            conn.read_head()
            conn.send(response)

    return handler


def test_a_sized_body_ends_on_its_last_data_frame(make_proxy, raw_upstream):
    up = raw_upstream(_answer(ok_response(b"hello")))
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    sid = client.request("/sized")
    assert client.response(sid)[0] == 200
    assert _frames(client, sid) == [("headers", b"", False), ("data", b"hello", True)]


def test_a_bodiless_answer_ends_on_its_headers(make_proxy, raw_upstream):
    up = raw_upstream(_answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    sid = client.request("/empty")
    assert client.response(sid)[0] == 204
    assert _frames(client, sid) == [("headers", b"", True)]


def test_upstream_trailers_end_the_stream_as_headers(make_proxy, raw_upstream):
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    up = raw_upstream(_answer(chunked))
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    sid = client.request("/trailers", extra=[(b"te", b"trailers")])
    assert client.response(sid)[0] == 200
    assert _frames(client, sid) == [
        ("headers", b"", False),
        ("data", b"hello", False),
        ("headers", b"", True),
    ]
    trailers = client.of(sid, h2.events.TrailersReceived)[0]
    assert (b"x-checksum", b"abc") in trailers.headers


def test_a_chunk_is_not_held_back_while_the_upstream_pauses(make_proxy, raw_upstream):
    """The first chunk reaches the client while the upstream still holds the rest (an event
    stream, a long poll): the proxy looks for the end only among bytes already read."""
    more = threading.Event()

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        assert more.wait(10)
        conn.send(b"4\r\nlast\r\n0\r\n\r\n")

    up = raw_upstream(handler)
    client = H2Peer(make_proxy(h2_yaml(up.port)).address)
    sid = client.request("/events")
    assert client.until(lambda: client.data(sid) == b"first")
    assert not client.finished(sid)
    more.set()
    assert client.response(sid)[0] == 200
    assert _frames(client, sid) == [
        ("headers", b"", False),
        ("data", b"first", False),
        ("data", b"last", True),
    ]
