"""Operating the proxy as a process (contract "Command line", "Admin endpoints", "Access log"):
drain on SIGTERM/SIGINT, reload on SIGHUP, /healthz /readyz /metrics, the JSON access log,
`workers` and `limits.max_connections`.

Each test runs `python -m upgradeproxy run --log-format json` as a subprocess on free ports,
talks to it over loopback sockets and signals it with `os.kill`, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    LOOPBACK,
    WAIT,
    WS_ACCEPT,
    WS_KEY,
    RawConn,
    eventually,
    free_port,
    http,
    ok_response,
    read_response,
    read_response_head,
    refused,
    respond_ok_forever,
    scrape,
)

Line = dict[str, Any]


def proxy_config(
    listen: list[int],
    upstreams: dict[str, int],
    routes: list[tuple[str, str]],
    *,
    admin: int | None = None,
    extra: str = "",
) -> str:
    """A config on loopback; `routes` are (path_prefix, upstream) pairs, first match wins."""
    lines = ["listen:", *(f'  - address: "{LOOPBACK}:{p}"' for p in listen)]
    if admin is not None:
        lines += ["admin:", f'  address: "{LOOPBACK}:{admin}"']
    lines.append("upstreams:")
    for name, port in upstreams.items():
        lines += [f"  {name}:", f'    servers: ["{LOOPBACK}:{port}"]']
    lines.append("routes:")
    for prefix, upstream in routes:
        lines += [f'  - path_prefix: "{prefix}"', f"    upstream: {upstream}"]
    return "\n".join([*lines, textwrap.dedent(extra), ""])


class ProxyProcess:
    """`upgradeproxy run` in its own process group, its JSON log lines collected as they come."""

    def __init__(
        self,
        config: Path,
        prefix: Sequence[str] = (),
        command: Sequence[str] = (sys.executable, "-m", "upgradeproxy"),
        **popen: Any,
    ) -> None:
        """`prefix` goes before the command (a wrapper), `command` is what runs `upgradeproxy`
        (the one-file binary, say); `popen` adds Popen arguments."""
        self.config = config
        self.popen = subprocess.Popen(
            [*prefix, *command, "run", "--config", str(config), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, **popen,
        )  # fmt: skip
        self.lines: list[Line] = []
        self._eof = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = {"msg": text, "not_json": True}
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def matching(self, match: Callable[[Line], bool]) -> list[Line]:
        with self._changed:
            return [line for line in self.lines if match(line)]

    def wait_for(self, match: Callable[[Line], bool], count: int = 1) -> list[Line]:
        """The first `count` lines that `match`, waiting up to WAIT for them."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while len(found := [line for line in self.lines if match(line)]) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    log = "\n".join(map(str, self.lines))
                    raise AssertionError(f"{count} matching line(s) not logged; log:\n{log}")
                self._changed.wait(left)
        return found[:count]

    def wait_log(self, msg: str, count: int = 1, **fields: object) -> list[Line]:
        return self.wait_for(
            lambda line: (
                line.get("msg") == msg and all(line.get(k) == v for k, v in fields.items())
            ),
            count,
        )

    def rewrite(self, text: str) -> None:
        """Replace the config file atomically, as a deploy tool would."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def kill(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def wait_exit(self) -> int:
        return self.popen.wait(WAIT)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group: workers too
        self.popen.wait(WAIT)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`start(config_text, workers=1)`: run the proxy and wait until it listens."""
    started: list[ProxyProcess] = []

    def run(text: str, workers: int = 1, ready: bool = True) -> ProxyProcess:
        path = tmp_path / "proxy.yaml"
        path.write_text(text)
        proc = ProxyProcess(path)
        started.append(proc)
        if ready:
            proc.wait_log("worker ready" if workers > 1 else "listening", count=workers)
        return proc

    yield run
    for proc in started:
        proc.close()


# --- clients ---------------------------------------------------------------------------


def tunnel_upstream(tag: bytes) -> Callable[[RawConn], None]:
    """An upstream that accepts the WebSocket upgrade, sends `tag`, then echoes until EOF."""

    def handler(conn: RawConn) -> None:
        conn.read_head()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n" + tag
        )
        conn.sock.settimeout(None)
        while data := conn.sock.recv(65536):
            conn.sock.sendall(data)
        conn.close()

    return handler


