"""The command line as a user runs it: `upgradeproxy` subprocesses, exit codes, logs, signals."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
from pathlib import Path

import pytest

from tests.support.clients import free_port, raw_client, read_response
from tests.support.configs import proxy_yaml
from tests.support.peers import named
from tests.support.processes import ROOT, clean_env, run_cli

EXAMPLE = ROOT / "config" / "upgradeproxy.yaml"


# A file with four independent problems, each on a known line.
BAD_CONFIG = """\
listen:
  - address: "127.0.0.1:notaport"
upstreams:
  app:
    servers: ["127.0.0.1:9000"]
routes:
  - upstream: missing
timeouts:
  conect: 5
  idle: "5 parsecs"
"""
# (line, field, a fragment of the why)
BAD_PROBLEMS = [
    (2, "listen[0].address", "port"),
    (7, "routes[0].upstream", "missing"),
    (9, "timeouts.conect", "connect"),
    (10, "timeouts.idle", "duration"),
]


def problem_lines(text: str, path: Path) -> list[str]:
    """The `file:line: field: why` lines (not a trailing summary)."""
    pattern = re.compile(rf"^{re.escape(str(path))}:\d+: ")
    return [line for line in text.splitlines() if pattern.match(line)]


def assert_every_problem(output: str, path: Path) -> None:
    for line_no, field, why in BAD_PROBLEMS:
        pattern = rf"^{re.escape(str(path))}:{line_no}: {re.escape(field)}: .*{re.escape(why)}"
        assert re.search(pattern, output, re.M), f"missing {field} problem in:\n{output}"


# --- version and check ------------------------------------------------------------------


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b\d+\.\d+(\.\d+)?\b", result.stdout + result.stderr)


def test_check_example_config():
    result = run_cli("check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert_every_problem(output, bad)
    assert "Traceback" not in output


def test_check_problems_are_on_stderr_and_on_a_separate_stdout(tmp_path):
    """`check` prints plain problem lines on stderr (where errors go) and, when stdout is
    another file, there too: a script reading either stream sees every problem."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    assert result.stdout == result.stderr
    assert problem_lines(result.stderr, bad) == result.stderr.splitlines()
    assert len(result.stderr.splitlines()) >= 4


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_run_problems_are_log_lines_on_stderr_only(tmp_path, log_format):
    """Issue 11: `run` writes its config problems in the chosen log format, on stderr only."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = run_cli("run", "--config", str(bad), "--log-format", log_format)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) >= 4
    if log_format == "json":
        messages = [json.loads(line)["msg"] for line in lines]
        assert {json.loads(line)["level"] for line in lines} == {"error"}
    else:
        messages = [re.sub(r"^\S+ error +upgradeproxy: ", "", line) for line in lines]
    assert problem_lines("\n".join(messages), bad) == messages


def test_check_typo_suggests_the_nearest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = run_cli("check", "--config", str(bad))
    (typo,) = [line for line in result.stdout.splitlines() if "conect" in line]
    assert "'connect'" in typo


def test_check_uses_env_var_when_config_absent(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    env = clean_env(UPGRADEPROXY_CONFIG=str(EXAMPLE))
    assert run_cli("check", env=env).returncode == 0
    env["UPGRADEPROXY_CONFIG"] = str(bad)
    result = run_cli("check", env=env)
    assert result.returncode == 1
    assert_every_problem(result.stdout + result.stderr, bad)
    # --config wins over the environment.
    assert run_cli("check", "--config", str(EXAMPLE), env=env).returncode == 0


# --- run ---------------------------------------------------------------------------------


def test_run_invalid_config_exits_2_with_the_same_messages(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    checked = run_cli("check", "--config", str(bad))
    ran = run_cli("run", "--config", str(bad), "--log-format", "json", timeout=20)
    assert ran.returncode == 2
    messages = "\n".join(json.loads(line)["msg"] for line in ran.stderr.splitlines())
    assert_every_problem(messages, bad)
    check_problems = problem_lines(checked.stdout, bad)
    run_problems = problem_lines(messages, bad)
    assert check_problems
    assert sorted(run_problems) == sorted(check_problems)
    assert "listening" not in ran.stderr


def test_run_invalid_config_never_listens(tmp_path):
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'listen:\n  - address: "127.0.0.1:{port}"\nupstreams:\n  app:\n'
        f'    servers: ["127.0.0.1:9000"]\nroutes:\n  - upstream: app\n'
        f'timeouts:\n  idle: "soon"\n'
    )
    stop = threading.Event()
    connected: list[bool] = []

    def probe() -> None:
        """Connects over and over for as long as the process runs (its exit ends the watch)."""
        while not stop.wait(0.005):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                connected.append(True)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        result = run_cli("run", "--config", str(bad), timeout=20)
    finally:
        stop.set()
        prober.join(5)
    assert result.returncode == 2
    assert f"{bad}:9: timeouts.idle:" in result.stderr
    assert connected == []


def config_text(port: int, upstream_port: int) -> str:
    return proxy_yaml(upstream_port, listen=port, timeouts={"drain": 2})


def get_on_port(port: int, path: bytes = b"/hello") -> tuple[int, bytes]:
    with raw_client(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body, _ = read_response(sock)
    return status, body


def test_run_serves_logs_json_and_stops_on_sigterm(raw_upstream, run_proxy):
    up = raw_upstream(named(b"from upstream"))
    port = free_port()
    proxy = run_proxy(config_text(port, up.port), log_format=None)
    assert get_on_port(port) == (200, b"from upstream")

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
    proxy = run_proxy(config_text(port, up.port), "--no-access-log", log_format=None)
    assert get_on_port(port) == (200, b"quiet")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0
    records = [json.loads(line) for line in proxy.lines() if line.strip()]
    assert any(r["msg"] == "listening" for r in records)
    assert not [r for r in records if r["logger"] == "upgradeproxy.access"]


def test_sighup_reloads_new_connections_use_new_config(tmp_path, raw_upstream, run_proxy):
    first = raw_upstream(named(b"first"))
    second = raw_upstream(named(b"second"))
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text(port, first.port))
    proxy = run_proxy(config, log_format=None)
    assert get_on_port(port) == (200, b"first")

    # An established keep-alive connection, opened before the reload.
    established = raw_client(("127.0.0.1", port))
    established.sendall(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(established)[2] == b"first"

    config.write_text(config_text(port, second.port))
    proxy.signal(signal.SIGHUP)
    proxy.wait_line(lambda line: "reload" in line.lower())
    assert get_on_port(port) == (200, b"second")
    # Established connections are untouched: still the old config.
    established.sendall(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(established)[2] == b"first"
    established.close()

    # An invalid file is logged and the config in force stays.
    config.write_text(config_text(port, second.port) + "  idle: forever\n")
    proxy.signal(signal.SIGHUP)
    rejected = proxy.wait_line(lambda line: "timeouts.idle" in line)
    assert json.loads(rejected)["level"] in ("error", "warning")
    assert get_on_port(port) == (200, b"second")
    assert proxy.alive()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0
