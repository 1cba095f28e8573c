"""Contract section "Command line" from outside: `python -m upgradeproxy` and the installed console
script as subprocesses (usage, version, the config from --config or the environment, log
formats and levels on stderr, SIGTERM).

Every wait is bounded and every process started here is killed with its process group."""

from __future__ import annotations

import importlib.metadata
import json
import re
import signal
import socket

import pytest

from tests.support.clients import (
    LOOPBACK,
    accepts,
    free_port,
    http,
    raw_client,
    read_response,
    recv_exactly,
    refused,
    ws_upgrade,
)
from tests.support.configs import config_yaml, proxy_yaml, route, write_file
from tests.support.peers import echo_after_switch, named, respond_ok_forever
from tests.support.processes import CONSOLE, CONSOLE_SCRIPT, PY_M, clean_env, run_cli
from tests.support.waiting import WAIT, eventually

ENTRY_POINTS = pytest.mark.parametrize("entry", [PY_M, CONSOLE], ids=["python-m", "console"])


@ENTRY_POINTS
def test_usage_errors_exit_nonzero_with_usage_and_no_traceback(entry):
    """| command | what it does | -- only `run`, `check`, `demo` and `--version` exist: anything
    else is a usage error (exit 2, a usage line on stderr), never a traceback."""
    for args in ([], ["bogus"], ["run", "--log-format", "xml"], ["check", "--no-such-flag"]):
        result = run_cli(*args, command=entry)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage:" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr, args


