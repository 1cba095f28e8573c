"""Edge TLS (issue 11, item 6): version floor, SNI certificates, client certificates on
listeners, and a client certificate towards upstreams; trustme certificates, real handshakes."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.access_log import access_records
from tests.support.certs import client_context, server_context, write_ca, write_pair
from tests.support.clients import LOOPBACK, read_response
from tests.support.configs import listener, proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_proxy_yaml(upstream_port: int, **tls: Any) -> str:
    """One upstream behind a TLS listener with these `tls` keys."""
    return proxy_yaml(upstream_port, listen=listener(tls=tls))


def pair(files: tuple[Path, Path], **more: Any) -> dict[str, Any]:
    return {"cert": str(files[0]), "key": str(files[1]), **more}


def request(ctx: ssl.SSLContext, address: tuple[str, int], sni: str = "localhost") -> int:
    with (
        socket.create_connection(address, timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        return read_response(sock)[0]


def peer_san(ctx: ssl.SSLContext, address: tuple[str, int], sni: str) -> list[str]:
    ctx.check_hostname = False
    with (
        socket.create_connection(address, timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as sock,
    ):
        cert = sock.getpeercert()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


@pytest.fixture
def localhost_pair(ca, tmp_path) -> tuple[Path, Path]:
    return write_pair(ca.issue_cert("localhost"), tmp_path, "proxy")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_default_min_version_refuses_a_tls_1_1_client(make_proxy, raw_upstream, ca, localhost_pair):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(tls_proxy_yaml(up.port, **pair(localhost_pair)))
    old = client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_1,
                     maximum_version=ssl.TLSVersion.TLSv1_1)  # fmt: skip
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that our own client is willing to offer 1.1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(old, proxy.address)
    assert request(client_context(ca), proxy.address) == 200


def test_min_version_tls_1_3_refuses_a_tls_1_2_client(make_proxy, raw_upstream, ca, localhost_pair):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(tls_proxy_yaml(up.port, **pair(localhost_pair), min_version="TLSv1.3"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2), proxy.address)
    assert request(client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_3), proxy.address) == 200


def test_ciphers_limit_what_tls_1_2_clients_can_use(make_proxy, raw_upstream, ca, localhost_pair):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(tls_proxy_yaml(up.port, **pair(localhost_pair), ciphers="ECDHE+AESGCM"))
    chacha = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    chacha.set_ciphers("ECDHE+CHACHA20")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(chacha, proxy.address)
    aes = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    aes.set_ciphers("ECDHE+AESGCM")
    assert request(aes, proxy.address) == 200


def test_sni_picks_the_certificate(make_proxy, raw_upstream, ca, tmp_path):
    up = raw_upstream(respond_ok_forever)
    default = write_pair(ca.issue_cert("default.test"), tmp_path, "default")
    chat = write_pair(ca.issue_cert("chat.test"), tmp_path, "chat")
    games = write_pair(ca.issue_cert("*.games.test"), tmp_path, "games")
    named = write_pair(ca.issue_cert("unrelated.test"), tmp_path, "named")
    certificates = [pair(default), pair(chat), pair(games), pair(named, names=["api.test"])]
    proxy = make_proxy(tls_proxy_yaml(up.port, certificates=certificates))
    ctx = client_context(ca)
    assert peer_san(ctx, proxy.address, "chat.test") == ["chat.test"]
    assert peer_san(ctx, proxy.address, "CHAT.test") == ["chat.test"]
    assert peer_san(ctx, proxy.address, "eu.games.test") == ["*.games.test"]
    assert peer_san(ctx, proxy.address, "a.eu.games.test") == ["default.test"]  # one label only
    assert peer_san(ctx, proxy.address, "api.test") == ["unrelated.test"]  # by `names`
    assert peer_san(ctx, proxy.address, "other.test") == ["default.test"]
    assert request(client_context(ca), proxy.address, sni="chat.test") == 200


@pytest.fixture
def client_auth_proxy(make_proxy, raw_upstream, ca, localhost_pair, tmp_path):
    def make(mode: str):
        up = raw_upstream(respond_ok_forever)
        clients_ca = write_ca(ca, tmp_path / "clients-ca.pem")
        tls = pair(localhost_pair, client_ca=str(clients_ca), client_auth=mode)
        return make_proxy(tls_proxy_yaml(up.port, **tls)), up

    return make


def with_client_cert(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_context(ca)
    ca.issue_cert("alice.example", common_name="alice").configure_cert(ctx)
    return ctx


def test_client_auth_require(client_auth_proxy, ca, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy.access")
    proxy, up = client_auth_proxy("require")
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        request(client_context(ca), proxy.address)  # TLS 1.3: refused at the first read
    stranger = trustme.CA()  # a certificate from a CA the listener does not trust
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        request(_foreign(ca, stranger), proxy.address)
    assert request(with_client_cert(ca), proxy.address) == 200
    head = up.accept().heads[0]
    (subject,) = [line for line in head.split(b"\r\n") if line.startswith(b"X-Client-Cert-Subject")]
    assert subject.startswith(b"X-Client-Cert-Subject: CN=alice,")
    assert eventually(lambda: access_records(caplog))  # written just after the response
    (line,) = access_records(caplog)
    assert line["client_cert"] == subject.split(b": ", 1)[1].decode()


def _foreign(trusted: trustme.CA, stranger: trustme.CA) -> ssl.SSLContext:
    ctx = client_context(trusted)
    stranger.issue_cert("mallory.example", common_name="mallory").configure_cert(ctx)
    return ctx


def test_client_auth_request_lets_a_client_without_cert_in(client_auth_proxy, ca):
    proxy, up = client_auth_proxy("request")
    assert request(client_context(ca), proxy.address) == 200
    with (
        socket.create_connection(proxy.address, timeout=5) as raw,
        client_context(ca).wrap_socket(raw, server_hostname="localhost") as sock,
    ):  # a forged subject header from a client without a certificate is dropped
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-Subject: CN=admin\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert all(b"X-Client-Cert-Subject" not in h for c in up.conns for h in c.heads)
    assert request(with_client_cert(ca), proxy.address) == 200
    heads = [head for conn in up.conns for head in conn.heads]
    assert b"X-Client-Cert-Subject: CN=alice," in heads[-1]


def test_upstream_sees_the_client_certificate_the_proxy_presents(make_proxy, ca, tmp_path):
    """`upstreams.*.tls.cert/key`: an upstream that requires client certificates gets ours."""
    server_ctx = server_context(ca)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server = socket.create_server((LOOPBACK, 0))
    seen: list[dict] = []

    def serve() -> None:
        raw, _ = server.accept()
        with server_ctx.wrap_socket(raw, server_side=True) as sock:
            seen.append(sock.getpeercert())
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(4096)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            sock.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ours = write_pair(ca.issue_cert("proxy.internal", common_name="proxy"), tmp_path, "c")
    ca_path = write_ca(ca, tmp_path / "ca.pem")
    port = server.getsockname()[1]
    proxy = make_proxy(proxy_yaml(port, upstream={"tls": pair(ours, ca=str(ca_path))}))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock)[0] == 200
    server.close()
    subject = dict(rdn[0] for rdn in seen[0]["subject"])
    assert subject["commonName"] == "proxy"