class Tunnel:
    """A client's upgraded connection through the proxy; `tag` names the upstream behind it."""

    def __init__(self, port: int, path: str = "/chat") -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=WAIT)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n".encode()
            + b"Sec-WebSocket-Key: "
            + WS_KEY
            + b"\r\n\r\n"
        )
        head, self.buf = read_response_head(self.sock)
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.tag = self.recv(1)

    def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("tunnel closed")
            self.buf += data
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.recv(len(data))

    def works(self) -> bool:
        try:
            return self.echo(b"ping") == b"ping"
        except (EOFError, OSError):
            return False

    def closed_by_peer(self) -> bool:
        """True once the proxy closes it (within WAIT)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (0 if none)."""
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


# --- admin endpoints and access log ------------------------------------------------------


def test_health_ready_and_metrics_exposition(start, raw_upstream):
    """/healthz and /readyz answer 200; /metrics has every contract metric with its type,
    HELP, labels and histogram buckets, and counts what the proxy did."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(tunnel_upstream(b"A"))
    port, admin = free_port(), free_port()
    proc = start(
        proxy_config(
            [port],
            {"web": web.port, "chat": chat.port, "gone": free_port()},
            [("/http", "web"), ("/gone", "gone"), ("/", "chat")],
            admin=admin,
        )
    )
    status, _, body = http(admin, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert http(admin, "/readyz")[0] == 200
    assert http(port, "/http/x")[0] == 200
    assert http(port, "/gone")[0] == 502
    tunnel = Tunnel(port)
    assert tunnel.echo(b"x" * 1000) == b"x" * 1000
    tunnel.close()
    closed = proc.wait_log("tunnel")[0]

    status, headers, body = http(admin, "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    text = body.decode()
    found = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("upgradeproxy_requests", "counter"),
        ("upgradeproxy_upgrades", "counter"),
        ("upgradeproxy_tunnels_active", "gauge"),
        ("upgradeproxy_tunnel_bytes", "counter"),
        ("upgradeproxy_upstream_errors", "counter"),
        ("upgradeproxy_request_duration_seconds", "histogram"),
    ]:
        assert found[name].type == kind
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# TYPE {exposed} {kind}\n" in text
        assert re.search(rf"^# HELP {exposed} \S", text, re.M)
    requests = "upgradeproxy_requests_total"
    assert total(found, requests, route="*/http", code="200") == 1
    assert total(found, requests, route="*/gone", code="502") == 1
    assert total(found, requests, route="*/", code="101") == 1
    upgrades = "upgradeproxy_upgrades_total"
    assert total(found, upgrades, route="*/", protocol="websocket", result="switched") == 1
    assert total(found, "upgradeproxy_upstream_errors_total", upstream="gone", kind="connect") >= 1
    assert total(found, "upgradeproxy_tunnels_active") == 0
    bytes_total = "upgradeproxy_tunnel_bytes_total"
    # The access log and the metrics count the same bytes: the tag and the echo.
    assert total(found, bytes_total, direction="up") == closed["bytes_in"] == 1000
    assert total(found, bytes_total, direction="down") == closed["bytes_out"] == 1001
    hist = "upgradeproxy_request_duration_seconds"
    buckets = [s for s in found[hist].samples if s.name == f"{hist}_bucket"]
    assert buckets[-1].labels == {"le": "+Inf"}
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].value == total(found, f"{hist}_count") == 3


def test_access_log_json_lines_for_an_exchange_and_a_tunnel(start, raw_upstream):
    """One JSON line per exchange and one per closed tunnel, with every contract field;
    `workers: 1` runs one process with no supervisor."""

    def answer_body(conn: RawConn) -> None:
        head = conn.read_head()
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        conn.send(ok_response(b"got " + conn.read_exactly(length)))

    web, chat = raw_upstream(answer_body), raw_upstream(tunnel_upstream(b"A"))
    port = free_port()
    proc = start(
        proxy_config(
            [port], {"web": web.port, "chat": chat.port}, [("/http", "web"), ("/", "chat")]
        )
    )
    assert http(port, "/http/form", method="POST", body=b"hello")[2] == b"got hello"
    tunnel = Tunnel(port)
    assert tunnel.echo(b"y" * 300) == b"y" * 300
    tunnel.sock.shutdown(socket.SHUT_WR)  # the client ends first
    assert tunnel.closed_by_peer()
    tunnel.close()

    exchange = proc.wait_log("http", method="POST")[0]
    measured = {"time": None, "duration": None, "upstream_connect": None,
                "upstream_header": None, "request_id": None, "user_agent": None}  # fmt: skip
    assert exchange | measured == {
        "time": None, "level": "info", "logger": "upgradeproxy.access", "msg": "http",
        "client": LOOPBACK, "method": "POST", "host": "svc.test", "path": "/http/form",
        "route": "*/http", "upstream": "web", "server": f"{LOOPBACK}:{web.port}",
        "status": 200, "bytes_in": 5, "bytes_out": 9, "kind": "http", "http_version": "1.1",
        **measured, "pid": proc.popen.pid,
    }  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{32}", exchange["request_id"])
    assert 0 <= exchange["upstream_connect"] <= exchange["upstream_header"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", exchange["time"])
    assert isinstance(exchange["duration"], float)
    closed = proc.wait_log("tunnel")[0]
    assert closed["protocol"] == "websocket"
    assert closed["first_close"] == "client"
    assert (closed["bytes_in"], closed["bytes_out"]) == (300, 301)
    assert (closed["path"], closed["status"]) == ("/chat", 101)
    assert closed["server"] == f"{LOOPBACK}:{chat.port}"
    assert closed["duration"] >= 0
    assert not proc.matching(lambda line: "not_json" in line or "worker" in line)


# --- drain -----------------------------------------------------------------------------


def test_drain_turns_readyz_503_stops_accepting_and_waits_for_tunnels(start, raw_upstream):
    """From the drain signal /readyz is 503 and the listener refuses; an open tunnel keeps
    working, and the process exits 0 as soon as it closes."""
    chat = raw_upstream(tunnel_upstream(b"A"))
    port, admin = free_port(), free_port()
    proc = start(proxy_config([port], {"chat": chat.port}, [("/", "chat")], admin=admin))
    tunnel = Tunnel(port)
    proc.kill(signal.SIGTERM)
    assert eventually(lambda: http(admin, "/readyz")[0] == 503)
    assert http(admin, "/healthz")[0] == 200
    assert eventually(lambda: refused(port))
    assert tunnel.echo(b"still open while draining") == b"still open while draining"
    tunnel.close()
    assert proc.wait_exit() == 0
    proc.wait_log("draining", signal="SIGTERM")


def test_drain_finishes_inflight_exchange_and_closes_idle_keepalive(start, raw_upstream):
    """An idle keep-alive connection is closed (once `timeouts.keepalive_drain` has passed); an
    exchange in flight gets its response, with `Connection: close`, then its connection
    closes; exit 0."""
    reached, release = threading.Event(), threading.Event()

    def slow(conn: RawConn) -> None:
        conn.read_head()
        reached.set()
        release.wait(WAIT)
        conn.send(ok_response(b"late"))

    fast, late = raw_upstream(respond_ok_forever), raw_upstream(slow)
    port = free_port()
    proc = start(
        proxy_config(
            [port], {"fast": fast.port, "late": late.port}, [("/slow", "late"), ("/", "fast")]
        )
    )
    request = b"GET %s HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    with (
        socket.create_connection((LOOPBACK, port), timeout=WAIT) as idle,
        socket.create_connection((LOOPBACK, port), timeout=WAIT) as busy,
    ):
        idle.sendall(request % b"/")
        assert read_response(idle)[0] == 200
        busy.sendall(request % b"/slow")
        assert reached.wait(WAIT)
        proc.kill(signal.SIGINT)
        proc.wait_log("draining", signal="SIGINT")
        assert idle.recv(1) == b""
        release.set()
        status, headers, body, _ = read_response(busy)
        assert (status, body, headers[b"connection"]) == (200, b"late", b"close")
        assert busy.recv(1) == b""
    assert proc.wait_exit() == 0


@pytest.mark.slow
def test_tunnel_is_cut_at_the_drain_deadline(start, raw_upstream):
    """A tunnel still open `timeouts.drain` after the signal is closed; exit 0 all the same."""
    chat = raw_upstream(tunnel_upstream(b"A"))
    port = free_port()
    proc = start(
        proxy_config([port], {"chat": chat.port}, [("/", "chat")], extra="timeouts: {drain: 1}")
    )
    tunnel = Tunnel(port)
    signalled = time.monotonic()
    proc.kill(signal.SIGTERM)
    assert tunnel.closed_by_peer()
    assert time.monotonic() - signalled >= 1.0  # the deadline, not the signal, closed it
    assert proc.wait_exit() == 0
    closed = proc.wait_log("tunnel")[0]
    assert closed["first_close"] == "cancelled"


def test_second_signal_stops_at_once(start, raw_upstream):
    chat = raw_upstream(tunnel_upstream(b"A"))
    port = free_port()
    proc = start(
        proxy_config([port], {"chat": chat.port}, [("/", "chat")], extra="timeouts: {drain: 600}")
    )
    tunnel = Tunnel(port)
    proc.kill(signal.SIGTERM)
    proc.wait_log("draining")
    proc.kill(signal.SIGINT)
    assert proc.wait_exit() == 0  # well before the 600 s drain
    assert tunnel.closed_by_peer()
    proc.wait_log("stopping now", signal="SIGINT")


# --- reload ----------------------------------------------------------------------------


def test_tunnel_outlives_reloads_that_move_routes_and_listeners(start, raw_upstream):
    """After SIGHUP new connections use the new upstream and listeners (admin included); a
    tunnel opened before keeps its upstream, even once its listener is gone."""
    a, b = raw_upstream(tunnel_upstream(b"A")), raw_upstream(tunnel_upstream(b"B"))
    first, second, admin, moved = free_port(), free_port(), free_port(), free_port()
    proc = start(proxy_config([first], {"chat": a.port}, [("/", "chat")]))
    old = Tunnel(first)
    assert old.tag == b"A"

    extra = "timeouts: {tunnel_idle: 600}\nlimits: {max_connections: 50}"
    proc.rewrite(
        proxy_config([first, second], {"chat": b.port}, [("/", "chat")], admin=admin, extra=extra)
    )
    proc.kill(signal.SIGHUP)
    proc.wait_log("reloaded")
    assert (Tunnel(first).tag, Tunnel(second).tag) == (b"B", b"B")
    assert http(admin, "/healthz")[0] == 200
    assert old.echo(b"after the reload") == b"after the reload"

    proc.rewrite(proxy_config([second], {"chat": b.port}, [("/", "chat")], admin=moved))
    proc.kill(signal.SIGHUP)
    proc.wait_log("reloaded", count=2)
    assert eventually(lambda: refused(first))
    assert eventually(lambda: refused(admin))
    assert http(moved, "/readyz")[0] == 200
    assert Tunnel(second).tag == b"B"
    assert old.echo(b"listener gone") == b"listener gone"


def test_invalid_reload_logs_every_problem_and_keeps_the_old_routes(start, raw_upstream):
    """A file that fails validation, or names a port that cannot be bound, changes nothing."""
    a, b = raw_upstream(tunnel_upstream(b"A")), raw_upstream(tunnel_upstream(b"B"))
    port = free_port()
    good = proxy_config([port], {"chat": a.port}, [("/", "chat")])
    proc = start(good)
    proc.rewrite(good.replace("upstream: chat", "upstream: nope") + "listne: []\n")
    proc.kill(signal.SIGHUP)
    rejected = proc.wait_for(lambda line: line["msg"].startswith("reload rejected: "), count=2)
    assert any("nope" in line["msg"] for line in rejected)
    assert any("listne" in line["msg"] and "listen" in line["msg"] for line in rejected)
    assert Tunnel(port).tag == b"A"

    with socket.create_server((LOOPBACK, 0)) as holder:
        taken = holder.getsockname()[1]
        proc.rewrite(proxy_config([port, taken], {"chat": b.port}, [("/", "chat")]))
        proc.kill(signal.SIGHUP)
        proc.wait_for(lambda line: line["msg"].startswith("reload failed, old config kept: "))
    assert Tunnel(port).tag == b"A"
    assert not proc.matching(lambda line: line["msg"] == "reloaded")

    proc.rewrite(proxy_config([port], {"chat": b.port}, [("/", "chat")]))
    proc.kill(signal.SIGHUP)
    proc.wait_log("reloaded")
    assert Tunnel(port).tag == b"B"


# --- limits.max_connections ------------------------------------------------------------


def test_max_connections_leaves_extra_clients_in_the_backlog(start, raw_upstream):
    """The limit counts across listeners: two clients on one listener fill it, a third on
    the other is neither served nor refused until one of the first two closes. Nothing is
    logged as an error."""
    web = raw_upstream(respond_ok_forever)
    port, other = free_port(), free_port()
    proc = start(
        proxy_config(
            [port, other], {"web": web.port}, [("/", "web")], extra="limits: {max_connections: 2}"
        )
    )
    request = b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
    first, second = (socket.create_connection((LOOPBACK, port), timeout=WAIT) for _ in "12")
    for sock in (first, second):  # a quiet listener holds no slot: both are served
        sock.sendall(request)
        assert read_response(sock)[0] == 200
    with socket.create_connection((LOOPBACK, other), timeout=1) as third:  # the kernel queues it
        third.sendall(request)
        with pytest.raises(TimeoutError):
            third.recv(1)
        first.close()
        third.settimeout(WAIT)
        assert read_response(third)[0] == 200
    second.close()
    assert not proc.matching(lambda line: line.get("level") in ("warning", "error"))


# --- workers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_each_scrape_reports_the_totals(start, raw_upstream):
    """Requests spread over both workers; every scrape, whichever worker answers it, shows
    the totals of both: requests, the duration histogram and the open tunnels."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(tunnel_upstream(b"A"))
    port, admin = free_port(), free_port()
    config = proxy_config(
        [port],
        {"web": web.port, "chat": chat.port},
        [("/ws", "chat"), ("/", "web")],
        admin=admin,
        extra="workers: 2",
    )
    proc = start(config, workers=2)
    requests = 40
    for i in range(requests):
        assert http(port, f"/r{i}")[0] == 200
    served = proc.wait_log("http", count=requests)
    assert {line["worker"] for line in served} == {0, 1}
    tunnels = [Tunnel(port, "/ws") for _ in range(6)]
    expected = requests + len(tunnels)
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_requests_total") == expected)
    for _ in range(12):  # fresh connections: SO_REUSEPORT spreads them over both workers
        found = scrape(admin)
        assert total(found, "upgradeproxy_requests_total") == expected
        assert total(found, "upgradeproxy_request_duration_seconds_count") == expected
        assert total(found, "upgradeproxy_tunnels_active") == len(tunnels)
    for tunnel in tunnels:
        tunnel.close()
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == 0)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_totals_survive(start, raw_upstream):
    """SIGKILL one worker: the parent starts another; the dead worker's counts stay in the
    totals, its tunnels leave the gauge; SIGTERM to the parent drains all and exits 0."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(tunnel_upstream(b"A"))
    port, admin = free_port(), free_port()
    config = proxy_config(
        [port],
        {"web": web.port, "chat": chat.port},
        [("/ws", "chat"), ("/", "web")],
        admin=admin,
        extra="workers: 2",
    )
    proc = start(config, workers=2)
    pids = {line["worker"]: line["pid"] for line in proc.wait_log("worker ready", count=2)}
    for i in range(10):
        assert http(port, f"/before{i}")[0] == 200
    # Enough that both workers hold some (all on one: a 2**-19 chance).
    tunnels = [Tunnel(port, "/ws") for _ in range(20)]
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == 20)
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_connections_active") == 20)
    # process_* per live worker, labelled with its pid (issue 11).
    memory = scrape(admin)["process_resident_memory_bytes"].samples
    assert {s.labels["pid"] for s in memory} == {str(pid) for pid in pids.values()}
    assert all(s.value > 0 for s in memory)

    os.kill(pids[0], signal.SIGKILL)
    proc.wait_log("worker died: replacing it", worker=0)
    fresh = proc.wait_for(
        lambda line: (
            line["msg"] == "worker ready" and line["worker"] == 0 and line["pid"] != pids[0]
        )
    )[0]["pid"]
    alive = [t for t in tunnels if t.works()]
    assert len(alive) < len(tunnels)  # worker 0 took some tunnels with it
    for i in range(10):
        assert http(port, f"/after{i}")[0] == 200
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == len(alive))
    # Gauges count live workers only; counters keep what the dead one counted (below).
    active = "upgradeproxy_connections_active"
    assert eventually(lambda: total(scrape(admin), active) == len(alive))
    memory = scrape(admin)["process_resident_memory_bytes"].samples
    assert {s.labels["pid"] for s in memory} == {str(pids[1]), str(fresh)}
    expected = 10 + len(tunnels) + 10  # the 101s count as exchanges too
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_requests_total") == expected)

    proc.kill(signal.SIGTERM)
    for tunnel in alive:
        tunnel.close()
    assert proc.wait_exit() == 0
    for pid in (pids[1], fresh):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_reload_with_workers_is_validated_by_the_parent(start, raw_upstream):
    """SIGHUP to the parent: an invalid file is rejected there (workers untouched); a valid
    one reaches every worker. A new `workers` count is logged as needing a restart."""
    a, b = raw_upstream(tunnel_upstream(b"A")), raw_upstream(tunnel_upstream(b"B"))
    port = free_port()
    good = proxy_config([port], {"chat": a.port}, [("/", "chat")], extra="workers: 2")
    proc = start(good, workers=2)
    proc.rewrite(good + "bogus: 1\n")
    proc.kill(signal.SIGHUP)
    proc.wait_for(
        lambda line: line["msg"].startswith("reload rejected: ") and "bogus" in line["msg"]
    )
    assert {Tunnel(port).tag for _ in range(6)} == {b"A"}

    proc.rewrite(proxy_config([port], {"chat": b.port}, [("/", "chat")], extra="workers: 3"))
    proc.kill(signal.SIGHUP)
    reloaded = proc.wait_log("reloaded", count=2)
    assert {line["worker"] for line in reloaded} == {0, 1}
    assert proc.matching(lambda line: "takes a restart" in line["msg"])
    assert {Tunnel(port).tag for _ in range(8)} == {b"B"}
    assert len(proc.matching(lambda line: line["msg"] == "worker ready")) == 2


@pytest.mark.slow
def test_worker_signalled_directly_and_by_the_parent_drains_once(start, raw_upstream):
    """systemd's default KillMode signals every process of the unit, so a worker may get
    SIGTERM both directly and from the parent: a repeat must not cut its tunnels."""
    chat = raw_upstream(tunnel_upstream(b"A"))
    port = free_port()
    config = proxy_config(
        [port], {"chat": chat.port}, [("/", "chat")], extra="workers: 2\ntimeouts: {drain: 600}"
    )
    proc = start(config, workers=2)
    pids = {line["worker"]: line["pid"] for line in proc.wait_log("worker ready", count=2)}
    tunnel = Tunnel(port)
    worker = proc.wait_log("http", status=101)[0]["worker"]
    os.kill(pids[worker], signal.SIGTERM)
    proc.wait_log("draining", worker=worker)
    proc.kill(signal.SIGTERM)
    proc.wait_log("already draining", worker=worker)
    assert tunnel.works()
    assert not proc.matching(lambda line: line["msg"] == "stopping now")
    tunnel.close()
    assert proc.wait_exit() == 0


def test_readyz_answers_503_while_a_worker_drains_after_the_other_exited(start, raw_upstream):
    """workers: 2, SIGTERM with one tunnel open: the idle worker exits at once, and every
    probe that follows still gets its 503 from the worker left draining, never a reset
    (the admin socket is one socket shared by the workers, not one per worker)."""
    chat = raw_upstream(tunnel_upstream(b"A"))
    port, admin = free_port(), free_port()
    config = proxy_config(
        [port], {"chat": chat.port}, [("/", "chat")], admin=admin,
        extra="workers: 2\ntimeouts: {drain: 600}",
    )  # fmt: skip
    proc = start(config, workers=2)
    proc.wait_log("worker ready", count=2)
    tunnel = Tunnel(port)
    answers: list[int | str] = []
    exited = threading.Event()

    def probe() -> None:
        # Fresh connections (fresh source ports, hashed anywhere over per-worker sockets)
        # all through the idle worker's exit; bounded in count.
        for _ in range(5000):
            try:
                answers.append(http(admin, "/readyz")[0])
            except OSError as exc:
                answers.append(type(exc).__name__)
            if exited.is_set() and len(answers) > 50:
                return

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        proc.kill(signal.SIGTERM)
        proc.wait_log("worker exited")  # the idle one
    finally:
        exited.set()
        prober.join()
    assert set(answers[-20:]) == {503}
    assert set(answers) <= {200, 503}, [a for a in answers if a not in (200, 503)][:5]
    assert tunnel.works()
    tunnel.close()
    assert proc.wait_exit() == 0


def test_port_in_use_with_workers_exits_1_before_any_worker_starts(start, raw_upstream, tmp_path):
    """A port held without SO_REUSEPORT: the parent, which binds the listeners for its
    workers, cannot bind it and exits 1 naming the address; no worker is started."""
    web = raw_upstream(respond_ok_forever)
    with socket.create_server((LOOPBACK, 0)) as holder:
        port = holder.getsockname()[1]
        text = proxy_config([port], {"web": web.port}, [("/", "web")], extra="workers: 2")
        proc = start(text, ready=False)
        assert proc.wait_exit() == 1
    proc.wait_log(f"cannot start: listen[0].address {LOOPBACK}:{port}: address already in use")
    assert not proc.matching(lambda line: line["msg"] == "worker ready")
