"""Signals on a running `upgradeproxy run`: SIGHUP storms and broken files keep the config in
force; a drain lets an upload and a pending upgrade finish.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading

from tests.support.clients import (
    LOOPBACK,
    closed_by_peer,
    free_port,
    http,
    read_response,
    read_response_head,
    recv_exactly,
    refused,
)
from tests.support.configs import proxy_yaml, write_file
from tests.support.peers import RawConn, echo, named
from tests.support.processes import Record
from tests.support.waiting import WAIT, eventually
from tests.support.wire import WS_HEADERS, ok_response, switching

# --- Signals -------------------------------------------------------------------------------


def test_sighup_storm_and_broken_files_keep_the_config_in_force(run_proxy, tmp_path, raw_upstream):
    """SIGHUP reloads the file: new connections use the new config ...; an invalid new file is
    logged and the old config stays in force. (Five SIGHUPs at once; then a deleted file, a
    YAML syntax error, an empty file: each logged, none stops the proxy.)"""
    first, second = raw_upstream(named(b"first")), raw_upstream(named(b"second"))
    port = free_port()
    path = write_file(tmp_path / "proxy.yaml", proxy_yaml(first.port, listen=port))
    proc = run_proxy(path)
    for _ in range(5):
        proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded")
    assert http(port)[2] == b"first"

    def rejected(count: int) -> list[Record]:
        return proc.wait_record(
            lambda r: str(r.get("msg", "")).startswith("reload rejected"), count
        )

    path.unlink()
    proc.signal(signal.SIGHUP)
    assert str(path) in rejected(1)[0]["msg"]
    assert http(port)[2] == b"first"

    write_file(path, proxy_yaml(second.port, listen=port) + "timeouts: {idle: 5\n")  # broken
    proc.signal(signal.SIGHUP)
    assert re.search(rf"{re.escape(str(path))}:\d+: ", rejected(2)[1]["msg"])
    assert http(port)[2] == b"first"

    write_file(path, "")
    proc.signal(signal.SIGHUP)
    assert str(path) in rejected(3)[2]["msg"]
    assert http(port)[2] == b"first"

    write_file(path, proxy_yaml(second.port, listen=port))
    before = len(proc.wait_log("reloaded"))
    proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded", count=before + 1)
    assert http(port)[2] == b"second"

    # A Kubernetes ConfigMap update: the file becomes a symlink swapped to a new target.
    target = write_file(tmp_path / "data-v2.yaml", proxy_yaml(first.port, listen=port))
    link = tmp_path / "proxy.yaml.link"
    link.symlink_to(target)
    link.replace(path)
    proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded", count=before + 2)
    assert http(port)[2] == b"first"
    assert proc.alive()
    assert not [r for r in proc.records() if "Traceback" in json.dumps(r)]
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_drain_lets_an_upload_and_a_pending_upgrade_finish(run_proxy, tmp_path, raw_upstream):
    """SIGTERM/SIGINT drain gracefully (stop accepting, `/readyz` turns 503, in-flight HTTP
    exchanges finish, open tunnels get `timeouts.drain` seconds, then everything closes,
    exit 0). In flight at the signal: a request whose body is half sent, and an upgrade whose
    upstream has not answered yet. A SIGHUP during the drain changes nothing."""
    upgrade_seen, release = threading.Event(), threading.Event()

    def upstream(conn: RawConn) -> None:
        head = conn.read_head()
        if head.startswith(b"POST"):
            conn.send(ok_response(b"got " + conn.read_exactly(10, timeout=WAIT)))
            return
        upgrade_seen.set()
        release.wait(WAIT)
        conn.send(switching(head))  # the 101 only now, with the drain under way
        echo(conn)

    up, other = raw_upstream(upstream), raw_upstream(named(b"reloaded"))
    port, admin = free_port(), free_port()
    config = proxy_yaml(up.port, listen=port, admin=admin, timeouts={"drain": 2})
    proc = run_proxy(config)
    upload = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    upgrade = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    try:
        upload.sendall(b"POST /up HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10\r\n\r\n12345")
        upgrade.sendall(b"GET /ws HTTP/1.1\r\nHost: svc.test\r\n" + WS_HEADERS + b"\r\n")
        assert upgrade_seen.wait(WAIT)
        assert eventually(lambda: sum(1 for c in up.conns if c.heads) == 2)

        proc.signal(signal.SIGTERM)
        proc.wait_log("draining")
        proc.rewrite(proxy_yaml(other.port, listen=port, admin=admin))
        proc.signal(signal.SIGHUP)
        upload.sendall(b"67890")
        status, headers, body, _ = read_response(upload)
        assert (status, body) == (200, b"got 1234567890")
        assert headers.get(b"connection") == b"close"
        release.set()
        head, buf = read_response_head(upgrade)
        assert head.startswith(b"HTTP/1.1 101 "), head
        upgrade.sendall(b"still here")
        assert recv_exactly(upgrade, 10, buf) == b"still here"
        assert http(admin, "/readyz")[0] == 503
        assert http(admin, "/healthz")[0] == 200
        assert http(admin, "/metrics")[0] == 200
        assert refused(port)
        assert closed_by_peer(upgrade)  # cut at the drain deadline
    finally:
        upload.close()
        upgrade.close()
    assert proc.wait_exit() == 0
    assert not [r for r in proc.records() if r.get("msg") == "reloaded"]
    assert [r["first_close"] for r in proc.access() if r.get("msg") == "tunnel"] == ["cancelled"]
