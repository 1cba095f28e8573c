"""Errors at start name the field: an address in use (a listener or the admin), and with
`workers` the parent that binds the sockets exits 1 before any worker starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.support.clients import (
    LOOPBACK,
    free_port,
)
from tests.support.configs import config_yaml, proxy_yaml, route, write_file
from tests.support.peers import respond_ok_forever
from tests.support.processes import run_cli


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


def test_port_in_use_with_workers_exits_1_before_any_worker_starts(
    run_proxy, raw_upstream, tmp_path
):
    """A port held without SO_REUSEPORT: the parent, which binds the listeners for its
    workers, cannot bind it and exits 1 naming the address; no worker is started."""
    web = raw_upstream(respond_ok_forever)
    with socket.create_server((LOOPBACK, 0)) as holder:
        port = holder.getsockname()[1]
        text = config_yaml({"web": web.port}, [route("web")], listen=[port], workers=2)
        proc = run_proxy(text, ready=False)
        assert proc.wait_exit() == 1
    proc.wait_log(f"cannot start: listen[0].address {LOOPBACK}:{port}: address already in use")
    assert not proc.matching(lambda line: line["msg"] == "worker ready")
