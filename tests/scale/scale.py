"""The scale run: N idle WebSocket tunnels through the proxy on one machine, with the limits
of that machine (descriptors per process, ports, memory) planned for, then measured.

    bash tests/scale/run.sh [--tunnels 5000] [--all] [--idle 5] [--drain spread|wait]

Loopback only, bounded in time; every step has a deadline and a failed step ends the run
with FAIL and why. Prints the plan it chose, then a table, then PASS or FAIL (exit 0 or 1;
2 when the limits cannot fit N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script: the test suite's helpers from the repository
    sys.path.insert(0, str(ROOT))

from tests.support.clients import accepts, free_port  # noqa: E402
from tests.support.configs import config_yaml, upstream  # noqa: E402
from tests.support.processes import Process, ProxyProcess  # noqa: E402
from tests.support.procfs import children  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

UPSTREAM: Final = ROOT / "tests" / "bench" / "upstream_server.py"
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024
TICK: Final = os.sysconf("SC_CLK_TCK")
SPARE_FDS: Final = 200  # a process's descriptors for anything but tunnels
FILL: Final = 0.85  # of a worker's capacity: SO_REUSEPORT spreads by hash, not evenly
PER_PROCESS: Final = 9_000  # tunnels per client or upstream process
MAX_WORKERS: Final = 16
KERNEL_KIB_PER_TUNNEL: Final = 40  # four sockets and everything around them, generously
STEP: Final = 120.0  # seconds any one step may take


class Failed(Exception):
    """A step of the run failed: FAIL, with this message."""


class Unfit(Exception):
    """The machine's limits cannot hold the tunnels asked for."""


@dataclass
class Plan:
    tunnels: int
    workers: int
    clients: int
    upstreams: int
    capacity: int  # tunnels one worker may hold
    lines: list[str] = field(default_factory=list)


def plan_for(tunnels: int) -> Plan:
    """Workers, client and upstream processes for `tunnels`, or Unfit saying which limit."""
    if tunnels < 1:
        raise Unfit("--tunnels must be at least 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = hard if hard != resource.RLIM_INFINITY else 1 << 20
    capacity = (nofile - SPARE_FDS) // 2  # a tunnel holds two descriptors in the proxy
    if capacity < 1:
        raise Unfit(f"a process may hold only {nofile} descriptors")
    per_worker = max(1, int(capacity * FILL))
    workers = math.ceil(tunnels / per_worker)
    if workers > MAX_WORKERS:
        raise Unfit(
            f"{tunnels:,} tunnels need {workers} workers of {per_worker:,} tunnels each "
            f"({nofile:,} descriptors a process), more than the {MAX_WORKERS} this run starts"
        )
    per_process = min(PER_PROCESS, nofile - SPARE_FDS)
    clients = math.ceil(tunnels / per_process)
    upstreams = max(3, math.ceil(tunnels / per_process))
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = high - low + 1
    if math.ceil(tunnels / upstreams) > ports * 0.9:
        raise Unfit(f"{tunnels / upstreams:,.0f} connections to one upstream server exceed the "
                    f"{ports:,} local ports ({low}-{high})")  # fmt: skip
    file_max = int(Path("/proc/sys/fs/file-max").read_text())
    if 4 * tunnels + 10_000 > file_max:
        raise Unfit(f"{tunnels:,} tunnels need {4 * tunnels:,} descriptors machine-wide, "
                    f"more than fs.file-max {file_max:,}")  # fmt: skip
    available = _meminfo()["MemAvailable"]
    if tunnels * KERNEL_KIB_PER_TUNNEL > available // 2:
        need = tunnels * KERNEL_KIB_PER_TUNNEL // 1024
        raise Unfit(f"{tunnels:,} tunnels need about {need:,} MiB, "
                    f"more than half of the {available // 1024:,} MiB available")  # fmt: skip
    if soft < min(nofile, tunnels + SPARE_FDS):
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))  # children inherit it
    plan = Plan(tunnels, workers, clients, upstreams, capacity)
    plan.lines = [
        f"limits: {nofile:,} descriptors a process (hard), local ports {low}-{high}, "
        f"fs.file-max {file_max:,}, {available // 1024:,} MiB available",
        f"chose: {workers} worker(s), at most {capacity:,} tunnels each "
        f"({math.ceil(tunnels / workers):,} expected, 2 descriptors a tunnel); "
        f"{clients} client process(es) of {math.ceil(tunnels / clients):,} tunnels, "
        f"{upstreams} upstream server(s) of {math.ceil(tunnels / upstreams):,}",
    ]
    return plan


