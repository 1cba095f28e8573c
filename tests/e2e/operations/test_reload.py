"""SIGHUP reloads the config file: new connections use the new config while established ones
keep theirs (a tunnel outlives its listener); an invalid file, a port that cannot be bound, a
deleted or empty file, five signals at once: each logged, none changes the config in force."""

from __future__ import annotations

import json
import re
import signal
import socket

from tests.support.clients import (
    LOOPBACK,
    Tunnel,
    free_port,
    http,
    raw_client,
    read_response,
    refused,
)
from tests.support.configs import config_yaml, proxy_yaml, route, write_file
from tests.support.peers import echo_after_switch, named
from tests.support.processes import Record
from tests.support.waiting import eventually


def test_sighup_reloads_new_connections_use_new_config(tmp_path, raw_upstream, run_proxy):
    first = raw_upstream(named(b"first"))
    second = raw_upstream(named(b"second"))
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(proxy_yaml(first.port, listen=port, timeouts={"drain": 2}))
    proxy = run_proxy(config, log_format=None)
    assert http(port, "/hello")[::2] == (200, b"first")

    # An established keep-alive connection, opened before the reload.
    established = raw_client(("127.0.0.1", port))
    established.sendall(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(established)[2] == b"first"

    config.write_text(proxy_yaml(second.port, listen=port, timeouts={"drain": 2}))
    proxy.signal(signal.SIGHUP)
    proxy.wait_line(lambda line: "reload" in line.lower())
    assert http(port, "/hello")[::2] == (200, b"second")
    # Established connections are untouched: still the old config.
    established.sendall(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(established)[2] == b"first"
    established.close()

    # An invalid file is logged and the config in force stays.
    broken = proxy_yaml(second.port, listen=port, timeouts={"drain": 2}) + "  idle: forever\n"
    config.write_text(broken)  # timeouts.idle: forever
    proxy.signal(signal.SIGHUP)
    rejected = proxy.wait_line(lambda line: "timeouts.idle" in line)
    assert json.loads(rejected)["level"] in ("error", "warning")
    assert http(port, "/hello")[::2] == (200, b"second")
    assert proxy.alive()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0


def test_tunnel_outlives_reloads_that_move_routes_and_listeners(run_proxy, raw_upstream):
    """After SIGHUP new connections use the new upstream and listeners (admin included); a
    tunnel opened before keeps its upstream, even once its listener is gone."""
    a, b = raw_upstream(echo_after_switch(b"A")), raw_upstream(echo_after_switch(b"B"))
    first, second, admin, moved = free_port(), free_port(), free_port(), free_port()
    proc = run_proxy(config_yaml({"chat": a.port}, [route("chat")], listen=[first]))
    old = Tunnel(first, tag=1)
    assert old.tag == b"A"

    proc.rewrite(
        config_yaml({"chat": b.port}, [route("chat")], listen=[first, second], admin=admin,
                    timeouts={"tunnel_idle": 600}, limits={"max_connections": 50})
    )  # fmt: skip
    proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded")
    assert (Tunnel(first, tag=1).tag, Tunnel(second, tag=1).tag) == (b"B", b"B")
    assert http(admin, "/healthz")[0] == 200
    assert old.echo(b"after the reload") == b"after the reload"

    proc.rewrite(config_yaml({"chat": b.port}, [route("chat")], listen=[second], admin=moved))
    proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded", count=2)
    assert eventually(lambda: refused(first))
    assert eventually(lambda: refused(admin))
    assert http(moved, "/readyz")[0] == 200
    assert Tunnel(second, tag=1).tag == b"B"
    assert old.echo(b"listener gone") == b"listener gone"


def test_invalid_reload_logs_every_problem_and_keeps_the_old_routes(run_proxy, raw_upstream):
    """A file that fails validation, or names a port that cannot be bound, changes nothing."""
    a, b = raw_upstream(echo_after_switch(b"A")), raw_upstream(echo_after_switch(b"B"))
    port = free_port()
    good = config_yaml({"chat": a.port}, [route("chat")], listen=[port])
    proc = run_proxy(good)
    proc.rewrite(good.replace("upstream: chat", "upstream: nope") + "listne: []\n")
    proc.signal(signal.SIGHUP)
    rejected = proc.wait_record(lambda line: line["msg"].startswith("reload rejected: "), count=2)
    assert any("nope" in line["msg"] for line in rejected)
    assert any("listne" in line["msg"] and "listen" in line["msg"] for line in rejected)
    assert Tunnel(port, tag=1).tag == b"A"

    with socket.create_server((LOOPBACK, 0)) as holder:
        taken = holder.getsockname()[1]
        proc.rewrite(config_yaml({"chat": b.port}, [route("chat")], listen=[port, taken]))
        proc.signal(signal.SIGHUP)
        proc.wait_record(lambda line: line["msg"].startswith("reload failed, old config kept: "))
    assert Tunnel(port, tag=1).tag == b"A"
    assert not proc.matching(lambda line: line["msg"] == "reloaded")

    proc.rewrite(config_yaml({"chat": b.port}, [route("chat")], listen=[port]))
    proc.signal(signal.SIGHUP)
    proc.wait_log("reloaded")
    assert Tunnel(port, tag=1).tag == b"B"


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
