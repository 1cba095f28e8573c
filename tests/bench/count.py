"""Where one operation's CPU goes: system calls and trio scheduling per handshake and request.

    python tests/bench/count.py [--ops 2000] [--skip strace|trio] [--json FILE]

Two counts, each over a bounded number of operations done one at a time by a blocking client
(so nothing is batched: the per-operation cost at its worst, as a lone client sees it):

- **trio**: upgradeproxy runs in this process (`upgradeproxy.serve`, see
  docs/getting-started.md, "Embedding") with a trio Instrument counting task spawns, task
  steps (each a trip through the scheduler) and epoll waits; CancelScope entries and
  wait_readable/wait_writable calls (each an epoll registration) are counted by wrapping them.
  The client runs in a plain thread, so only the proxy's tasks are counted.
- **syscalls**: upgradeproxy as deployed (`upgradeproxy run`, a separate process) under
  `strace -f -c -p PID` for the same operations.

Operations: an upgrade handshake (connect, Upgrade, 101, close: the upstream holds the tunnel
until the client closes) and a plain keep-alive GET (one connection, many requests). The
upstreams are the bench's (upstream_server.py, and nginx for /http); a warm-up runs first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import loadgen
import targets
import wire
from procs import Managed, Processes, free_ports

HERE: Final = Path(__file__).resolve().parent
GET: Final = b"GET /http HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: count\r\nAccept: */*\r\n\r\n"


# --- the client: one operation at a time ------------------------------------------------


def handshakes(port: int, count: int) -> None:
    for _ in range(count):
        sock, _rest = loadgen.open_tunnel(port, wire.PATH_HANDSHAKE)
        sock.close()


class KeepAlive:
    """One keep-alive connection sending GET /http and reading each `ok` response whole."""

    def __init__(self, port: int) -> None:
        self.sock = loadgen._connect(port)
        self.buf = b""

    def requests(self, count: int) -> None:
        for _ in range(count):
            self.sock.sendall(GET)
            while (end := self.buf.find(wire.HEAD_END)) < 0:
                self.buf += self._recv()
            head = self.buf[:end]
            found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if not head.startswith(b"HTTP/1.1 200") or found is None:
                raise loadgen.BenchError(f"unexpected response: {head[:200]!r}")
            total = end + 4 + int(found.group(1))
            while len(self.buf) < total:
                self.buf += self._recv()
            self.buf = self.buf[total:]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise loadgen.BenchError("the proxy closed the keep-alive connection")
        return data

    def close(self) -> None:
        self.sock.close()


def operations(port: int) -> dict[str, Callable[[int], None]]:
    """name -> run `n` of that operation (the keep-alive connection is opened once)."""
    conn: list[KeepAlive] = []

    def requests(n: int) -> None:
        if not conn:
            conn.append(KeepAlive(port))
        conn[0].requests(n)

    return {"handshake": lambda n: handshakes(port, n), "request": requests}


# --- upstreams and config ---------------------------------------------------------------


def start_upstreams(procs: Processes, tmp: Path) -> tuple[int, int]:
    ws, http = free_ports(2)
    targets.start_ws_upstream(procs, tmp, ws, 1)
    conf = targets.nginx_http_upstream_conf(tmp, http)
    targets.start_nginx(procs, tmp, "nginx-http", conf, http)
    return ws, http


def config_text(port: int, ws: int, http: int) -> str:
    return targets.upgradeproxy_conf(port, ws, http, 1)


# --- trio counts ------------------------------------------------------------------------


class Counts:
    """The trio events we count; a plain Counter reset between phases."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def snapshot(self) -> Counter[str]:
        return Counter(self.c)