# --- /proc --------------------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        out[name] = int(rest.split()[0])
    return out


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def sockstat() -> dict[str, int]:
    """TCP sockets allocated and the kernel's TCP buffer memory (KiB)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            values = dict(zip(words[::2], (int(v) for v in words[1::2]), strict=True))
            return {"alloc": values["alloc"], "mem_kib": values["mem"] * PAGE_KIB}
    return {"alloc": 0, "mem_kib": 0}


# --- processes ----------------------------------------------------------------------------


def until(predicate: Callable[[], object], what: str, timeout: float = STEP) -> None:
    """Wait for `predicate`; a step that does not get there in `timeout` fails the run."""
    if not eventually(predicate, timeout):
        raise Failed(f"timed out after {timeout:.0f} s: {what}")


class Client:
    """A clients.py process, talked to a line at a time."""

    def __init__(self, port: int, count: int, index: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "clients.py"), "--port", str(port), "--count", str(count),
             "--index", str(index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise Failed(f"a client process exited during {command!r}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise Failed(f"a client failed during {command!r}: {answer['error']}")
        return answer

    def quit(self) -> None:
        """Close its tunnels and end it."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class Run:
    def __init__(self, plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
        self.plan, self.args, self.workdir = plan, args, workdir
        self.port, self.admin = free_port(), free_port()
        self.procs: list[Process] = []  # the upstream servers
        self.client_procs: list[subprocess.Popen[Any]] = []
        self.clients: list[Client] = []
        self.proxy: ProxyProcess | None = None
        self.rows: list[tuple[str, str]] = []

    # --- setup ---

    def start_upstreams(self) -> list[int]:
        ports = [free_port() for _ in range(self.plan.upstreams)]
        for port in ports:
            argv = [sys.executable, str(UPSTREAM), "--port", str(port), "--procs", "1"]
            self.procs.append(Process(argv, cwd=UPSTREAM.parent))
        for port in ports:
            until(lambda p=port: accepts(p), f"upstream server on port {port}", 30)
        return ports

    def start_proxy(self, upstreams: list[int]) -> None:
        config = self.workdir / "proxy.yaml"
        config.write_text(config_yaml(
            {"echo": upstream(upstreams, balance="least_conn")},
            listen=self.port, admin=self.admin, workers=self.plan.workers,
            limits={"max_connections": self.plan.capacity},
            timeouts={"tunnel_idle": 3600, "drain": self.args.drain_window},
            drain_tunnels=self.args.drain,
        ))  # fmt: skip
        self.proxy = ProxyProcess(config, cwd=ROOT, log=self.workdir / "proxy.log")
        try:
            self.proxy.ready(self.plan.workers, timeout=60)
        except AssertionError:
            raise Failed(f"the proxy did not start: {self._log_tail()}") from None

    def _log_tail(self) -> str:
        assert self.proxy is not None
        lines = self.proxy.lines()[-20:]
        return "\n".join(line for line in lines if '"upgradeproxy.access"' not in line)

    def workers(self) -> list[int]:
        assert self.proxy is not None
        pids = children(self.proxy.pid) if self.plan.workers > 1 else [self.proxy.pid]
        if len(pids) != self.plan.workers:
            raise Failed(f"found {len(pids)} worker processes, expected {self.plan.workers}")
        return pids

    def parked(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        return int(sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("upgradeproxy_tunnels_parked")))  # fmt: skip

    def all_clients(self, command: Callable[[int], str]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(len(self.clients)) as pool:
            return list(pool.map(lambda ic: ic[1].ask(command(ic[0])), enumerate(self.clients)))

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name}: {value}", flush=True)

    # --- the run ---

    def go(self) -> None:
        n, plan = self.plan.tunnels, self.plan
        self.start_proxy(self.start_upstreams())
        warm = Client(self.port, 50, 200)
        self.client_procs.append(warm.proc)
        warm.ask("open")
        warm.quit()
        time.sleep(1.0)
        rss_before, sock_before = rss_kib(self.workers()), sockstat()
        slab_before = _meminfo()["Slab"]
        shares = [n // plan.clients + (i < n % plan.clients) for i in range(plan.clients)]
        self.clients = [Client(self.port, share, i) for i, share in enumerate(shares)]
        self.client_procs.extend(c.proc for c in self.clients)
        started = time.monotonic()
        opened = sum(a["opened"] for a in self.all_clients(lambda i: "open"))
        took = time.monotonic() - started
        if opened != n:
            raise Failed(f"opened {opened:,} of {n:,} tunnels")
        self.row("opened", f"{n:,} tunnels in {took:.1f} s: {n / took:,.0f} handshakes/s "
                           f"(each with one echo)")  # fmt: skip
        until(lambda: self.parked() == n, f"all {n:,} tunnels to park", 60)
        self.row("parked", f"all {n:,}")
        sample = -1 if self.args.all else max(1, self.args.sample // plan.clients)
        seed = random.randrange(1 << 30)
        checks = self.all_clients(lambda i: f"echo {seed + i} {sample}")
        checked, bad = sum(a["checked"] for a in checks), sum(a["bad"] for a in checks)
        which = "(all)" if self.args.all else "(a random sample)"
        self.row("echo check", f"{checked:,} tunnels {which}, {bad} failed")
        if bad:
            raise Failed(f"{bad} of {checked} sampled tunnels did not echo")
        time.sleep(self.args.idle)
        until(lambda: self.parked() == n, "the checked tunnels to park again", 60)
        pids = self.workers()
        rss_after, sock_after = rss_kib(pids), sockstat()
        slab_after = _meminfo()["Slab"]
        per = (rss_after - rss_before) / n
        self.row("proxy RSS", f"{rss_before / 1024:,.1f} MiB -> {rss_after / 1024:,.1f} MiB over "
                              f"{len(pids)} worker(s): {per:.2f} KiB per idle tunnel")  # fmt: skip
        sockets = f"TCP sockets {sock_before['alloc']:,} -> {sock_after['alloc']:,}"
        self.row("kernel sockets", f"{sockets}; TCP buffer memory {sock_before['mem_kib']:,} -> "
                                   f"{sock_after['mem_kib']:,} KiB; slab "
                                   f"{(slab_after - slab_before) / n:.2f} KiB per tunnel "
                                   f"(4 sockets: client, 2 in the proxy, upstream)")  # fmt: skip
        cpu = cpu_seconds(pids)
        wakes = self.all_clients(lambda i: f"wake {self.args.wake}")
        cpu = cpu_seconds(pids) - cpu
        woken, bad = sum(a["woken"] for a in wakes), sum(a["bad"] for a in wakes)
        wall = max(a["seconds"] for a in wakes)
        self.row("wake", f"{woken:,} parked tunnels at once: all echoed in {wall * 1000:,.0f} ms, "
                         f"proxy CPU {cpu * 1000:,.0f} ms ({cpu / woken * 1e6:,.0f} us a tunnel), "
                         f"{bad} failed")  # fmt: skip
        if bad:
            raise Failed(f"{bad} of {woken} woken tunnels did not echo")
        until(lambda: self.parked() == n, "the woken tunnels to park again", 60)
        assert self.proxy is not None
        cpu = cpu_seconds(pids)
        signalled = time.monotonic()
        self.proxy.signal(signal.SIGTERM)
        window = self.args.drain_window
        ends = self.all_clients(lambda i: f"closed {window + 30}")
        left = sum(a["open"] for a in ends)
        last = max(a["seconds"] for a in ends)
        try:
            code = self.proxy.wait_exit(window + 30)
        except subprocess.TimeoutExpired:
            raise Failed("the proxy did not exit after the drain") from None
        exited = time.monotonic() - signalled
        cpu = cpu_seconds(pids) - cpu  # the workers are gone: what they used until then
        self.row("drain", f"SIGTERM, drain_tunnels {self.args.drain} over {window:g} s: "
                          f"{n - left:,} closed, the last after {last:.1f} s; proxy exit "
                          f"{code} after {exited:.1f} s")  # fmt: skip
        if left:
            raise Failed(f"{left:,} tunnels still open after the drain")
        if code != 0:
            raise Failed(f"the proxy exited with {code}: {self._log_tail()}")
        if self.args.drain == "spread" and last < window * 0.5:
            raise Failed(f"spread drain closed every tunnel within {last:.1f} s of {window} s")

    def stop(self) -> None:
        for client in self.clients:
            client.quit()
        for popen in self.client_procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)
        for proc in [*([self.proxy] if self.proxy else []), *self.procs]:
            proc.close()  # SIGKILL to its process group


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=5000, help="tunnels to open (5000)")
    parser.add_argument("--all", action="store_true", help="check that every tunnel echoes")
    parser.add_argument("--sample", type=int, default=200, help="tunnels to check (200)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds to hold them idle (5)")
    parser.add_argument("--wake", type=float, default=0.1, help="share woken at once (0.1)")
    parser.add_argument("--drain", choices=("spread", "wait"), default="spread")
    parser.add_argument("--drain-window", type=float, default=10.0,
                        help="timeouts.drain in seconds (10)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"scale run: {args.tunnels:,} WebSocket tunnels through upgradeproxy, loopback only",
          flush=True)  # fmt: skip
    try:
        plan = plan_for(args.tunnels)
    except Unfit as exc:
        print(f"cannot fit: {exc}", flush=True)
        print("FAIL", flush=True)
        return 2
    for line in plan.lines:
        print(f"  {line}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="upgradeproxy-scale-") as tmp:
        run = Run(plan, args, Path(tmp))
        try:
            run.go()
        except (Failed, OSError) as exc:
            print(f"  failed: {exc}", flush=True)
            verdict = "FAIL"
        else:
            verdict = "PASS"
        finally:
            run.stop()
    print(f"\n| {'measure':<15} | value |\n|{'-' * 17}|-------|")
    for name, value in run.rows:
        print(f"| {name:<15} | {value} |")
    print(f"\n{verdict} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
