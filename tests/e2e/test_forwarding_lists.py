"""Forwarding headers as lists (rule 4): several X-Forwarded-For fields, Via on responses."""

from __future__ import annotations

import pytest

from tests.support.clients import raw_client, read_response, read_response_head
from tests.support.configs import FAST_DRAIN, proxy_yaml
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.wire import elements

# --- rule 4: forwarding ---------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_several_x_forwarded_for_fields(make_proxy, raw_upstream, trusted):
    """Rule 4: "Client-supplied ones are replaced, unless the peer is in `trusted_proxies`, in
    which case the proxy appends to them." Several `X-Forwarded-For` fields are one list (RFC
    9110 §5.3): appended to in order when trusted, replaced when not."""
    up = raw_upstream(respond_ok_forever)
    keys = {"trusted_proxies": ["127.0.0.0/8"]} if trusted else {}
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN, **keys))
    with raw_client(proxy.address) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\n"
            b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nForwarded: for=9.9.9.9\r\n\r\n"
        )
        assert read_response(sock)[0] == 200
    head = up.accept().heads[0]
    xff = elements(head, b"x-forwarded-for")
    if trusted:
        assert xff == [b"1.1.1.1", b"2.2.2.2", b"3.3.3.3", b"127.0.0.1"], head
    else:
        assert xff == [b"127.0.0.1"], head
        assert b"9.9.9.9" not in head


def test_via_appended_on_the_response(make_proxy, raw_upstream):
    """Rule 4 / RFC 9110 §7.6.3: each intermediary appends its own `Via` element, after those
    already present; README: "`Via` is always appended ..., on requests and responses"."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(b"HTTP/1.1 200 OK\r\nVia: 1.1 backend-lb\r\nContent-Length: 2\r\n\r\nok")

    up = raw_upstream(handler)
    proxy = make_proxy(proxy_yaml(up.port, timeouts=FAST_DRAIN))
    with raw_client(proxy.address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_response_head(sock)
    via = elements(head, b"via")
    assert len(via) == 2, head
    assert via[0] == b"1.1 backend-lb", head
