"""The proxy's CPU per operation, HTTP/2 beside HTTP/1.1: what a change to the HTTP/2 path
costs or saves, measured where throughput would be noise (a shared, loaded machine).

    .venv/bin/python tests/bench/h2cost.py                       # every op, 3 reps
    .venv/bin/python tests/bench/h2cost.py --ops h2req,h1req --reps 5
    .venv/bin/python tests/bench/h2cost.py --tree base=/tmp/src-main --tree new=.   # A/B
    .venv/bin/python tests/bench/h2cost.py --profile /tmp/prof --ops h2req          # py-spy
    .venv/bin/python tests/bench/h2cost.py --strace --scale 0.2         # system calls per op
    .venv/bin/python tests/bench/h2cost.py --ops h2req,h1req --browser-headers   # 11 more fields

Each operation is a fixed count, and its cost is the proxy process's CPU seconds (all threads,
from /proc schedstat) over the run divided by the count:

- `h2req` / `h1req`: GET /http (the nginx upstream's "ok") with h2load, HTTP/2 prior knowledge
  over a few connections with many streams each, or `--h1` keep-alive connections;
- `h2hs` / `h1hs`: WebSocket handshakes to /hs, as extended CONNECTs on one HTTP/2 connection
  (200, END_STREAM both ways) or as HTTP/1.1 Upgrades (a connection each, closed after the 101);
- `h2bulk` / `h1bulk`: MiB client -> upstream over one tunnel (/sink);
- `h2down` / `h1down`: MiB upstream -> client over one tunnel (/source).

Every tree (`--tree NAME=PATH`: a source checkout run with this venv's Python) gets a proxy of
its own with `http2: true`; reps rotate over trees and ops, so load drifts hit all alike.
Not collected by pytest; never run in CI.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import h2.events
import h2bench
import loadgen
import targets
import wire
from procs import Managed, Processes, cpu_seconds, free_ports, wait_for_port

OPS: Final = ("h2req", "h1req", "h2hs", "h1hs", "h2bulk", "h1bulk", "h2down", "h1down")
# What a browser's fetch() carries besides the pseudo-headers (`--browser-headers`).
BROWSER_HEADERS: Final = (
    'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"',
    "sec-ch-ua-mobile: ?0",
    'sec-ch-ua-platform: "Linux"',
    "accept: application/json, text/plain, */*",
    "sec-fetch-site: same-origin",
    "sec-fetch-mode: cors",
    "sec-fetch-dest: empty",
    "referer: https://chat.example.com/room/42",
    "accept-language: en-US,en;q=0.9",
    "cookie: session=abcdef0123456789; theme=dark",
    "priority: u=1, i",
)
UNITS: Final = {"req": "request", "hs": "handshake", "bulk": "MiB", "down": "MiB"}


@dataclass(frozen=True)
class Shape:
    """Counts per rep; small enough for a loaded 2-core machine, large enough that the
    fixed costs (a connection's setup, h2load's start) stay under a few percent."""

    requests: int = 20000
    conns: int = 4  # h2load connections
    streams: int = 32  # concurrent streams per HTTP/2 connection
    h1_conns: int = 32  # HTTP/1.1 keep-alive connections (the same requests in flight)
    headers: tuple[str, ...] = ()  # request header lines h2load adds (-H)
    handshakes: int = 3000
    hs_streams: int = 32  # extended CONNECTs in flight on the one connection
    bulk_mib: int = 256


@dataclass
class Proxy:
    name: str
    tree: Path
    port: int
    proc: Managed


@dataclass
class Costs:
    """CPU seconds per unit, per (tree, op), one entry per rep."""

    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, tree: str, op: str, value: float) -> None:
        self.runs.setdefault((tree, op), []).append(value)


def proxy_conf(port: int, ws_port: int, http_port: int) -> str:
    return h2bench.upgradeproxy_h2_conf(port, ws_port, http_port)


def start_proxy(
    procs: Processes, tmp: Path, name: str, tree: Path, ports: tuple[int, int, int]
) -> Proxy:
    port, ws_port, http_port = ports
    path = tmp / f"{name}.yaml"
    path.write_text(proxy_conf(port, ws_port, http_port))
    argv = [sys.executable, "-m", "upgradeproxy", "run", "--config", str(path)]
    argv += ["--log-format", "json", "--no-access-log"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = procs.start(f"upgradeproxy-{name}", argv, tmp / f"{name}.log", cwd=tree, env=env)
    wait_for_port(port, proc)
    return Proxy(name, tree, port, proc)


# --- the operations ----------------------------------------------------------------------


def h2load(
    port: int, n: int, conns: int, streams: int, h1: bool = False, headers: tuple[str, ...] = ()
) -> None:
    argv = ["h2load", f"-n{n}", f"-c{conns}", f"-m{streams}"]
    argv += ["--h1"] if h1 else []
    for line in headers:
        argv += ["-H", line]
    argv.append(f"http://127.0.0.1:{port}{wire.PATH_HTTP}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or f"{n} succeeded, 0 failed, 0 errored" not in out.stdout:
        raise RuntimeError(f"h2load did not complete {n} requests: {out.stdout}{out.stderr}")


def h2_handshakes(port: int, n: int, concurrency: int) -> None:
    """`n` extended CONNECTs to /hs on one connection, `concurrency` at a time: 200, then the
    client's END_STREAM, then the upstream's close as END_STREAM."""
    client = h2bench._Client(port)
    started = done = 0
    try:
        while started < min(concurrency, n):
            client.connect(wire.PATH_HANDSHAKE)
            started += 1
        client.flush()
        while done < n:
            for event in client.read():
                if isinstance(event, h2.events.ResponseReceived):
                    if dict(event.headers).get(b":status") != b"200":
                        raise RuntimeError(f"extended CONNECT answered {event.headers}")
                    client.conn.end_stream(event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    done += 1
                    if started < n:
                        client.connect(wire.PATH_HANDSHAKE)
                        started += 1
                elif isinstance(event, h2.events.StreamReset):
                    raise RuntimeError(f"stream reset: {event}")
            client.flush()
    finally:
        client.close()


def h1_handshakes(port: int, n: int, concurrency: int) -> None:
    """`n` HTTP/1.1 WebSocket handshakes to /hs, `concurrency` connections at a time, each
    closed once its 101 is checked (loadgen.handshakes with a count instead of a clock)."""
    request = wire.handshake_request(wire.PATH_HANDSHAKE)
    ep = select.epoll()
    live: dict[int, tuple[socket.socket, bytearray]] = {}
    started = done = 0

    def start() -> None:
        nonlocal started
        started += 1
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        live[sock.fileno()] = (sock, bytearray())
        ep.register(sock.fileno(), select.EPOLLOUT)

    while started < min(concurrency, n):
        start()
    deadline = time.monotonic() + 600
    while done < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {n} handshakes in 600 s")
        for fd, events in ep.poll(1.0):
            sock, buf = live[fd]
            if events & select.EPOLLOUT:
                sock.send(request)
                ep.modify(fd, select.EPOLLIN)
                continue
            data = sock.recv(4096)
            if not data:
                raise RuntimeError(f"connection closed before the 101: {bytes(buf)!r}")
            buf += data
            end = buf.find(wire.HEAD_END)
            if end < 0:
                continue
            if not wire.head_ok(bytes(buf[: end + 4])):
                raise RuntimeError(f"not a 101: {bytes(buf[:300])!r}")
            ep.unregister(fd)
            del live[fd]
            sock.close()
            done += 1
            if started < n:
                start()
    ep.close()


def h2_download(port: int, size: int) -> None:
    """`size` bytes from /source over one extended CONNECT stream, to its END_STREAM (the
    client's windows: 1 MiB per stream, 16 MiB more for the connection, as h2bench sets)."""
    client = h2bench._Client(port)
    try:
        sid = client.connect(f"{wire.PATH_SOURCE}?n={size}")
        client.flush()
        got = 0
        ended = False
        while not ended:
            for event in client.read():
                if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    got += len(event.data)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    raise RuntimeError(f"stream reset: {event}")
        if got != size:
            raise RuntimeError(f"received {got} bytes, the source sent {size}")
    finally:
        client.close()


def _no_clock(_: str) -> None:
    pass


def run_op(op: str, port: int, shape: Shape, scale: float = 1.0) -> int:
    """Run `op` against `port`; how many units it completed."""
    n_req = max(1, int(shape.requests * scale))
    n_hs = max(1, int(shape.handshakes * scale))
    mib = max(1, int(shape.bulk_mib * scale))
    if op == "h2req":
        h2load(port, n_req, shape.conns, shape.streams, headers=shape.headers)
        return n_req
    if op == "h1req":
        h2load(port, n_req, shape.h1_conns, 1, h1=True, headers=shape.headers)
        return n_req
    if op == "h2hs":
        h2_handshakes(port, n_hs, shape.hs_streams)
        return n_hs
    if op == "h1hs":
        h1_handshakes(port, n_hs, shape.hs_streams)
        return n_hs
    if op == "h2bulk":
        h2bench.upload(port, mib << 20, _no_clock)
        return mib
    if op == "h1bulk":
        loadgen.upload(port, mib << 20, _no_clock)
        return mib
    if op == "h2down":
        h2_download(port, mib << 20)
        return mib
    if op == "h1down":
        loadgen.download(port, mib << 20, _no_clock)
        return mib
    raise ValueError(op)


def measure(proxy: Proxy, op: str, shape: Shape) -> float:
    """CPU seconds of the proxy per unit of `op`."""
    pids = proxy.proc.pids()
    before = cpu_seconds(pids)
    units = run_op(op, proxy.port, shape)
    return (cpu_seconds(pids) - before) / units


def profile(proxy: Proxy, op: str, shape: Shape, out: Path) -> Path:
    """py-spy's collapsed stacks of the proxy during one run of `op` (CPU figures of such a
    run are not kept: sampling pauses the process)."""
    path = out / f"{proxy.name}-{op}.txt"
    argv = ["py-spy", "record", "--pid", str(proxy.proc.pid), "--format", "raw"]
    argv += ["--rate", "250", "--output", str(path)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    try:
        run_op(op, proxy.port, shape)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    return path


def syscalls(proxy: Proxy, op: str, shape: Shape) -> str:
    """`strace -c`'s table for the proxy during one run of `op`, counts divided per unit."""
    argv = ["strace", "-f", "-c", "-p", str(proxy.proc.pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # strace attaches
    try:
        units = run_op(op, proxy.port, shape)
    finally:
        tracer.send_signal(signal.SIGINT)
        _, table = tracer.communicate(timeout=60)
    lines = [f"{op} ({units} {UNITS[op[2:]]}s): calls per {UNITS[op[2:]]}"]
    for line in table.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[3].isdigit():
            lines.append(f"  {cols[-1]:<16} {int(cols[3]) / units:8.2f}")
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------


def render(costs: Costs, trees: list[str], ops: list[str]) -> str:
    lines = ["| op | unit | " + " | ".join(f"{t} µs (median; min-max)" for t in trees) + " |"]
    lines.append("|---|---|" + "---:|" * len(trees))
    for op in ops:
        unit = UNITS[op[2:]]
        cells = []
        for tree in trees:
            runs = costs.runs.get((tree, op), [])
            if not runs:
                cells.append("-")
                continue
            us = [r * 1e6 for r in runs]
            cells.append(f"{statistics.median(us):,.0f} ({min(us):,.0f}-{max(us):,.0f})")
        lines.append(f"| {op} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="proxy CPU per operation, HTTP/2 and HTTP/1.1")
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a source tree to measure (repeatable; default: this checkout as 'current')",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count")
    parser.add_argument("--profile", type=Path, help="py-spy each op once into this directory")
    parser.add_argument(
        "--browser-headers",
        action="store_true",
        help="requests carry a browser's header fields (h2req/h1req), not only h2load's",
    )
    parser.add_argument("--strace", action="store_true", help="system calls per op, once")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    parser.add_argument("--json", type=Path, help="also write the raw runs here")
    args = parser.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if set(args.ops) - set(OPS):
        parser.error(f"unknown ops: {set(args.ops) - set(OPS)}")
    trees = args.tree or [f"current={targets.REPO}"]
    args.trees = [(n, Path(p).resolve()) for n, _, p in (t.partition("=") for t in trees)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (or a SIGINT, which a background job ignores) stops the servers on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Shape()
    shape = Shape(
        requests=int(base.requests * args.scale),
        handshakes=int(base.handshakes * args.scale),
        bulk_mib=max(1, int(base.bulk_mib * args.scale)),
        headers=BROWSER_HEADERS if args.browser_headers else (),
    )
    tmp = Path(tempfile.mkdtemp(prefix="h2cost-"))
    procs = Processes()
    costs = Costs()
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        ws_port, http_port, *ports = free_ports(2 + len(args.trees))
        targets.start_ws_upstream(procs, tmp, ws_port, 2)
        targets.start_nginx(
            procs, tmp, "nginx-http", targets.nginx_http_upstream_conf(tmp, http_port), http_port
        )
        proxies = [
            start_proxy(procs, tmp, name, tree, (port, ws_port, http_port))
            for (name, tree), port in zip(args.trees, ports, strict=True)
        ]
        for proxy in proxies:  # warm up: upstream pools filled, code paths imported
            for op in args.ops:
                run_op(op, proxy.port, shape, scale=0.1)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for proxy in proxies:
                for op in args.ops:
                    log(f"profile {proxy.name} {op}: {profile(proxy, op, shape, args.profile)}")
            return 0
        if args.strace:
            for proxy in proxies:
                for op in args.ops:
                    print(f"[{proxy.name}] {syscalls(proxy, op, shape)}")
            return 0
        for rep in range(args.reps):
            order = proxies if rep % 2 == 0 else proxies[::-1]
            for op in args.ops:
                for proxy in order:
                    value = measure(proxy, op, shape)
                    costs.add(proxy.name, op, value)
                    log(f"rep {rep + 1} {proxy.name} {op}: {value * 1e6:,.1f} µs/{UNITS[op[2:]]}")
        print(render(costs, [p.name for p in proxies], args.ops))
        if args.json:
            runs = {f"{t}/{o}": v for (t, o), v in costs.runs.items()}
            args.json.write_text(json.dumps({"shape": shape.__dict__, "runs": runs}, indent=1))
        return 0
    finally:
        procs.stop_all()
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
