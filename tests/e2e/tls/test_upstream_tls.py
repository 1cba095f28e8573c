"""TLS towards upstreams: `tls: {verify: true, ca: FILE}` speaks TLS to the server; a certificate
that does not verify is a connect failure (502), never a tunnel."""

from __future__ import annotations

import socket

import trustme
from websockets.sync.client import connect

from tests.support.certs import server_context, write_ca
from tests.support.clients import read_response
from tests.support.configs import proxy_yaml


def _proxy_to_tls_upstream(make_proxy, ws_upstream, trusted, issuer, tmp_path):
    """A proxy whose upstream speaks TLS with a cert from `issuer`, verified against `trusted`."""
    up = ws_upstream(ssl=server_context(issuer))
    ca_path = write_ca(trusted, tmp_path / "ca.pem")
    return make_proxy(proxy_yaml(up.port, upstream={"tls": {"verify": True, "ca": str(ca_path)}}))


def test_tls_to_upstream_with_verification(make_proxy, ws_upstream, ca, tmp_path):
    """Upstream `tls: {verify: true, ca: FILE}`: the proxy speaks TLS to the upstream."""
    proxy = _proxy_to_tls_upstream(make_proxy, ws_upstream, ca, ca, tmp_path)
    with connect(proxy.url("/up-tls")) as ws:
        ws.send("to a tls upstream")
        assert ws.recv() == "to a tls upstream"


def test_tls_upstream_with_untrusted_cert_is_502(make_proxy, ws_upstream, ca, tmp_path):
    """An upstream certificate that does not verify is a connect failure: 502, not a tunnel."""
    untrusted = trustme.CA()  # signs the upstream's cert; the proxy trusts only `ca`
    proxy = _proxy_to_tls_upstream(make_proxy, ws_upstream, ca, untrusted, tmp_path)
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, _ = read_response(sock)
    assert status == 502
