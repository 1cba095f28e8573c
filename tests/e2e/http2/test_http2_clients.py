"""Rule 17 with everyday clients: httpx (its `h2` stack) and Debian's curl (nghttp2), over TLS
with ALPN and in cleartext with prior knowledge."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from tests.support.certs import client_context, tls_pair
from tests.support.configs import h2_yaml
from tests.support.peers import RawConn, respond_ok_forever
from tests.support.wire import ok_response

CURL = shutil.which("curl")
if CURL is None and os.environ.get("CI"):
    raise RuntimeError("curl is missing: tests/run.sh installs it")


def _echo_body(conn: RawConn) -> None:
    while True:
        head = conn.read_head()
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")),
            0,
        )  # fmt: skip
        conn.send(ok_response(conn.read_exactly(length) if length else b"ok"))


def test_httpx_over_tls(make_proxy, raw_upstream, tmp_path):
    up = raw_upstream(_echo_body)
    tls, ca = tls_pair(tmp_path)
    proxy = make_proxy(h2_yaml(up.port, tls=tls))
    with httpx.Client(http2=True, verify=client_context(ca, ["h2", "http/1.1"])) as client:
        url = f"https://localhost:{proxy.port}"
        got = client.get(f"{url}/a")
        assert (got.http_version, got.status_code, got.text) == ("HTTP/2", 200, "ok")
        posted = client.post(f"{url}/b", content=b"x" * 100_000)
        assert posted.content == b"x" * 100_000
        assert posted.http_version == "HTTP/2"


def test_httpx_prior_knowledge(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    with httpx.Client(http1=False, http2=True) as client:
        got = client.get(f"http://127.0.0.1:{proxy.port}/a")
    assert (got.http_version, got.status_code) == ("HTTP/2", 200)


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_http2_over_tls(make_proxy, raw_upstream, tmp_path):
    up = raw_upstream(respond_ok_forever)
    tls, ca = tls_pair(tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = make_proxy(h2_yaml(up.port, tls=tls))
    out = subprocess.run(
        [CURL, "-sS", "--http2", "--cacert", str(ca_file), "-w", "\n%{http_version}",
         f"https://localhost:{proxy.port}/curl"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert out.splitlines() == ["ok", "2"]


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_http2_prior_knowledge(make_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    proxy = make_proxy(h2_yaml(up.port))
    out = subprocess.run(
        [CURL, "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}",
         f"http://127.0.0.1:{proxy.port}/curl"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert out.splitlines() == ["ok", "2"]
