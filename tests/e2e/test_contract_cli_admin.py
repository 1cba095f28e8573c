"""Contract sections "Command line", "Configuration (YAML)", "Admin endpoints" and "Access log",
attacked from outside: `python -m upgradeproxy` and the installed `upgradeproxy` console script
as subprocesses, real signals, real sockets on 127.0.0.1, hostile files and requests.

Every test's docstring quotes the contract sentence it checks. Every wait is bounded and every
process started here is killed (with its process group) even when a test fails.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import pty
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    LOOPBACK,
    RawConn,
    eventually,
    free_port,
    ok_response,
    read_response,
    read_response_head,
    recv_exactly,
    refused,
    respond_ok_forever,
)

WAIT = 10.0  # the bound on every wait; tests pass in a fraction of it
PY_M = [sys.executable, "-m", "upgradeproxy"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("upgradeproxy")
CONSOLE = [str(CONSOLE_SCRIPT)]
ENTRY_POINTS = pytest.mark.parametrize("entry", [PY_M, CONSOLE], ids=["python-m", "console"])

Record = dict[str, Any]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UPGRADEPROXY_CONFIG"}
    env.update(extra)
    return env


def cli(cmd: list[str], *args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=env or clean_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip


# --- a proxy process -------------------------------------------------------------------


class Proc:
    """A CLI process in its own session; stdout and stderr collected line by line.

    `tty=True` gives it a pseudo-terminal as stderr (stdout stays a pipe).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, tty: bool = False):
        self.err: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        self._open = 2
        master = slave = -1
        if tty:
            master, slave = pty.openpty()
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=slave if tty else subprocess.PIPE, env=env or clean_env(),
            start_new_session=True,
        )  # fmt: skip
        assert self.popen.stdout is not None
        threading.Thread(
            target=self._pump_file, args=(self.popen.stdout, self.out), daemon=True
        ).start()
        if tty:
            os.close(slave)
            threading.Thread(target=self._pump_fd, args=(master,), daemon=True).start()
        else:
            assert self.popen.stderr is not None
            threading.Thread(
                target=self._pump_file, args=(self.popen.stderr, self.err), daemon=True
            ).start()

    def _add(self, sink: list[str], text: str) -> None:
        with self._cond:
            sink.append(text.rstrip("\r\n"))
            self._cond.notify_all()

    def _done(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def _pump_file(self, stream: Any, sink: list[str]) -> None:
        for raw in stream:
            self._add(sink, raw.decode(errors="replace"))
        self._done()

    def _pump_fd(self, fd: int) -> None:
        buf = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._add(self.err, line.decode(errors="replace"))
        if buf:
            self._add(self.err, buf.decode(errors="replace"))
        os.close(fd)
        self._done()

    # JSON view of stderr
    def records(self) -> list[Record]:
        with self._cond:
            lines = list(self.err)
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"msg": line, "not_json": True}
            out.append(rec if isinstance(rec, dict) else {"msg": line, "not_json": True})
        return out

    def wait_err(self, match: Callable[[str], bool], timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.err:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self._open == 0 and self.popen.poll() is not None):
                    raise AssertionError("no such stderr line; stderr:\n" + "\n".join(self.err))
                self._cond.wait(min(left, 0.1))

    def wait_record(self, match: Callable[[Record], bool], count: int = 1) -> list[Record]:
        deadline = time.monotonic() + WAIT
        while True:
            found = [r for r in self.records() if match(r)]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline or (self._open == 0 and self.popen.poll() is not None):
                raise AssertionError(
                    f"{count} matching record(s) not logged; stderr:\n" + "\n".join(self.err)
                )
            with self._cond:
                self._cond.wait(0.1)

    def wait_msg(self, msg: str, count: int = 1, **fields: object) -> list[Record]:
        return self.wait_record(
            lambda r: r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items()), count
        )

    def access(self) -> list[Record]:
        return [r for r in self.records() if r.get("logger") == "upgradeproxy.access"]

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        code = self.popen.wait(timeout)
        with self._cond:  # let the readers drain what is left
            end = time.monotonic() + 5
            while self._open and time.monotonic() < end:
                self._cond.wait(0.1)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(WAIT)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """`spawn(argv, env=None, tty=False)`; every process is killed at the end of the test."""
    started: list[Proc] = []

    def make(argv: list[str], env: dict[str, str] | None = None, tty: bool = False) -> Proc:
        proc = Proc(argv, env, tty)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


def run_proxy(spawn: Callable[..., Proc], config: Path, *extra: str, entry: list[str] = PY_M,
              env: dict[str, str] | None = None, tty: bool = False) -> Proc:  # fmt: skip
    """`upgradeproxy run --config FILE --log-format json EXTRA`, once it logs `listening`."""
    fmt = (
        () if any(a.startswith("--log-format") for a in extra) or tty else ("--log-format", "json")
    )
    proc = spawn([*entry, "run", "--config", str(config), *fmt, *extra], env=env, tty=tty)
    proc.wait_err(lambda line: "listening" in line)
    return proc


# --- clients and upstreams -------------------------------------------------------------


