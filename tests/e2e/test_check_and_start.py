"""`check` catches what `run` would fail on; start errors name the field (issue 11, item 3)."""

from __future__ import annotations

import datetime
import json
import signal
import socket
from pathlib import Path

import pytest
import trustme

from tests.support.clients import LOOPBACK, accepts, free_port, raw_client, read_response
from tests.support.configs import proxy_yaml, write_file
from tests.support.peers import respond_ok_forever
from tests.support.processes import run_cli
from tests.support.waiting import eventually


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
    """By hand: the problems are checked on line 4 (the `tls:` of the second listener)."""
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
    checked = run_cli("check", "--config", str(path))
    assert checked.returncode == 1
    assert f"{path}:4: {message.format(d=certs)}" in checked.stdout.splitlines()[0]
    ran = run_cli("run", "--config", str(path), "--log-format", "json")
    assert ran.returncode == 2
    assert message.format(d=certs) in json.loads(ran.stderr.splitlines()[0])["msg"]


def test_check_warns_about_an_expired_certificate_and_passes(certs: Path) -> None:
    path = config(certs, "{cert: old.pem, key: old-key.pem}", 8443)
    checked = run_cli("check", "--config", str(path))
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
    checked = run_cli("check", "--config", str(path))
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
        admin = port if which == "admin" else None
        path = write_file(
            tmp_path / "proxy.yaml", proxy_yaml(9, listen=[free_port(), listen_port], admin=admin)
        )
        ran = run_cli("run", "--config", str(path), "--log-format", "json")
    assert ran.returncode == 1
    (line,) = [json.loads(x) for x in ran.stderr.splitlines() if "cannot start" in x]
    field = "listen[1].address" if which == "listen" else "admin.address"
    assert line["msg"] == f"cannot start: {field} 127.0.0.1:{port}: address already in use"


def test_log_level_warning_drops_info_lines_but_keeps_the_access_log(run_proxy, raw_upstream):
    up = raw_upstream(respond_ok_forever)
    port = free_port()
    # No `listening` line to wait for at this level: it is ready once it accepts.
    proc = run_proxy(proxy_yaml(up.port, listen=port), "--log-level", "warning", ready=False)
    assert eventually(lambda: accepts(port) or not proc.alive())
    with raw_client((LOOPBACK, port)) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock)[0] == 200
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert proc.stdout_lines() == []
    lines = [json.loads(line) for line in proc.lines()]
    assert [line["msg"] for line in lines] == ["http"]  # no "listening", no "draining"
    assert lines[0]["path"] == "/x"
