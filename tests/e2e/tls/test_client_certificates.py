"""Client certificates: a listener that requires or requests them (the subject goes upstream and
into the access log, a forged subject header never does), and the certificate the proxy
presents to an upstream that requires one."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

import pytest
import trustme

from tests.support.access_log import access_records
from tests.support.certs import client_context, server_context, tls_keys, write_ca, write_pair
from tests.support.clients import LOOPBACK, read_response, tls_get
from tests.support.configs import listener, proxy_yaml
from tests.support.peers import respond_ok_forever
from tests.support.waiting import eventually


@pytest.fixture
def client_auth_proxy(make_proxy, raw_upstream, ca, listener_tls, tmp_path):
    def make(mode: str):
        up = raw_upstream(respond_ok_forever)
        clients_ca = write_ca(ca, tmp_path / "clients-ca.pem")
        tls = {**listener_tls, "client_ca": str(clients_ca), "client_auth": mode}
        return make_proxy(proxy_yaml(up.port, listen=listener(tls=tls))), up

    return make


def with_client_cert(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_context(ca)
    ca.issue_cert("alice.example", common_name="alice").configure_cert(ctx)
    return ctx


def test_client_auth_require(client_auth_proxy, ca, caplog):
    caplog.set_level(logging.INFO, logger="upgradeproxy.access")
    proxy, up = client_auth_proxy("require")
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        tls_get(client_context(ca), proxy.address)  # TLS 1.3: refused at the first read
    stranger = trustme.CA()  # a certificate from a CA the listener does not trust
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        tls_get(_foreign(ca, stranger), proxy.address)
    assert tls_get(with_client_cert(ca), proxy.address) == 200
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
    assert tls_get(client_context(ca), proxy.address) == 200
    with (
        socket.create_connection(proxy.address, timeout=5) as raw,
        client_context(ca).wrap_socket(raw, server_hostname="localhost") as sock,
    ):  # a forged subject header from a client without a certificate is dropped
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-Subject: CN=admin\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert all(b"X-Client-Cert-Subject" not in h for c in up.conns for h in c.heads)
    assert tls_get(with_client_cert(ca), proxy.address) == 200
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
    proxy = make_proxy(proxy_yaml(port, upstream={"tls": tls_keys(ours, ca=str(ca_path))}))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock)[0] == 200
    server.close()
    subject = dict(rdn[0] for rdn in seen[0]["subject"])
    assert subject["commonName"] == "proxy"
