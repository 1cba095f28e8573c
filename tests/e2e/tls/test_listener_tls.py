"""TLS on a listener: it terminates TLS (the upstream sees https), drops a plaintext client without
harming the next, keeps its version floor and cipher list, and picks a certificate by SNI."""

from __future__ import annotations

import socket
import ssl

import pytest
from websockets.sync.client import connect

from tests.support.certs import client_context, tls_keys, write_pair
from tests.support.clients import tls_get
from tests.support.configs import listener, proxy_yaml
from tests.support.peers import respond_ok_forever


def test_tls_listener_terminates_and_sets_proto_https(make_proxy, ws_upstream, ca, listener_tls):
    """`tls:` on a listener terminates TLS; upstream sees X-Forwarded-Proto: https."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls=listener_tls)))
    with connect(proxy.url("/secure", scheme="wss"), ssl=client_context(ca)) as ws:
        ws.send("over tls")
        assert ws.recv() == "over tls"
    assert up.requests[0].headers["X-Forwarded-Proto"] == "https"


def test_tls_listener_rejects_plaintext_without_harming_others(
    make_proxy, ws_upstream, ca, listener_tls
):
    """A client speaking plain HTTP to a TLS listener is dropped; the next TLS client is fine."""
    up = ws_upstream()
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls=listener_tls)))
    with socket.create_connection(proxy.address, timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := plain.recv(4096):
            data += chunk
        assert b"HTTP/1.1 200" not in data
    with connect(proxy.url("/", scheme="wss"), ssl=client_context(ca)) as ws:
        ws.send("still fine")
        assert ws.recv() == "still fine"


def peer_san(ctx: ssl.SSLContext, address: tuple[str, int], sni: str) -> list[str]:
    ctx.check_hostname = False
    with (
        socket.create_connection(address, timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as sock,
    ):
        cert = sock.getpeercert()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_default_min_version_refuses_a_tls_1_1_client(make_proxy, raw_upstream, ca, listener_tls):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls=listener_tls)))
    old = client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_1,
                     maximum_version=ssl.TLSVersion.TLSv1_1)  # fmt: skip
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that our own client is willing to offer 1.1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(old, proxy.address)
    assert tls_get(client_context(ca), proxy.address) == 200


def test_min_version_tls_1_3_refuses_a_tls_1_2_client(make_proxy, raw_upstream, ca, listener_tls):
    up = raw_upstream(respond_ok_forever)
    tls = {**listener_tls, "min_version": "TLSv1.3"}
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls=tls)))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2), proxy.address)
    assert tls_get(client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_3), proxy.address) == 200


def test_ciphers_limit_what_tls_1_2_clients_can_use(make_proxy, raw_upstream, ca, listener_tls):
    up = raw_upstream(respond_ok_forever)
    tls = {**listener_tls, "ciphers": "ECDHE+AESGCM"}
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls=tls)))
    chacha = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    chacha.set_ciphers("ECDHE+CHACHA20")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(chacha, proxy.address)
    aes = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    aes.set_ciphers("ECDHE+AESGCM")
    assert tls_get(aes, proxy.address) == 200


def test_sni_picks_the_certificate(make_proxy, raw_upstream, ca, tmp_path):
    up = raw_upstream(respond_ok_forever)
    default = write_pair(ca.issue_cert("default.test"), tmp_path, "default")
    chat = write_pair(ca.issue_cert("chat.test"), tmp_path, "chat")
    games = write_pair(ca.issue_cert("*.games.test"), tmp_path, "games")
    named = write_pair(ca.issue_cert("unrelated.test"), tmp_path, "named")
    certificates = [tls_keys(default), tls_keys(chat), tls_keys(games),
                    tls_keys(named, names=["api.test"])]  # fmt: skip
    proxy = make_proxy(proxy_yaml(up.port, listen=listener(tls={"certificates": certificates})))
    ctx = client_context(ca)
    assert peer_san(ctx, proxy.address, "chat.test") == ["chat.test"]
    assert peer_san(ctx, proxy.address, "CHAT.test") == ["chat.test"]
    assert peer_san(ctx, proxy.address, "eu.games.test") == ["*.games.test"]
    assert peer_san(ctx, proxy.address, "a.eu.games.test") == ["default.test"]  # one label only
    assert peer_san(ctx, proxy.address, "api.test") == ["unrelated.test"]  # by `names`
    assert peer_san(ctx, proxy.address, "other.test") == ["default.test"]
    assert tls_get(client_context(ca), proxy.address, sni="chat.test") == 200
