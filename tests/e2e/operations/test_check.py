"""`check` reports every problem of a config (file, line, field, why, a "did you mean"), exits 1
and never listens; `run` on the same file exits 2 with the same messages, in its log format,
and never listens either. `check` also catches what `run` would fail on at start."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import threading
from pathlib import Path

import pytest
import trustme

from tests.support.clients import (
    LOOPBACK,
    free_port,
)
from tests.support.configs import proxy_yaml, write_file
from tests.support.processes import CONSOLE, PY_M, ROOT, clean_env, run_cli

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


GOOD = proxy_yaml(1)  # a valid config, for the files below that break it


# name -> (file content, or None: missing / "DIR": a directory; the line the problem names)
UNUSABLE: dict[str, tuple[bytes | str | None, int | None]] = {
    "missing": (None, None),
    "directory": ("DIR", None),
    "yaml-syntax": ('listen:\n  - address: "127.0.0.1:0"\n\tupstreams: {}\n', 3),
    "unclosed-flow": ('listen: [{address: "127.0.0.1:0"}\nupstreams: {}\n', None),
    "empty": ("", None),
    "only-comments": ("# nothing to see\n", None),
    "a-list": ("- listen\n- upstreams\n", 1),
    "a-scalar": ("just a string\n", 1),
    "not-utf8": (b'listen: "\xff\xfe"\n', None),
    "nul-byte": (GOOD + "\x00\n", None),
    "two-documents": (GOOD + "---\nlisten: []\n", GOOD.count("\n") + 1),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_config_file_run_exits_2_check_exits_1(case, tmp_path):
    """A config that fails validation never starts the proxy: exit code 2 with the same
    messages as `check`. `check` ... print every problem (file, line, field, why) and exit 1.
    Never starts listening."""
    content, line = UNUSABLE[case]
    path = tmp_path / "proxy.yaml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    checked = run_cli("check", "--config", str(path), command=PY_M)
    ran = run_cli("run", "--config", str(path), "--log-format", "json", timeout=20, command=CONSOLE)
    check_out = checked.stdout + checked.stderr
    # `--log-format json` applies to every line `run` writes; config problems on stderr only.
    assert ran.stdout == ""
    run_out = "\n".join(json.loads(x)["msg"] for x in ran.stderr.splitlines())
    assert checked.returncode == 1, check_out
    assert ran.returncode == 2, run_out
    for out in (check_out, run_out):
        assert "Traceback" not in out, out
        assert str(path) in out, out
        if line is not None:
            assert re.search(rf"^{re.escape(str(path))}:{line}: ", out, re.M), out
    assert "listening" not in run_out
    # The same messages: every problem `run` printed is one `check` printed.
    problems = [x for x in run_out.splitlines() if x.startswith(str(path))]
    assert problems
    assert set(problems) <= set(check_out.splitlines()), (problems, check_out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_file(tmp_path):
    """A config that fails validation never starts the proxy: exit code 2."""
    path = tmp_path / "proxy.yaml"
    path.write_text(GOOD)
    path.chmod(0)
    assert run_cli("check", "--config", str(path), command=PY_M).returncode == 1
    ran = run_cli("run", "--config", str(path), command=PY_M)
    assert ran.returncode == 2
    assert str(path) in ran.stderr
    assert "Traceback" not in ran.stderr


def test_check_never_listens(tmp_path):
    """`upgradeproxy check --config FILE`: validate the file and exit 0 ... Never starts
    listening. (Its listener and admin ports are held by someone else: still exit 0.)"""
    with socket.create_server((LOOPBACK, 0)) as held, socket.create_server((LOOPBACK, 0)) as adm:
        port, admin = held.getsockname()[1], adm.getsockname()[1]
        path = write_file(tmp_path / "proxy.yaml", proxy_yaml(1, listen=port, admin=admin))
        for entry in (PY_M, CONSOLE):
            result = run_cli("check", "--config", str(path), command=entry)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Traceback" not in result.stdout + result.stderr


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


def test_check_reports_bad_edge_values_with_file_and_line(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        proxy_yaml(
            9000,
            route={"allowed_origins": ["https://chat.example.com/ws", "chat.example.com"]},
            upstream={"proxy_protocol": "v3"},
            timeouts={"tunnel_max_lifetime": "500ms"},
            limits={"max_connections_per_ip": -1},
            drain_tunnels="later",
        )
    )
    done = run_cli("check", "--config", str(path))
    assert done.returncode == 1, done
    lines = [line for line in done.stderr.splitlines() if line.startswith(str(path))]
    for field in (
        "routes[0].allowed_origins[0]",
        "routes[0].allowed_origins[1]",
        "upstreams.app.proxy_protocol",
        "timeouts.tunnel_max_lifetime",
        "limits.max_connections_per_ip",
        "drain_tunnels",
    ):
        assert any(f"{path}:" in line and f": {field}: " in line for line in lines), (field, lines)
    assert "Traceback" not in done.stderr