def trio_counts(ws: int, http: int, ops: int, warmup: int) -> dict[str, dict[str, float]]:
    import trio
    import trio.lowlevel

    import upgradeproxy
    from upgradeproxy.config.loader import parse_config

    counts = Counts()
    c = counts.c

    class Counting(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            c["task spawns"] += 1

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            c["task steps"] += 1

        def before_io_wait(self, timeout: float) -> None:
            c["epoll waits (scheduler)"] += 1

    # Cancel scopes and I/O waits have no instrument hook: wrap them for this process.
    scope_enter = trio.CancelScope.__enter__
    io_cls: Any = type(trio.lowlevel.current_trio_token)  # replaced below, inside the run

    def counted_enter(self: trio.CancelScope) -> trio.CancelScope:
        c["cancel scopes"] += 1
        return scope_enter(self)

    trio.CancelScope.__enter__ = counted_enter  # type: ignore[method-assign]

    def wrap_io(runner_io: Any) -> None:
        nonlocal io_cls
        io_cls = type(runner_io)
        for name, key in (("wait_readable", "wait_readable"), ("wait_writable", "wait_writable")):
            original = getattr(io_cls, name)

            async def wrapped(self: Any, fd: Any, _o: Any = original, _k: str = key) -> None:
                c[_k] += 1
                await _o(self, fd)

            setattr(io_cls, name, wrapped)

    port = free_ports(1)[0]
    config = parse_config(config_text(port, ws, http))
    results: dict[str, dict[str, float]] = {}

    async def main() -> None:
        from trio._core._run import GLOBAL_RUN_CONTEXT  # the running I/O manager

        wrap_io(GLOBAL_RUN_CONTEXT.runner.io_manager)
        async with trio.open_nursery() as nursery:
            await nursery.start(upgradeproxy.serve, config)
            run = operations(port)
            for name, do in run.items():
                await trio.to_thread.run_sync(do, warmup)
                before = counts.snapshot()
                await trio.to_thread.run_sync(do, ops)
                after = counts.snapshot()
                after.subtract(before)
                results[name] = {k: after[k] / ops for k in sorted(after)}
            nursery.cancel_scope.cancel()

    try:
        trio.run(main, instruments=[Counting()])
    finally:
        trio.CancelScope.__enter__ = scope_enter  # type: ignore[method-assign]
    return results


# --- system calls -----------------------------------------------------------------------


def start_proxy(procs: Processes, tmp: Path, ws: int, http: int) -> tuple[Managed, int]:
    port = free_ports(1)[0]
    path = tmp / "count.yaml"
    path.write_text(config_text(port, ws, http))
    argv = [sys.executable, "-m", "upgradeproxy", "run", "--config", str(path)]
    argv += ["--log-format", "json", "--no-access-log"]
    import upgradeproxy

    # The source tree this interpreter imports (PYTHONPATH=... counts another checkout).
    source = Path(upgradeproxy.__file__).resolve().parent.parent
    proc = procs.start("upgradeproxy", argv, tmp / "upgradeproxy.log", cwd=source)
    from procs import wait_for_port

    wait_for_port(port, proc)
    return proc, port


@contextlib.contextmanager
def straced(pid: int, out: Path) -> Iterator[None]:
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # attached to every thread before the first operation
        yield
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()


def parse_strace(text: str) -> Counter[str]:
    """`strace -c` summary -> calls per system call name."""
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        numeric = len(fields) >= 5 and fields[3].isdigit() and re.match(r"^[\d.]+$", fields[0])
        if numeric and fields[-1] != "total":
            calls[fields[-1]] += int(fields[3])
    return calls


def strace_counts(tmp: Path, procs: Processes, ws: int, http: int, ops: int, warmup: int) -> dict:
    if shutil.which("strace") is None:
        raise RuntimeError("strace not found: apt-get install strace")
    proc, port = start_proxy(procs, tmp, ws, http)
    results: dict[str, dict[str, float]] = {}
    for name, do in operations(port).items():
        do(warmup)
        out = tmp / f"strace-{name}.txt"
        with straced(proc.pid, out):
            do(ops)
        calls = parse_strace(out.read_text())
        results[name] = {k: v / ops for k, v in sorted(calls.items())}
    procs.stop(proc)
    return results


# --- report -----------------------------------------------------------------------------


def table(title: str, results: dict[str, dict[str, float]], min_per_op: float = 0.05) -> str:
    names = sorted(
        {k for r in results.values() for k, v in r.items() if v >= min_per_op},
        key=lambda k: -max(r.get(k, 0.0) for r in results.values()),
    )
    ops = list(results)
    lines = [f"| {title} | " + " | ".join(f"per {o}" for o in ops) + " |"]
    lines.append("|---|" + "---:|" * len(ops))
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{results[o].get(k, 0.0):.1f}" for o in ops) + " |")
    total = " | ".join(
        f"**{sum(v for v in results[o].values()):.1f}**" if title == "system call" else ""
        for o in ops
    )
    if title == "system call":
        lines.append(f"| **all** | {total} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per count")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--skip", choices=("strace", "trio"), action="append", default=[])
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    parser.add_argument("--keep-temp", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="upgradeproxy-count-"))
    procs = Processes()
    out: dict[str, Any] = {"ops": args.ops}
    try:
        ws, http = start_upstreams(procs, tmp)
        if "trio" not in args.skip:
            result = trio_counts(ws, http, args.ops, args.warmup)
            out["trio"] = result
            print(table("trio, in-process", result, 0.0))
            print()
        if "strace" not in args.skip:
            out["syscalls"] = strace_counts(tmp, procs, ws, http, args.ops, args.warmup)
            print(table("system call", out["syscalls"]))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0
    finally:
        procs.stop_all()
        if args.keep_temp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
