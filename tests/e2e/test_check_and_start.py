"""`check` catches what `run` would fail on; start errors name the field (issue 11, item 3)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.conftest import (
    LOOPBACK,
    RawUpstream,
    free_port,
    raw_client,
    read_response,
    respond_ok_forever,
    run_cli,
)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.pop("UPGRADEPROXY_CONFIG", None)
    return out


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    ca = trustme.CA()
    good = ca.issue_cert("proxy.example.com")
    good.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    good.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.issue_cert("x.example.com").private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    expired = ca.issue_cert("old.example.com", not_after=datetime.datetime(2022, 1, 2, 3, 4, 5))
    expired.cert_chain_pems[0].write_to_path(str(tmp_path / "old.pem"))
    expired.private_key_pem.write_to_path(str(tmp_path / "old-key.pem"))
    return tmp_path


def config(directory: Path, tls: str, port: int, admin: str = "") -> Path:
    path = directory / "proxy.yaml"
    path.write_text(
        f"listen:\n  - address: '127.0.0.1:{port}'\n  - address: '127.0.0.1:{port + 1}'\n"
        f"    tls: {tls}\n{admin}"
        "upstreams:\n  app:\n    servers: ['127.0.0.1:9']\nroutes:\n  - upstream: app\n"
    )
    return path


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ("{cert: cert.pem, key: cert.pem}", "listen[1].tls.key: {d}/cert.pem: not a private key"),
        ("{cert: cert.pem, key: other.pem}",
         "listen[1].tls.key: {d}/other.pem: does not match the certificate in {d}/cert.pem"),
    ],
)  # fmt: skip
def test_check_fails_on_what_run_would_fail_on(certs: Path, tls: str, message: str) -> None:
    """Regression (issue 11): `check` printed `ok` for a key file that is the certificate."""
    path = config(certs, tls, 8443)
    checked = run_cli("check", "--config", str(path), env=env())
    assert checked.returncode == 1
    assert f"{path}:4: {message.format(d=certs)}" in checked.stdout.splitlines()[0]
    ran = run_cli("run", "--config", str(path), "--log-format", "json", env=env())
    assert ran.returncode == 2
    assert message.format(d=certs) in json.loads(ran.stderr.splitlines()[0])["msg"]


def test_check_warns_about_an_expired_certificate_and_passes(certs: Path) -> None:
    path = config(certs, "{cert: old.pem, key: old-key.pem}", 8443)
    checked = run_cli("check", "--config", str(path), env=env())
    assert checked.returncode == 0, checked.stdout
    warning, ok = checked.stdout.splitlines()
    assert warning == (
        f"{path}:4: listen[1].tls.cert: warning: {certs}/old.pem: certificate expired on "
        "2022-01-02 03:04:05 UTC"
    )
    assert ok.startswith(f"{path}: ok")


def test_check_reports_an_admin_address_beside_missing_files(certs: Path) -> None:
    path = config(
        certs, "{cert: nope.pem, key: key.pem}", 8443, "admin: {address: '127.0.0.1:8443'}\n"
    )
    checked = run_cli("check", "--config", str(path), env=env())
    assert checked.returncode == 1
    fields = [line.split(": ")[1] for line in checked.stdout.splitlines()]
    assert sorted(fields) == ["admin.address", "listen[1].tls.cert"]


@pytest.mark.parametrize("which", ["listen", "admin"])
def test_address_in_use_names_the_field(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen_port = port if which == "listen" else free_port()
        path = tmp_path / "proxy.yaml"
        path.write_text(
            f"listen:\n  - address: '127.0.0.1:{free_port()}'\n"
            f"  - address: '127.0.0.1:{listen_port}'\nadmin: {{address: '127.0.0.1:{port}'}}\n"
            "upstreams:\n  app:\n    servers: ['127.0.0.1:9']\nroutes:\n  - upstream: app\n"
        ) if which == "admin" else path.write_text(
            f"listen:\n  - address: '127.0.0.1:{free_port()}'\n"
            f"  - address: '127.0.0.1:{listen_port}'\n"
            "upstreams:\n  app:\n    servers: ['127.0.0.1:9']\nroutes:\n  - upstream: app\n"
        )
        ran = run_cli("run", "--config", str(path), "--log-format", "json", env=env())
    assert ran.returncode == 1
    (line,) = [json.loads(x) for x in ran.stderr.splitlines() if "cannot start" in x]
    field = "listen[1].address" if which == "listen" else "admin.address"
    assert line["msg"] == f"cannot start: {field} 127.0.0.1:{port}: address already in use"


def test_log_level_warning_drops_info_lines_but_keeps_the_access_log(tmp_path: Path) -> None:
    up = RawUpstream(respond_ok_forever)
    port = free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"listen:\n  - address: '127.0.0.1:{port}'\n"
        f"upstreams:\n  app:\n    servers: ['127.0.0.1:{up.port}']\nroutes:\n  - upstream: app\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "upgradeproxy", "run", "--config", str(path),
         "--log-format", "json", "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                sock = raw_client((LOOPBACK, port))
                break
            except OSError:
                time.sleep(0.05)
        with sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(sock)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        up.close()
    assert proc.returncode == 0
    assert out == b""
    lines = [json.loads(line) for line in err.decode().splitlines()]
    assert [line["msg"] for line in lines] == ["http"]  # no "listening", no "draining"
    assert lines[0]["path"] == "/x"