def test_version_and_selftest_through_the_console_script():
    """`upgradeproxy --version` | the version. `--selftest` runs one scripted round trip through
    it, prints the handshake and the result, and exits 0/1. (Both through the installed
    `upgradeproxy` script, the way a user runs them.)"""
    assert CONSOLE_SCRIPT.exists(), CONSOLE_SCRIPT
    installed = importlib.metadata.version("upgradeproxy")
    outputs = []
    for entry in (CONSOLE, PY_M):
        result = run_cli("--version", command=entry)
        assert result.returncode == 0, result.stderr
        assert installed in result.stdout
        assert re.fullmatch(r"upgradeproxy \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    selftest = run_cli("demo", "--selftest", "--log-format", "json", command=CONSOLE)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "HTTP/1.1 101 Switching Protocols" in selftest.stdout
    assert "Traceback" not in selftest.stdout + selftest.stderr


def test_run_without_any_config_is_an_error():
    """`--config` may be left out when `UPGRADEPROXY_CONFIG` names the file (and only then)."""
    for entry in (PY_M, CONSOLE):
        result = run_cli("run", command=entry)
        assert result.returncode == 2, result.stderr
        assert "--config" in result.stderr
        assert "UPGRADEPROXY_CONFIG" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_reads_the_env_var_and_config_flag_wins(spawn, tmp_path, raw_upstream):
    """`upgradeproxy run --config FILE`: `--config` may be left out when `UPGRADEPROXY_CONFIG`
    names the file. (When both are given, the explicit `--config` is the one used.)"""
    up = raw_upstream(respond_ok_forever)
    port_a, port_b = free_port(), free_port()
    file_a = write_file(tmp_path / "a.yaml", proxy_yaml(up.port, listen=port_a))
    file_b = write_file(tmp_path / "b.yaml", proxy_yaml(up.port, listen=port_b))
    env = clean_env(UPGRADEPROXY_CONFIG=str(file_a))

    only_env = spawn([*CONSOLE, "run", "--log-format", "json"], env=env)
    listening = only_env.wait_log("listening")[0]
    assert listening["addresses"] == [f"{LOOPBACK}:{port_a}"]
    assert http(port_a)[0] == 200
    # SIGHUP re-reads the file the variable names.
    write_file(file_a, proxy_yaml(up.port, listen=port_a) + "timeouts: {idle: 5s\n")  # broken
    only_env.signal(signal.SIGHUP)
    rejected = only_env.wait_record(lambda r: str(r.get("msg")).startswith("reload rejected"))
    assert str(file_a) in rejected[0]["msg"]
    only_env.signal(signal.SIGTERM)
    assert only_env.wait_exit() == 0

    both = spawn([*PY_M, "run", "--config", str(file_b), "--log-format", "json"], env=env)
    listening = both.wait_log("listening")[0]
    assert listening["addresses"] == [f"{LOOPBACK}:{port_b}"]
    assert http(port_b)[0] == 200
    assert refused(port_a)
    both.signal(signal.SIGTERM)
    assert both.wait_exit() == 0


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z +info +upgradeproxy: listening")


def test_log_format_is_text_on_a_tty_json_when_asked(run_proxy, tmp_path, raw_upstream):
    """Logs go to stderr; `--log-format json|text` (default text on a TTY, json otherwise)."""
    up = raw_upstream(respond_ok_forever)
    config = write_file(tmp_path / "proxy.yaml", proxy_yaml(up.port))

    on_tty = run_proxy(config, tty=True, log_format=None)
    first = on_tty.lines()[0]
    assert TEXT_LINE.match(first), first
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    on_tty.signal(signal.SIGTERM)
    assert on_tty.wait_exit() == 0
    assert on_tty.stdout_lines() == []  # nothing on stdout

    forced = run_proxy(config, "--log-format", "json", tty=True)
    assert json.loads(forced.lines()[0])["msg"] == "listening"
    forced.signal(signal.SIGTERM)
    assert forced.wait_exit() == 0


def test_text_log_access_lines_carry_every_field(run_proxy, raw_upstream):
    """Logs go to stderr; `--log-format ... text`. One line per HTTP exchange and one per closed
    tunnel: time, client address, method, host, path, route, upstream server, status, bytes
    each way, duration, and for tunnels the protocol."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch())
    port = free_port()
    proc = run_proxy(
        config_yaml({"web": web.port, "chat": chat.port},
                    [route("chat", path_prefix="/ws"), route("web")], listen=port),
        "--log-format", "text",
    )  # fmt: skip
    assert http(port, "/page", host="text.test")[0] == 200
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        buf = ws_upgrade(sock, "/ws/room")
        sock.sendall(b"12345")
        assert recv_exactly(sock, 5, buf) == b"12345"
    exchange = proc.wait_line(lambda line: "/page" in line)
    tunnel = proc.wait_line(lambda line: " tunnel " in line and "/ws/room" in line)
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert proc.stdout_lines() == []  # logs go to stderr, nothing to stdout
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
    for line, status, upstream, server in (
        (exchange, 200, "web", web.port), (tunnel, 101, "chat", chat.port),
    ):  # fmt: skip
        assert re.match(stamp, line), line
        for field in (
            f"client={LOOPBACK}", "method=GET", f"status={status}", f"upstream={upstream}",
            f"server={LOOPBACK}:{server}",
        ):  # fmt: skip
            assert field in line, (field, line)
        for key in ("host", "path", "route", "bytes_in", "bytes_out", "duration"):
            assert re.search(rf"\b{key}=\S", line), (key, line)
    assert "host=text.test" in exchange
    assert "path=/page" in exchange
    assert "protocol=websocket" in tunnel
    assert "bytes_in=5" in tunnel
    assert "bytes_out=5" in tunnel


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b\d+\.\d+(\.\d+)?\b", result.stdout + result.stderr)


def test_run_serves_logs_json_and_stops_on_sigterm(raw_upstream, run_proxy):
    up = raw_upstream(named(b"from upstream"))
    port = free_port()
    proxy = run_proxy(proxy_yaml(up.port, listen=port, timeouts={"drain": 2}), log_format=None)
    assert http(port, "/hello")[::2] == (200, b"from upstream")

    access = proxy.wait_line(lambda line: '"/hello"' in line and '"status"' in line)
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0
    # Not a TTY: every stderr line is a JSON object.
    records = [json.loads(line) for line in proxy.lines() if line.strip()]
    assert records
    assert all(isinstance(r, dict) for r in records)
    record = json.loads(access)
    assert record["status"] == 200
    assert record["method"] == "GET"
    assert record["path"] == "/hello"
    assert record["upstream"] == "app"
    assert "route" in record
    assert record["route"]


def test_no_access_log_silences_only_the_access_log(raw_upstream, run_proxy):
    """`run --no-access-log` writes no access lines; other logs (listening, draining) remain."""
    up = raw_upstream(named(b"quiet"))
    port = free_port()
    config = proxy_yaml(up.port, listen=port, timeouts={"drain": 2})
    proxy = run_proxy(config, "--no-access-log", log_format=None)
    assert http(port, "/hello")[::2] == (200, b"quiet")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0
    records = [json.loads(line) for line in proxy.lines() if line.strip()]
    assert any(r["msg"] == "listening" for r in records)
    assert not [r for r in records if r["logger"] == "upgradeproxy.access"]


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