def http(port: int, path: str = "/", *, host: str = "svc.test", method: str = "GET",
         extra: bytes = b"", addr: str = LOOPBACK, close: bool = True,
         ) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    with socket.create_connection((addr, port), timeout=WAIT) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"") + extra + b"\r\n"
        )  # fmt: skip
        status, headers, body, _ = read_response(sock)
    return status, headers, body


WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = base64.b64encode(
    hashlib.sha1(WS_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
)
WS_HEADERS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
)


def echo_after_switch(tag: bytes = b"") -> Callable[[RawConn], None]:
    """An upstream that accepts the WebSocket upgrade, sends `tag`, then echoes until EOF."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(SWITCH + tag)
        conn.sock.settimeout(None)
        while data := conn.sock.recv(65536):
            conn.sock.sendall(data)
        conn.close()

    return handler


def ws_upgrade(sock: socket.socket, path: str = "/ws", host: str = "svc.test") -> bytearray:
    """Send a WebSocket handshake on `sock`, expect a 101; returns bytes read past its head."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + WS_HEADERS + b"\r\n")
    head, buf = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return buf


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(WAIT)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def scrape(admin: int) -> dict[str, Any]:
    status, headers, body = http(admin, "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of samples `name` whose labels include `labels` (0 if none)."""
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def write(path: Path, text: str) -> Path:
    """Replace `path` atomically, as a deploy tool would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# --- Command line ------------------------------------------------------------------------


@ENTRY_POINTS
def test_usage_errors_exit_nonzero_with_usage_and_no_traceback(entry):
    """| command | what it does | -- only `run`, `check`, `demo` and `--version` exist: anything
    else is a usage error (exit 2, a usage line on stderr), never a traceback."""
    for args in ([], ["bogus"], ["run", "--log-format", "xml"], ["check", "--no-such-flag"]):
        result = cli(entry, *args)
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
        result = cli(entry, "--version")
        assert result.returncode == 0, result.stderr
        assert installed in result.stdout
        assert re.fullmatch(r"upgradeproxy \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    selftest = cli(CONSOLE, "demo", "--selftest", "--log-format", "json")
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "HTTP/1.1 101 Switching Protocols" in selftest.stdout
    assert "Traceback" not in selftest.stdout + selftest.stderr


GOOD = """\
listen:
  - address: "127.0.0.1:{port}"
upstreams:
  app:
    servers: ["127.0.0.1:{upstream}"]
routes:
  - upstream: app
"""

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
    "nul-byte": (GOOD.format(port=0, upstream=1) + "\x00\n", None),
    "two-documents": (GOOD.format(port=0, upstream=1) + "---\nlisten: []\n", 8),
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
    checked = cli(PY_M, "check", "--config", str(path))
    ran = cli(CONSOLE, "run", "--config", str(path), "--log-format", "json", timeout=20)
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
    path.write_text(GOOD.format(port=0, upstream=1))
    path.chmod(0)
    assert cli(PY_M, "check", "--config", str(path)).returncode == 1
    ran = cli(PY_M, "run", "--config", str(path))
    assert ran.returncode == 2
    assert str(path) in ran.stderr
    assert "Traceback" not in ran.stderr


def test_check_never_listens(tmp_path):
    """`upgradeproxy check --config FILE`: validate the file and exit 0 ... Never starts
    listening. (Its listener and admin ports are held by someone else: still exit 0.)"""
    with socket.create_server((LOOPBACK, 0)) as held, socket.create_server((LOOPBACK, 0)) as adm:
        port, admin = held.getsockname()[1], adm.getsockname()[1]
        path = write(
            tmp_path / "proxy.yaml",
            GOOD.format(port=port, upstream=1) + f'admin:\n  address: "127.0.0.1:{admin}"\n',
        )
        for entry in (PY_M, CONSOLE):
            result = cli(entry, "check", "--config", str(path))
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Traceback" not in result.stdout + result.stderr


def test_run_without_any_config_is_an_error():
    """`--config` may be left out when `UPGRADEPROXY_CONFIG` names the file (and only then)."""
    for entry in (PY_M, CONSOLE):
        result = cli(entry, "run")
        assert result.returncode == 2, result.stderr
        assert "--config" in result.stderr
        assert "UPGRADEPROXY_CONFIG" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_reads_the_env_var_and_config_flag_wins(spawn, tmp_path, raw_upstream):
    """`upgradeproxy run --config FILE`: `--config` may be left out when `UPGRADEPROXY_CONFIG`
    names the file. (When both are given, the explicit `--config` is the one used.)"""
    up = raw_upstream(respond_ok_forever)
    port_a, port_b = free_port(), free_port()
    file_a = write(tmp_path / "a.yaml", GOOD.format(port=port_a, upstream=up.port))
    file_b = write(tmp_path / "b.yaml", GOOD.format(port=port_b, upstream=up.port))
    env = clean_env(UPGRADEPROXY_CONFIG=str(file_a))

    only_env = spawn([*CONSOLE, "run", "--log-format", "json"], env=env)
    listening = only_env.wait_msg("listening")[0]
    assert listening["addresses"] == [f"{LOOPBACK}:{port_a}"]
    assert http(port_a)[0] == 200
    # SIGHUP re-reads the file the variable names.
    write(file_a, GOOD.format(port=port_a, upstream=up.port) + "timeouts: {idle: 5s\n")
    only_env.signal(signal.SIGHUP)
    rejected = only_env.wait_record(lambda r: str(r.get("msg")).startswith("reload rejected"))
    assert str(file_a) in rejected[0]["msg"]
    only_env.signal(signal.SIGTERM)
    assert only_env.wait_exit() == 0

    both = spawn([*PY_M, "run", "--config", str(file_b), "--log-format", "json"], env=env)
    listening = both.wait_msg("listening")[0]
    assert listening["addresses"] == [f"{LOOPBACK}:{port_b}"]
    assert http(port_b)[0] == 200
    assert refused(port_a)
    both.signal(signal.SIGTERM)
    assert both.wait_exit() == 0


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z +info +upgradeproxy: listening")


def test_log_format_is_text_on_a_tty_json_when_asked(spawn, tmp_path, raw_upstream):
    """Logs go to stderr; `--log-format json|text` (default text on a TTY, json otherwise)."""
    up = raw_upstream(respond_ok_forever)
    config = write(tmp_path / "proxy.yaml", GOOD.format(port=0, upstream=up.port))

    on_tty = run_proxy(spawn, config, tty=True)
    first = on_tty.err[0]
    assert TEXT_LINE.match(first), first
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    on_tty.signal(signal.SIGTERM)
    assert on_tty.wait_exit() == 0
    assert on_tty.out == []  # nothing on stdout

    forced = run_proxy(spawn, config, "--log-format", "json", tty=True)
    assert json.loads(forced.err[0])["msg"] == "listening"
    forced.signal(signal.SIGTERM)
    assert forced.wait_exit() == 0


def test_text_log_access_lines_carry_every_field(spawn, tmp_path, raw_upstream):
    """Logs go to stderr; `--log-format ... text`. One line per HTTP exchange and one per closed
    tunnel: time, client address, method, host, path, route, upstream server, status, bytes
    each way, duration, and for tunnels the protocol."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch())
    port = free_port()
    config = write(
        tmp_path / "proxy.yaml",
        f'listen:\n  - address: "127.0.0.1:{port}"\nupstreams:\n'
        f'  web:\n    servers: ["127.0.0.1:{web.port}"]\n'
        f'  chat:\n    servers: ["127.0.0.1:{chat.port}"]\n'
        "routes:\n  - path_prefix: /ws\n    upstream: chat\n  - upstream: web\n",
    )
    proc = run_proxy(spawn, config, "--log-format", "text")
    assert http(port, "/page", host="text.test")[0] == 200
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        buf = ws_upgrade(sock, "/ws/room")
        sock.sendall(b"12345")
        assert recv_exactly(sock, 5, buf) == b"12345"
    exchange = proc.wait_err(lambda line: "/page" in line)
    tunnel = proc.wait_err(lambda line: " tunnel " in line and "/ws/room" in line)
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert proc.out == []  # logs go to stderr, nothing to stdout
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


# --- Configuration -----------------------------------------------------------------------

CONTRACT_EXAMPLE = """\
listen:                          # one or more listeners
  - address: "127.0.0.1:8080"    # host:port; "[::1]:8080" for IPv6
    tls:                         # optional: terminate TLS here
      cert: certs/proxy.pem
      key: certs/proxy-key.pem
    proxy_protocol: false        # optional: expect a PROXY v1/v2 header from an L4 load balancer
admin:                           # optional: /healthz, /readyz, /metrics (Prometheus text)
  address: "127.0.0.1:9901"
workers: 1                       # optional: processes sharing the listeners (SO_REUSEPORT)
upstreams:
  chat:
    servers: ["127.0.0.1:9000", "127.0.0.1:9001"]   # or {address:, weight:} items
    balance: round_robin         # round_robin | least_conn
    tls: false                   # or {verify: true, ca: FILE, server_name: NAME}
routes:                          # first match wins; no match -> 404
  - host: "chat.example.com"     # optional; "*.example.com" matches one or more labels
    path_prefix: "/ws"           # optional, default "/"
    upstream: chat
    upgrade: ["websocket"]       # Upgrade protocols this route lets through; default ["websocket"];
                                 # [] means none. Any other offered protocol is stripped, and the
                                 # request goes upstream as a plain HTTP request.
timeouts:                        # seconds (numbers) or strings like "250ms", "5s", "1h"
  connect: 5                     # TCP (+TLS) connect to an upstream
  request_header: 10             # client must finish the request head within this
  upstream_response: 60          # upstream must start its response within this
  idle: 75                       # idle keep-alive HTTP connection
  tunnel_idle: 3600              # upgraded tunnel with no bytes either way
  drain: 30                      # grace for open tunnels on shutdown
limits:
  max_request_header_bytes: 16384
  max_connections: 10000         # per worker; beyond it new connections wait in the backlog
trusted_proxies: []              # CIDRs whose X-Forwarded-*/Forwarded headers are kept and extended
"""


def contract_certs(directory: Path) -> trustme.CA:
    """certs/proxy.pem and certs/proxy-key.pem next to the config, as the example names them."""
    ca = trustme.CA()
    cert = ca.issue_cert("chat.example.com")
    (directory / "certs").mkdir(exist_ok=True)
    cert.cert_chain_pems[0].write_to_path(str(directory / "certs" / "proxy.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(directory / "certs" / "proxy.pem"), append=True)
    cert.private_key_pem.write_to_path(str(directory / "certs" / "proxy-key.pem"))
    return ca


def test_contract_example_is_valid_verbatim_and_runs(spawn, tmp_path, raw_upstream):
    """The contract's YAML example, as written (the certificate files it names created next to
    it): `check` exits 0, and `run` (its ports moved to free ones) serves a WebSocket over its
    TLS listener and the admin endpoints."""
    ca = contract_certs(tmp_path)
    verbatim = write(tmp_path / "contract.yaml", CONTRACT_EXAMPLE)
    result = cli(CONSOLE, "check", "--config", str(verbatim))
    assert result.returncode == 0, result.stdout + result.stderr

    one, two = raw_upstream(echo_after_switch(b"!")), raw_upstream(echo_after_switch(b"!"))
    port, admin = free_port(), free_port()
    moved = (
        CONTRACT_EXAMPLE.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        .replace("127.0.0.1:9901", f"127.0.0.1:{admin}")
        .replace("127.0.0.1:9000", f"127.0.0.1:{one.port}")
        .replace("127.0.0.1:9001", f"127.0.0.1:{two.port}")
    )
    config = write(tmp_path / "moved.yaml", moved)
    proc = run_proxy(spawn, config)
    assert http(admin, "/healthz")[0] == 200
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def tls_client() -> ssl.SSLSocket:
        raw = socket.create_connection((LOOPBACK, port), timeout=WAIT)
        return context.wrap_socket(raw, server_hostname="chat.example.com")

    with tls_client() as tls:
        buf = ws_upgrade(tls, "/ws/room", host="chat.example.com")
        assert recv_exactly(tls, 1, buf) == b"!"
        tls.sendall(b"over tls")
        assert recv_exactly(tls, 8, buf) == b"over tls"
    with tls_client() as tls:
        tls.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")
        assert read_response(tls)[0] == 404  # no match -> 404
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


# (line, field, a fragment of the why): every level of the schema, all in one file.
NESTED_BAD = """\
listen:
  - address: "127.0.0.1:8080"
    tsl: {}
    proxy_protocol: "yes"
admin:
  adress: "127.0.0.1:9901"
workers: "two"
upstreams:
  chat:
    servers:
      - {address: "127.0.0.1:9000", wieght: 2}
      - address: "127.0.0.1:9001"
        weight: 0
    balance: random
    tls: {verfy: true, server_name: 5}
routes:
  - host: "chat.example.com"
    path_prefx: "/ws"
    upstream: chat
    upgrade: "websocket"
timeouts:
  connect: -1
  idle: "5 minutes"
  tunnel_idel: 3
limits:
  max_request_header_bytes: "big"
  max_conections: 5
trusted_proxies: ["not-a-cidr", "10.0.0.0/33"]
extra_top: 1
"""
NESTED_PROBLEMS = [
    (3, "listen[0].tsl", "'tls'"),
    (4, "listen[0].proxy_protocol", "true or false"),
    (6, "admin.adress", "'address'"),
    (7, "workers", "whole number"),
    (11, "upstreams.chat.servers[0].wieght", "'weight'"),
    (13, "upstreams.chat.servers[1].weight", "0"),
    (14, "upstreams.chat.balance", "round_robin"),
    (15, "upstreams.chat.tls.verfy", "'verify'"),
    (15, "upstreams.chat.tls.server_name", "hostname"),
    (18, "routes[0].path_prefx", "'path_prefix'"),
    (20, "routes[0].upgrade", "list"),
    (22, "timeouts.connect", "-1"),
    (23, "timeouts.idle", "5 minutes"),
    (24, "timeouts.tunnel_idel", "'tunnel_idle'"),
    (26, "limits.max_request_header_bytes", "big"),
    (27, "limits.max_conections", "'max_connections'"),
    (28, "trusted_proxies[0]", "not-a-cidr"),
    (28, "trusted_proxies[1]", "10.0.0.0/33"),
    (29, "extra_top", "unknown"),
]


def test_every_problem_at_every_level_with_its_line(tmp_path):
    """`check` ... print every problem (file, line, field, why) and exit 1. Unknown keys are
    errors (with the nearest valid name suggested), not silently ignored."""
    path = write(tmp_path / "bad.yaml", NESTED_BAD)
    result = cli(CONSOLE, "check", "--config", str(path))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    for line, field, why in NESTED_PROBLEMS:
        pattern = rf"^{re.escape(str(path))}:{line}: {re.escape(field)}: .*{re.escape(why)}"
        assert re.search(pattern, out, re.M), f"missing {line}: {field} in:\n{out}"
    assert "Traceback" not in out
    ran = cli(PY_M, "run", "--config", str(path))
    assert ran.returncode == 2
    for line, field, _ in NESTED_PROBLEMS:
        assert f"{path}:{line}: {field}: " in ran.stderr


def test_every_value_form_of_the_schema_runs(spawn, tmp_path, raw_upstream):
    """Config forms from the contract: `"[::1]:8080"` for IPv6; servers as `{address:, weight:}`
    items; upstream `tls: {verify: true, ca: FILE, server_name: NAME}`; `"*.example.com"`
    matches one or more labels; `[]` means none (the Upgrade offer is stripped and the request
    goes upstream as plain HTTP); timeouts as numbers or "250ms", "5s", "1h";
    `trusted_proxies` CIDRs whose X-Forwarded-* headers are kept and extended."""
    web = raw_upstream(respond_ok_forever)
    ca = contract_certs(tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "certs" / "ca.pem"))
    port4, port6 = free_port(), free_port(socket.AF_INET6)
    config = write(
        tmp_path / "proxy.yaml",
        f"""\
listen:
  - address: "[::1]:{port6}"
  - address: "127.0.0.1:{port4}"
    tls: false
    proxy_protocol: false
upstreams:
  web:
    servers:
      - {{address: "127.0.0.1:{web.port}", weight: 3}}
    balance: least_conn
    tls: false
  secure:
    servers: ["localhost:1", {{address: "127.0.0.1:2", weight: 1}}]
    tls: {{verify: true, ca: certs/ca.pem, server_name: chat.example.com}}
routes:
  - host: "*.example.com"
    upstream: web
    upgrade: []
  - host: "Exact.Test"
    path_prefix: "/ws"
    upstream: web
    upgrade: ["websocket", "h2c", "SPDY/3.1"]
timeouts:
  connect: "250ms"
  request_header: "5s"
  upstream_response: "1h"
  idle: 2.5
  tunnel_idle: "1h30m"
  drain: 1
limits:
  max_request_header_bytes: 8192
  max_connections: 100
trusted_proxies: ["10.0.0.0/8", "fd00::/8", "192.0.2.1", "::1/128"]
""",
    )
    assert cli(PY_M, "check", "--config", str(config)).returncode == 0
    proc = run_proxy(spawn, config)
    with socket.create_connection(("::1", port6), timeout=WAIT) as sock:
        sock.sendall(
            b"GET /any HTTP/1.1\r\nHost: a.b.example.com\r\n" + WS_HEADERS
            + b"X-Forwarded-For: 203.0.113.7\r\n\r\n"
        )  # fmt: skip
        assert read_response(sock)[0] == 200
    head = web.accept().heads[-1].lower()
    assert b"\r\nupgrade:" not in head  # upgrade: [] strips the offer
    assert b"sec-websocket-key: " + WS_KEY.lower() in head  # end-to-end headers pass
    assert re.search(rb"\r\nx-forwarded-for: 203\.0\.113\.7, ?::1\r\n", head), head
    assert http(port6, "/any", host="example.com", addr="::1")[0] == 404
    assert http(port4, "/ws/x", host="exact.test")[0] == 200
    assert http(port4, "/other", host="exact.test")[0] == 404
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


# --- Signals -------------------------------------------------------------------------------


def named(name: bytes) -> Callable[[RawConn], None]:
    def handler(conn: RawConn) -> None:
        while True:
            conn.read_head(timeout=30)
            conn.send(ok_response(name))

    return handler


def test_sighup_storm_and_broken_files_keep_the_config_in_force(spawn, tmp_path, raw_upstream):
    """SIGHUP reloads the file: new connections use the new config ...; an invalid new file is
    logged and the old config stays in force. (Five SIGHUPs at once; then a deleted file, a
    YAML syntax error, an empty file: each logged, none stops the proxy.)"""
    first, second = raw_upstream(named(b"first")), raw_upstream(named(b"second"))
    port = free_port()
    path = write(tmp_path / "proxy.yaml", GOOD.format(port=port, upstream=first.port))
    proc = run_proxy(spawn, path)
    for _ in range(5):
        proc.signal(signal.SIGHUP)
    proc.wait_msg("reloaded")
    assert http(port)[2] == b"first"

    def rejected(count: int) -> list[Record]:
        return proc.wait_record(
            lambda r: str(r.get("msg", "")).startswith("reload rejected"), count
        )

    path.unlink()
    proc.signal(signal.SIGHUP)
    assert str(path) in rejected(1)[0]["msg"]
    assert http(port)[2] == b"first"

    write(path, GOOD.format(port=port, upstream=second.port) + "timeouts: {idle: 5\n")
    proc.signal(signal.SIGHUP)
    assert re.search(rf"{re.escape(str(path))}:\d+: ", rejected(2)[1]["msg"])
    assert http(port)[2] == b"first"

    write(path, "")
    proc.signal(signal.SIGHUP)
    assert str(path) in rejected(3)[2]["msg"]
    assert http(port)[2] == b"first"

    write(path, GOOD.format(port=port, upstream=second.port))
    before = len(proc.wait_msg("reloaded"))
    proc.signal(signal.SIGHUP)
    proc.wait_msg("reloaded", count=before + 1)
    assert http(port)[2] == b"second"

    # A Kubernetes ConfigMap update: the file becomes a symlink swapped to a new target.
    target = write(tmp_path / "data-v2.yaml", GOOD.format(port=port, upstream=first.port))
    link = tmp_path / "proxy.yaml.link"
    link.symlink_to(target)
    link.replace(path)
    proc.signal(signal.SIGHUP)
    proc.wait_msg("reloaded", count=before + 2)
    assert http(port)[2] == b"first"
    assert proc.popen.poll() is None
    assert not [r for r in proc.records() if "Traceback" in json.dumps(r)]
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_drain_lets_an_upload_and_a_pending_upgrade_finish(spawn, tmp_path, raw_upstream):
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
        echo_after_switch_rest(conn)

    up, other = raw_upstream(upstream), raw_upstream(named(b"reloaded"))
    port, admin = free_port(), free_port()
    text = (
        GOOD.format(port=port, upstream=up.port)
        + f'admin:\n  address: "127.0.0.1:{admin}"\ntimeouts:\n  drain: 2\n'
    )
    path = write(tmp_path / "proxy.yaml", text)
    proc = run_proxy(spawn, path)
    upload = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    upgrade = socket.create_connection((LOOPBACK, port), timeout=WAIT)
    try:
        upload.sendall(b"POST /up HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10\r\n\r\n12345")
        upgrade.sendall(b"GET /ws HTTP/1.1\r\nHost: svc.test\r\n" + WS_HEADERS + b"\r\n")
        assert upgrade_seen.wait(WAIT)
        assert eventually(lambda: sum(1 for c in up.conns if c.heads) == 2)

        proc.signal(signal.SIGTERM)
        proc.wait_msg("draining")
        write(path, GOOD.format(port=port, upstream=other.port))
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


def echo_after_switch_rest(conn: RawConn) -> None:
    """The 101 and the echo of `echo_after_switch`, for a head already read."""
    conn.send(SWITCH)
    conn.sock.settimeout(None)
    with contextlib.suppress(OSError):
        while data := conn.sock.recv(65536):
            conn.sock.sendall(data)
    conn.close()


# --- Admin endpoints -------------------------------------------------------------------------


def admin_raw(admin: int, request: bytes) -> bytes:
    """Send `request` bytes to the admin listener, return everything until it closes."""
    with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def test_admin_paths_methods_and_garbage(spawn, tmp_path, raw_upstream):
    """`/healthz` 200 while the process runs. `/readyz` 200 while accepting. `/metrics` in
    Prometheus text format. (Anything else is a 404; a query string does not change the path;
    several requests share a keep-alive connection; garbage costs only its connection.)"""
    up = raw_upstream(respond_ok_forever)
    admin = free_port()
    config = write(
        tmp_path / "proxy.yaml",
        GOOD.format(port=0, upstream=up.port) + f'admin:\n  address: "127.0.0.1:{admin}"\n',
    )
    proc = run_proxy(spawn, config)
    for path in ("/", "/nope", "/healthz/x", "/metricsz", "/HEALTHZ"):
        assert http(admin, path)[0] == 404, path
    assert http(admin, "/healthz?probe=1")[0] == 200
    assert http(admin, "/readyz?verbose")[0] == 200
    with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
        first, _, _, rest = read_response(sock)
        assert (first, read_response(sock, rest)[0]) == (200, 200)
    reply = admin_raw(
        admin,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    assert re.match(rb"HTTP/1\.1 (200|405) ", reply), reply
    admin_raw(admin, b"\x16\x03\x01garbage\r\n\r\n")  # not HTTP: that connection ends
    assert http(admin, "/healthz")[0] == 200  # still serving after garbage
    assert proc.popen.poll() is None


def test_admin_head_answers_like_get(spawn, tmp_path, raw_upstream):
    """`/healthz` 200 while the process runs. `/readyz` 200 while accepting. `/metrics` in
    Prometheus text format. (A HEAD gets GET's status and headers: RFC 9110 §8.6, a server
    MUST NOT send a Content-Length in a HEAD response unless it equals GET's content length.)"""
    up = raw_upstream(respond_ok_forever)
    admin = free_port()
    config = write(
        tmp_path / "proxy.yaml",
        GOOD.format(port=0, upstream=up.port) + f'admin:\n  address: "127.0.0.1:{admin}"\n',
    )
    run_proxy(spawn, config)
    for path in ("/healthz", "/readyz", "/metrics", "/nope"):
        get_status, get_headers, get_body = http(admin, path)
        with socket.create_connection((LOOPBACK, admin), timeout=WAIT) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            head, rest = read_response_head(sock)
            while data := sock.recv(65536):
                rest += data
        lines = head.split(b"\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, v in (x.split(b":", 1) for x in lines[1:] if x)
        }
        assert int(lines[0].split()[1]) == get_status, path
        assert rest == b"", path  # no body after a HEAD response head
        assert headers.get(b"content-type") == get_headers[b"content-type"], path
        if b"content-length" in headers:
            assert int(headers[b"content-length"]) == len(get_body), (path, head)


def test_metrics_follow_known_traffic(spawn, tmp_path, raw_upstream):
    """`/metrics` in Prometheus text format, at least: `upgradeproxy_requests_total{route,code}`,
    `upgradeproxy_upgrades_total{route,protocol,result}`, `upgradeproxy_tunnels_active`,
    `upgradeproxy_tunnel_bytes_total{direction}`,
    `upgradeproxy_upstream_errors_total{upstream,kind}`,
    `upgradeproxy_request_duration_seconds` (histogram). Each moves with known traffic: a
    declined and a rejected upgrade, a refused, a reset and a slow upstream, a tunnel."""
    hold = threading.Event()

    def decline(conn: RawConn) -> None:
        conn.read_head()
        conn.send(ok_response(b"no upgrade here"))

    def bad_switch(conn: RawConn) -> None:
        conn.read_head()
        conn.send(SWITCH.replace(WS_ACCEPT, base64.b64encode(b"x" * 20)))

    def reset(conn: RawConn) -> None:
        conn.read_head()
        conn.close()

    def slow(conn: RawConn) -> None:
        conn.read_head()
        hold.wait(WAIT)

    ups = {
        "web": raw_upstream(respond_ok_forever), "decl": raw_upstream(decline),
        "bad": raw_upstream(bad_switch), "rst": raw_upstream(reset),
        "slow": raw_upstream(slow), "chat": raw_upstream(echo_after_switch(b"T")),
    }  # fmt: skip
    port, admin = free_port(), free_port()
    lines = [
        "listen:",
        f'  - address: "127.0.0.1:{port}"',
        "admin:",
        f'  address: "127.0.0.1:{admin}"',
    ]
    lines += ["upstreams:"] + [
        f'  {name}:\n    servers: ["127.0.0.1:{up.port}"]' for name, up in ups.items()
    ]
    lines += ["  gone:", f'    servers: ["127.0.0.1:{free_port()}"]', "routes:"]
    lines += [f"  - path_prefix: /{name}\n    upstream: {name}" for name in [*ups, "gone"]]
    lines += ["timeouts:", '  upstream_response: "500ms"', ""]
    config = write(tmp_path / "proxy.yaml", "\n".join(lines))
    run_proxy(spawn, config)
    try:
        start = scrape(admin)
        assert http(port, "/web/a")[0] == 200
        assert http(port, "/nothing")[0] == 404
        assert http(port, "/gone")[0] == 502
        assert http(port, "/rst")[0] == 502
        assert http(port, "/slow")[0] == 504
        assert http(port, "/decl", extra=WS_HEADERS, close=False)[0] == 200
        assert http(port, "/bad", extra=WS_HEADERS, close=False)[0] == 502
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
            buf = ws_upgrade(sock, "/chat")
            assert recv_exactly(sock, 1, buf) == b"T"
            sock.sendall(b"u" * 1234)
            assert recv_exactly(sock, 1234, buf) == b"u" * 1234
            assert value(scrape(admin), "upgradeproxy_tunnels_active") == 1
        assert eventually(lambda: value(scrape(admin), "upgradeproxy_tunnels_active") == 0)
    finally:
        hold.set()
    found = scrape(admin)

    labels = {
        "upgradeproxy_requests_total": {"route", "code"},
        "upgradeproxy_upgrades_total": {"route", "protocol", "result"},
        "upgradeproxy_tunnels_active": set(),
        "upgradeproxy_tunnel_bytes_total": {"direction"},
        "upgradeproxy_upstream_errors_total": {"upstream", "kind"},
    }
    for name, expected in labels.items():
        samples = [s for f in found.values() for s in f.samples if s.name == name]
        assert samples, name
        assert all(set(s.labels) == expected for s in samples), (name, samples)
    hist = found["upgradeproxy_request_duration_seconds"]
    assert hist.type == "histogram"
    assert {s.name for s in hist.samples} >= {
        "upgradeproxy_request_duration_seconds_bucket",
        "upgradeproxy_request_duration_seconds_count",
        "upgradeproxy_request_duration_seconds_sum",
    }
    assert all(set(s.labels) <= {"le"} for s in hist.samples)

    def delta(name: str, **kv: str) -> float:
        return value(found, name, **kv) - value(start, name, **kv)

    req = "upgradeproxy_requests_total"
    for route, code in [("*/web", "200"), ("", "404"), ("*/gone", "502"), ("*/rst", "502"),
                        ("*/slow", "504"), ("*/decl", "200"), ("*/bad", "502"),
                        ("*/chat", "101")]:  # fmt: skip
        assert delta(req, route=route, code=code) == 1, (route, code)
    assert delta(req) == 8
    upg = "upgradeproxy_upgrades_total"
    assert delta(upg, route="*/decl", protocol="websocket", result="declined") == 1
    assert delta(upg, route="*/bad", protocol="websocket", result="rejected") == 1
    assert delta(upg, route="*/chat", protocol="websocket", result="switched") == 1
    assert delta(upg) == 3
    err = "upgradeproxy_upstream_errors_total"
    assert delta(err, upstream="gone", kind="connect") == 1
    assert delta(err, upstream="rst") == 1  # closed before a response head (README: `reset`)
    assert delta(err, upstream="slow", kind="timeout") == 1
    assert delta(err, upstream="bad", kind="bad_switch") == 1
    assert delta(err) == 4
    assert delta("upgradeproxy_tunnel_bytes_total", direction="up") == 1234
    assert delta("upgradeproxy_tunnel_bytes_total", direction="down") == 1235
    assert delta("upgradeproxy_request_duration_seconds_count") == 8
    inf = value(found, "upgradeproxy_request_duration_seconds_bucket", le="+Inf")
    assert inf == value(found, "upgradeproxy_request_duration_seconds_count")


# --- Access log ------------------------------------------------------------------------------

FIELDS = {
    "time": str, "client": str, "method": str, "host": str, "path": str, "route": str,
    "upstream": str, "server": str, "status": int, "bytes_in": int, "bytes_out": int,
    "duration": (int, float),
}  # fmt: skip


def test_every_access_line_carries_every_contract_field(spawn, tmp_path, raw_upstream):
    """One line per HTTP exchange and one per closed tunnel: time, client address, method,
    host, path, route, upstream server, status, bytes each way, duration, and for tunnels the
    protocol. (Every line, error exchanges included, has every field, typed.)"""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch())
    port = free_port()
    config = write(
        tmp_path / "proxy.yaml",
        f'listen:\n  - address: "127.0.0.1:{port}"\nupstreams:\n'
        f'  web:\n    servers: ["127.0.0.1:{web.port}"]\n'
        f'  chat:\n    servers: ["127.0.0.1:{chat.port}"]\n'
        f'  gone:\n    servers: ["127.0.0.1:{free_port()}"]\n'
        "routes:\n  - path_prefix: /ws\n    upstream: chat\n"
        "  - path_prefix: /gone\n    upstream: gone\n"
        "  - path_prefix: /web\n    upstream: web\n",
    )
    proc = run_proxy(spawn, config)
    assert http(port, "/web/ok")[0] == 200
    assert http(port, "/missing")[0] == 404
    assert http(port, "/gone/x")[0] == 502
    smuggle = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    assert http(port, "/web/smuggle", method="POST", extra=smuggle)[0] == 400
    with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
        buf = ws_upgrade(sock, "/ws/t")
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3, buf) == b"abc"
    tunnel = proc.wait_msg("tunnel")[0]
    lines = {r["status"]: r for r in proc.wait_msg("http", count=5)}
    assert set(lines) == {200, 404, 502, 400, 101}, lines
    assert tunnel["protocol"] == "websocket"
    assert (tunnel["bytes_in"], tunnel["bytes_out"]) == (3, 3)
    problems = []
    for record in [*lines.values(), tunnel]:
        for field, kind in FIELDS.items():
            if not isinstance(record.get(field), kind):
                what = f"{record['msg']} {record['status']}"
                problems.append(f"{what}: {field}={record.get(field)!r}")
    expected = {200: "/web/ok", 404: "/missing", 502: "/gone/x", 400: "/web/smuggle", 101: "/ws/t"}
    for status, path in expected.items():
        if lines[status].get("path") != path:
            problems.append(f"http {status}: path={lines[status].get('path')!r}, sent {path}")
    assert not problems, "\n".join(problems)


# (what, bytes sent on a fresh connection, the status it must get)
MALFORMED = [
    ("bad request line", b"GARBAGE\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET /web HTTP/1.1\r\n\r\n", 400),
    ("obs-fold", b"GET /web HTTP/1.1\r\nHost: svc.test\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    ("CL with TE", b"POST /web HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 5\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("space before colon", b"GET /web HTTP/1.1\r\nHost : svc.test\r\n\r\n", 400),
    ("head too large", b"GET /web HTTP/1.1\r\nHost: svc.test\r\nX-Big: " + b"b" * 4000
                       + b"\r\n\r\n", 431),
    ("head never finished", b"GET /web HTTP/1.1\r\nHost: svc.test\r\n", 408),
    ("CONNECT", b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n", 405),
    ("no route", b"GET /nowhere HTTP/1.1\r\nHost: svc.test\r\n\r\n", 404),
]  # fmt: skip


def test_error_exchanges_are_logged_and_counted(spawn, tmp_path, raw_upstream):
    """One line per HTTP exchange. Errors, each a short response and a log line ...: no route
    404; malformed request 400 (then close); head too large 431; `request_header` passed 408
    (then close); CONNECT 405. (Each gets its access line, and counts in
    `upgradeproxy_requests_total{route,code}`.)"""
    web = raw_upstream(respond_ok_forever)
    port, admin = free_port(), free_port()
    config = write(
        tmp_path / "proxy.yaml",
        GOOD.format(port=port, upstream=web.port).replace(
            "- upstream: app", "- path_prefix: /web\n    upstream: app"
        )
        + f'admin:\n  address: "127.0.0.1:{admin}"\n'
        + 'timeouts:\n  request_header: "300ms"\nlimits:\n  max_request_header_bytes: 2048\n',
    )
    proc = run_proxy(spawn, config)
    before = scrape(admin)
    for what, data, status in MALFORMED:
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as sock:
            sock.sendall(data)
            assert read_response(sock)[0] == status, what
    expected: dict[int, int] = {}
    for _, _, status in MALFORMED:
        expected[status] = expected.get(status, 0) + 1

    def logged() -> dict[int, int]:
        counts: dict[int, int] = {}
        for record in proc.access():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts

    eventually(lambda: logged() == expected, timeout=3)
    after = scrape(admin)
    counted = {
        status: value(after, "upgradeproxy_requests_total", code=str(status))
        - value(before, "upgradeproxy_requests_total", code=str(status))
        for status in expected
    }
    assert (logged(), counted) == (expected, expected), "\n".join(map(str, proc.access()))
