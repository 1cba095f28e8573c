"""upgradeproxy vs nginx vs no proxy at all, on loopback, in one interleaved run (issue 5).

    bash tests/bench/run.sh            # installs nginx, wrk, websockets; then runs this
    python tests/bench/bench.py [--quick] [--tests throughput,rtt,...] [--profile]

Targets: "direct" (the upstream itself), "nginx" (1 worker, the standard WebSocket proxy
config, 64 KiB buffers, upstream keepalive) and "upgradeproxy" (the equivalent YAML). Every
test runs its repetitions in rotation over the three, so drift of the machine (thermal,
noisy neighbours) hits them alike. Results go to tests/bench/results/latest.md (and .json;
quick.md and quick.json for --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final, Literal

import h2bench
import loadgen
import report
import targets
import wire
from procs import CpuWindow, Managed, Processes, free_ports, rss_kib
from report import Figure, Goal, Row, Run

from tests.support.waiting import eventually

HERE: Final = Path(__file__).resolve().parent
RESULTS: Final = HERE / "results"
TESTS: Final = (
    "throughput", "rtt", "handshakes", "rss", "wake", "http", "scaling", "h2", "websocket",
    "tunnel_sweep",
)  # fmt: skip
PROFILED: Final = ("handshakes", "http", "rtt", "tunnel_up", "tunnel_down")
MB: Final = 1e6  # throughput is in MB/s, 10^6 bytes per second
# The `websocket` test's route block (rule 18): every check and limit on, none ever reached.
WS_BLOCK: Final = (
    "{max_message_bytes: 1073741824, max_frame_bytes: 1073741824, messages_per_second: 1000000}"
)
WS_TARGET: Final = "upgradeproxy+websocket"
# Longer than upgradeproxy's park delay (a tunnel parks 0.5-1 s after its last byte), twice:
# idle tunnels are weighed parked, and a "quiet" tunnel is a parked one.
QUIET: Final = 2.5


@dataclass(frozen=True)
class Plan:
    """How much of each test to run; `quick()` is the CI smoke-run size (well under 60 s)."""

    tunnel_bytes: int = 1 << 30
    tunnel_reps: int = 5
    rtt_count: int = 10_000
    rtt_chunks: int = 5  # the round trips are split into this many interleaved chunks
    rtt_warmup: int = 200
    hs_seconds: float = 10.0
    hs_reps: int = 3
    hs_clients: int = 64
    hs_procs: int = 2  # client processes sharing the 64 connections
    rss_tunnels: int = 5_000
    rss_tunnels_large: int = 9_000  # about the most one process holds at 20,000 descriptors
    wake_tunnels: int = 50  # each gives one first-message-after-quiet round trip a round
    wake_rounds: int = 2
    http_seconds: float = 10.0
    http_reps: int = 3
    http_conns: int = 50
    scaling_reps: int = 2
    h2_seconds: float = 10.0
    h2_reps: int = 3
    h2_conns: int = 10  # h2load connections, each with h2_streams requests in flight
    h2_streams: int = 10
    h2_handshake_streams: int = 64  # extended CONNECTs in flight on one connection
    h2_tunnel_bytes: int = 256 << 20
    upstream_procs: int = 2
    time_limit: float = 1800.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            tunnel_bytes=64 << 20,
            tunnel_reps=1,
            rtt_count=1_000,
            rtt_chunks=1,
            rtt_warmup=50,
            hs_seconds=2.0,
            hs_reps=1,
            rss_tunnels=300,
            rss_tunnels_large=600,
            wake_tunnels=10,
            wake_rounds=1,
            http_seconds=2.0,
            http_reps=1,
            scaling_reps=1,
            h2_seconds=2.0,
            h2_reps=1,
            h2_tunnel_bytes=16 << 20,
            time_limit=120.0,
        )


@dataclass
class Results:
    figures: dict[str, Figure] = field(default_factory=dict)
    scaling: dict[str, Figure] = field(default_factory=dict)
    scaling_note: str = ""
    sweep: dict[str, Figure] = field(default_factory=dict)
    h2: dict[str, Figure] = field(default_factory=dict)  # HTTP/2 rows, beside HAProxy
    websocket: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotation(items: list[targets.Target], rep: int) -> list[targets.Target]:
    """The targets starting at a different one each repetition, so none is always first."""
    k = rep % len(items)
    return items[k:] + items[:k]


class Bench:
    def __init__(
        self,
        plan: Plan,
        tmp: Path,
        peers: tuple[str, ...] = (),
        variants: tuple[targets.Variant, ...] = (),
    ) -> None:
        self.plan = plan
        self.peers = peers
        self.variants = variants
        self.tmp = tmp
        self.procs = Processes()
        self.results = Results()
        self.targets: list[targets.Target] = []
        self.ws_upstream: Managed | None = None
        self.http_upstream: Managed | None = None
        self.ports: dict[str, int] = {}

    # --- setup -------------------------------------------------------------------------

    def start(self) -> None:
        names = ("ws", "http", "nginx", "nginx_http", "upgradeproxy", "upgradeproxy_w2")
        names += ("haproxy", "mitmproxy", "mitmproxy_http", "upgradeproxy_h2")
        names += ("upgradeproxy_ws",)
        names += tuple(v.name for v in self.variants)
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        p = self.ports
        log(f"temp dir {self.tmp}; starting upstreams, nginx and upgradeproxy")
        self.ws_upstream = targets.start_ws_upstream(
            self.procs, self.tmp, p["ws"], self.plan.upstream_procs
        )
        self.http_upstream = targets.start_nginx(
            self.procs,
            self.tmp,
            "nginx-http",
            targets.nginx_http_upstream_conf(self.tmp, p["http"]),
            p["http"],
        )
        nginx = targets.start_nginx(
            self.procs,
            self.tmp,
            "nginx",
            targets.nginx_proxy_conf(self.tmp, p["nginx"], p["ws"], p["http"]),
            p["nginx"],
        )
        proxy = targets.start_upgradeproxy(
            self.procs, self.tmp, "upgradeproxy", p["upgradeproxy"], p["ws"], p["http"], 1
        )
        self.targets = [
            targets.Target("direct", p["ws"], p["http"], None),
            targets.Target("nginx", p["nginx"], p["nginx"], nginx),
            targets.Target("upgradeproxy", p["upgradeproxy"], p["upgradeproxy"], proxy),
        ]
        if "haproxy" in self.peers:
            ha = targets.start_haproxy(self.procs, self.tmp, p["haproxy"], p["ws"], p["http"])
            self.targets.insert(2, targets.Target("haproxy", p["haproxy"], p["haproxy"], ha))
        if "mitmproxy" in self.peers:
            mitm = targets.start_mitmproxy(
                self.procs, self.tmp, p["mitmproxy"], p["mitmproxy_http"], p["ws"], p["http"]
            )
            at = len(self.targets) - 1
            self.targets.insert(
                at, targets.Target("mitmproxy", p["mitmproxy"], p["mitmproxy_http"], mitm)
            )
        for v in self.variants:
            port = p[v.name]
            proc = targets.start_upgradeproxy(
                self.procs, self.tmp, v.name, port, p["ws"], p["http"], 1, v
            )
            self.targets.append(targets.Target(v.name, port, port, proc))
            report.TARGETS.append(v.name)
        for target in self.targets:
            self.sanity_check(target)

    def sanity_check(self, target: targets.Target) -> None:
        """One echo through a real WebSocket client and one plain GET, before measuring.

        The bench's own clients and upstream speak raw bytes; `websockets` proves that those
        bytes are a correct WebSocket conversation through each target.
        """
        from websockets.sync.client import connect

        url = f"ws://127.0.0.1:{target.port}{wire.PATH_ECHO}"
        with connect(url, open_timeout=10, close_timeout=5) as ws:
            ws.send(b"sanity")
            if ws.recv(timeout=10) != b"sanity":
                raise RuntimeError(f"{target.name}: the echo through it is wrong")
        conn = http.client.HTTPConnection("127.0.0.1", target.http_port, timeout=10)
        try:
            conn.request("GET", wire.PATH_HTTP)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or body != b"ok":
            raise RuntimeError(f"{target.name}: GET /http gave {response.status} {body!r}")

    def window(
        self, target: targets.Target, upstream: Managed | None, in_process: bool
    ) -> CpuWindow:
        watched: dict[str, Managed] = {}
        if upstream is not None:
            watched["upstream"] = upstream
        if target.proc is not None:
            watched["proxy"] = target.proc
        return CpuWindow(watched, client_in_process=in_process)

    # --- 1. tunnel throughput ----------------------------------------------------------

    def throughput(self) -> None:
        plan = self.plan
        up = Figure("tunnel throughput client→upstream (MB/s)", "MB/s", True)
        down = Figure("tunnel throughput upstream→client (MB/s)", "MB/s", True)
        self.results.figures["tunnel_up"] = up
        self.results.figures["tunnel_down"] = down
        size = plan.tunnel_bytes
        for rep in range(plan.tunnel_reps):
            for target in rotation(self.targets, rep):
                for fig, move in ((up, loadgen.upload), (down, loadgen.download)):
                    win = self.window(target, self.ws_upstream, in_process=True)
                    seconds = move(target.port, size, win.clock)
                    rate = size / seconds / MB
                    per_mb = _per_op(win, size / MB)
                    fig.runs[target.name].append(Run(rate, win.result, per_op=per_mb))
                    log(f"  {fig.label} rep {rep + 1} {target.name}: {rate:,.0f}")

    # --- 1b. tunnel conditions ----------------------------------------------------------

    # (direction, MiB moved, bytes per write of the sender, placement)
    SWEEP: Final = (
        ("up", 16, 1 << 20, "unpinned"),
        ("up", 256, 1 << 20, "unpinned"),
        ("up", 256, 65536, "unpinned"),
        ("up", 256, 16384, "unpinned"),
        ("up", 256, 4096, "unpinned"),
        ("up", 256, 1 << 20, "split"),
        ("up", 256, 1 << 20, "shared"),
        ("down", 16, 1 << 20, "unpinned"),
        ("down", 256, 1 << 20, "unpinned"),
        ("down", 256, 65536, "unpinned"),
        ("down", 256, 16384, "unpinned"),
        ("down", 256, 4096, "unpinned"),
        ("down", 256, 1 << 20, "split"),
        ("down", 256, 1 << 20, "shared"),
    )

    def tunnel_sweep(self) -> None:
        """Tunnel MB/s and proxy CPU per MB over transfer sizes, write sizes and placements:
        where the tunnel ratio to nginx comes from (issue 13). Interleaved, `tunnel_reps`."""
        group = [t for t in self.targets if t.name != "mitmproxy"]
        for direction, mib, write, where in self.SWEEP:
            move = loadgen.upload if direction == "up" else loadgen.download
            key = f"{direction}, {mib} MiB, {_size(write)} writes, {where}"
            fig = Figure(key, "MB/s", True)
            self.results.sweep[key] = fig
            size = mib << 20
            placement = contextlib.nullcontext() if where == "unpinned" else self.pinned(where)  # type: ignore[arg-type]
            with placement:
                for rep in range(max(self.plan.tunnel_reps, 3)):
                    for target in rotation(group, rep):
                        win = self.window(target, self.ws_upstream, in_process=True)
                        seconds = move(target.port, size, win.clock, write)
                        rate = size / seconds / MB
                        run = Run(rate, win.result, per_op=_per_op(win, size / MB))
                        fig.runs[target.name].append(run)
            log(f"  {key}: " + ", ".join(f"{t.name} {fig.median(t.name) or 0:,.0f}" for t in group))

    # --- 1c. a route that reads WebSocket frames ----------------------------------------

    # (direction, payload bytes per frame)
    WS_CONDITIONS: Final = (("up", 1 << 20), ("up", 16384), ("down", 1 << 20), ("down", 16384))

    def websocket(self) -> None:
        """Tunnel MB/s and round trips through a route with a `websocket` block (rule 18),
        beside upgradeproxy's spliced route and direct: what reading the frames costs, in
        MB/s and in proxy CPU per MB and per round trip. Interleaved, `tunnel_reps`."""
        port = self.ports["upgradeproxy_ws"]
        proc = targets.start_upgradeproxy(
            self.procs, self.tmp, WS_TARGET, port, self.ports["ws"], self.ports["http"], 1,
            websocket=WS_BLOCK,
        )  # fmt: skip
        framed = targets.Target(WS_TARGET, port, port, proc)
        self.sanity_check(framed)
        if WS_TARGET not in report.TARGETS:
            report.TARGETS.append(WS_TARGET)
        group = [t for t in self.targets if t.name in ("direct", "upgradeproxy")] + [framed]
        for direction, payload in self.WS_CONDITIONS:
            unit = wire.frame_size(payload, masked=direction == "up")
            size = max(1, self.plan.tunnel_bytes // unit) * unit
            key = f"{direction}, {_size(payload)} frames (MB/s; CPU µs per MB)"
            fig = Figure(key, "MB/s", True)
            self.results.websocket[key] = fig
            move = loadgen.upload if direction == "up" else loadgen.download
            for rep in range(self.plan.tunnel_reps):
                for target in rotation(group, rep):
                    win = self.window(target, self.ws_upstream, in_process=True)
                    seconds = move(target.port, size, win.clock, framed=payload)
                    run = Run(size / seconds / MB, win.result, per_op=_per_op(win, size / MB))
                    fig.runs[target.name].append(run)
            log(f"  {key}: " + ", ".join(f"{t.name} {fig.median(t.name) or 0:,.0f}" for t in group))
        key = "round trip of 32 B, one in flight, p50 (µs; CPU µs per round trip)"
        fig = Figure(key, "µs", False)
        self.results.websocket[key] = fig
        plan = self.plan
        for chunk in range(plan.rtt_chunks):
            for target in rotation(group, chunk):
                win = self.window(target, self.ws_upstream, in_process=True)
                count = plan.rtt_count // plan.rtt_chunks
                with win.measure():
                    ns = sorted(loadgen.round_trips(target.port, count, plan.rtt_warmup))
                per = _per_op(win, count + plan.rtt_warmup)
                fig.runs[target.name].append(Run(_percentile(ns, 50) / 1e3, win.result, "", per))
        log(f"  {key}: " + ", ".join(f"{t.name} {fig.median(t.name) or 0:.1f}" for t in group))

    # --- 2. round trips ----------------------------------------------------------------

    def rtt(self) -> None:
        """Round trips with every process on one CPU (the target), then split over two."""
        modes: list[tuple[Literal["shared", "split"], str]] = [
            ("shared", "rtt"),
            ("split", "rtt_split"),
        ]
        for mode, key in modes:
            where = "all on one CPU" if mode == "shared" else "proxy on its own CPU"
            p50 = Figure(f"WebSocket round trip p50 (µs), {where}", "µs", False)
            p99 = Figure(f"WebSocket round trip p99 (µs), {where}", "µs", False)
            self.results.figures[f"{key}_p50"] = p50
            self.results.figures[f"{key}_p99"] = p99
            with self.pinned(mode):
                samples, cpu, ops = self.rtt_series()
            for target in self.targets:
                ns = sorted(samples[target.name])
                roles = cpu[target.name]
                mean_cpu = {r: statistics.fmean(c.get(r, 0.0) for c in roles) for r in roles[0]}
                mean_op = statistics.median(ops[target.name]) if ops[target.name] else None
                p50.runs[target.name].append(Run(_percentile(ns, 50) / 1e3, mean_cpu, "", mean_op))
                p99.runs[target.name].append(Run(_percentile(ns, 99) / 1e3, mean_cpu))
                log(
                    f"  round trip ({where}) {target.name}: p50 {_percentile(ns, 50) / 1e3:.1f}"
                    f" µs, p99 {_percentile(ns, 99) / 1e3:.1f} µs over {len(ns)}"
                )

    def rtt_series(
        self,
    ) -> tuple[dict[str, list[int]], dict[str, list[dict[str, float]]], dict[str, list[float]]]:
        """`rtt_count` round trips per target in interleaved chunks: (samples, CPU per chunk,
        proxy CPU µs per round trip per chunk)."""
        plan = self.plan
        per_chunk = plan.rtt_count // plan.rtt_chunks
        samples: dict[str, list[int]] = {t.name: [] for t in self.targets}
        cpu: dict[str, list[dict[str, float]]] = {t.name: [] for t in self.targets}
        ops: dict[str, list[float]] = {t.name: [] for t in self.targets}
        for chunk in range(plan.rtt_chunks):
            for target in rotation(self.targets, chunk):
                win = self.window(target, self.ws_upstream, in_process=True)
                with win.measure():
                    got = loadgen.round_trips(target.port, per_chunk, plan.rtt_warmup)
                samples[target.name].extend(got)
                cpu[target.name].append(win.result)
                per = _per_op(win, per_chunk + plan.rtt_warmup)
                if per is not None:
                    ops[target.name].append(per)
        return samples, cpu, ops

    @contextlib.contextmanager
    def pinned(self, mode: Literal["shared", "split"]) -> Iterator[None]:
        """Pin the client (this process), the upstream and the proxies for a latency test.

        One message in flight makes latency hinge on where the scheduler puts each process:
        a wakeup on another CPU costs an inter-processor interrupt, which in a VM is tens of
        µs. Left to the scheduler, nginx's added p50 flipped between ~19 and ~55 µs from run
        to run. "shared": everything on the first CPU, so the added latency is the proxy's own
        work plus two context switches, stable to a few percent. "split": the proxies on the
        last CPU, so each pays the same four cross-CPU wakeups per round trip (as a proxy on
        its own core would) and direct pays none.
        """
        cpus = sorted(os.sched_getaffinity(0))
        proxy_cpu = cpus[0] if mode == "shared" else cpus[-1]
        groups: list[tuple[list[int], set[int]]] = [([os.getpid()], {cpus[0]})]
        if self.ws_upstream is not None:
            groups.append((self.ws_upstream.pids(), {cpus[0]}))
        for target in self.targets:
            if target.proc is not None:
                groups.append((target.proc.pids(), {proxy_cpu}))
        try:
            for pids, where in groups:
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(pid, where)
            yield
        finally:
            for pids, _ in groups:
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(pid, cpus)

    # --- 3. handshakes -----------------------------------------------------------------

    def handshake_run(self, target: targets.Target, seconds: float) -> Run:
        """64 clients over `hs_procs` processes doing connect/Upgrade/101/close for `seconds`."""
        plan = self.plan
        conns = [plan.hs_clients // plan.hs_procs] * plan.hs_procs
        conns[0] += plan.hs_clients - sum(conns)
        argv = [sys.executable, str(HERE / "loadgen.py"), "handshakes", "--port", str(target.port)]
        win = self.window(target, self.ws_upstream, in_process=False)
        with win.measure():
            clients = [
                subprocess.Popen(
                    [*argv, "--conns", str(n), "--seconds", str(seconds)],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                )
                for n in conns
            ]
            outs = [c.communicate(timeout=seconds + 30)[0] for c in clients]
        got = [json.loads(out) for out in outs]
        ok = sum(g["ok"] for g in got)
        errors = sum(g["errors"] for g in got)
        elapsed = max(g["seconds"] for g in got)
        if errors:
            self.results.notes.append(f"handshakes via {target.name}: {errors:.0f} failed cycles")
        if not ok:
            raise RuntimeError(f"handshakes via {target.name}: none succeeded")
        return Run(ok / elapsed, win.result, "handshakes/s", _per_op(win, ok))

    def handshakes(self) -> None:
        fig = Figure("upgrade handshakes/s (64 clients)", "/s", True)
        self.results.figures["handshakes"] = fig
        for rep in range(self.plan.hs_reps):
            for target in rotation(self.targets, rep):
                run = self.handshake_run(target, self.plan.hs_seconds)
                fig.runs[target.name].append(run)
                log(f"  handshakes rep {rep + 1} {target.name}: {run.value:,.0f}/s")

    # --- 4. RSS per idle tunnel --------------------------------------------------------

    def rss(self) -> None:
        for key, count in (
            ("rss", self.plan.rss_tunnels),
            ("rss_large", self.plan.rss_tunnels_large),
        ):
            self.rss_at(key, count)

    def rss_at(self, key: str, count: int) -> None:
        fig = Figure(f"RSS per idle tunnel, {count:,} open (KiB)", "KiB", False)
        self.results.figures[key] = fig
        for target in self.targets:
            if target.proc is None:
                continue  # no proxy, nothing to weigh
            proc = target.proc
            # Warm the code paths and allocator once, so the delta is the tunnels', not the
            # first-use cost of the code (small, to leave little reusable free memory).
            loadgen.close_all(loadgen.open_idle_tunnels(target.port, 50))
            time.sleep(1.0)
            before = rss_kib(proc.pids())
            win = self.window(target, self.ws_upstream, in_process=True)
            with win.measure():
                socks = loadgen.open_idle_tunnels(target.port, count)
            try:
                time.sleep(QUIET)  # idle: parked, for a proxy that parks idle tunnels
                after = rss_kib(proc.pids())
            finally:
                loadgen.close_all(socks)
            per = (after - before) / count
            fig.runs[target.name].append(Run(per, win.result))
            log(f"  RSS {target.name}: {before:,} KiB -> {after:,} KiB, {per:.1f} KiB/tunnel")
            time.sleep(2.0)  # let it close them before the next target is weighed

    # --- 4b. waking a quiet tunnel ------------------------------------------------------

    def wake(self) -> None:
        """The first message after a quiet spell longer than the park delay, and the next
        one, each a timed round trip, with every process on one CPU (as the rtt test)."""
        first = Figure(f"round trip p50 (µs), first message after {QUIET:g} s quiet", "µs", False)
        then = Figure("round trip p50 (µs), the message right after it", "µs", False)
        self.results.figures["wake_first"] = first
        self.results.figures["wake_next"] = then
        with self.pinned("shared"):
            for rep in range(self.plan.wake_rounds):
                for target in rotation(self.targets, rep):
                    woken, active = loadgen.quiet_round_trips(
                        target.port, self.plan.wake_tunnels, QUIET
                    )
                    first.runs[target.name].append(Run(statistics.median(woken) / 1e3, {}))
                    then.runs[target.name].append(Run(statistics.median(active) / 1e3, {}))
                    log(
                        f"  wake {target.name}: first after quiet p50 "
                        f"{statistics.median(woken) / 1e3:.1f} µs, next "
                        f"{statistics.median(active) / 1e3:.1f} µs"
                    )

    # --- 5. plain HTTP -----------------------------------------------------------------

    def wrk_run(self, target: targets.Target, seconds: float) -> Run:
        plan = self.plan
        url = f"http://127.0.0.1:{target.http_port}{wire.PATH_HTTP}"
        argv = ["wrk", "-t1", f"-c{plan.http_conns}", f"-d{seconds:g}s", url]
        win = self.window(target, self.http_upstream, in_process=False)
        with win.measure():
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed on {target.name}: {out.stderr}")
        found = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
        if found is None:
            raise RuntimeError(f"no Requests/sec in wrk output: {out.stdout}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
        errs = re.search(r"Socket errors: (.*)", out.stdout)
        problems = [m.group(0) for m in (bad, errs) if m is not None]
        if problems:
            self.results.notes.append(f"wrk via {target.name}: {'; '.join(problems)}")
        done = re.search(r"(\d+) requests in", out.stdout)
        per = _per_op(win, int(done.group(1))) if done else None
        return Run(float(found.group(1)), win.result, "req/s", per)

    def http(self) -> None:
        fig = Figure(f"plain HTTP keep-alive req/s (wrk -t1 -c{self.plan.http_conns})", "/s", True)
        self.results.figures["http"] = fig
        for rep in range(self.plan.http_reps):
            for target in rotation(self.targets, rep):
                run = self.wrk_run(target, self.plan.http_seconds)
                fig.runs[target.name].append(run)
                log(f"  HTTP rep {rep + 1} {target.name}: {run.value:,.0f} req/s")

    # --- HTTP/2 (rule 17) ---------------------------------------------------------------

    def h2(self) -> None:
        """HTTP/2 from clients, beside HAProxy: h2load requests/s, WebSocket-over-h2
        handshakes/s and tunnel MB/s over one connection, each with the proxy's CPU per op."""
        plan, p = self.plan, self.ports
        proc = h2bench.start_upgradeproxy_h2(
            self.procs, self.tmp, p["upgradeproxy_h2"], p["ws"], p["http"]
        )
        group = [targets.Target("upgradeproxy", p["upgradeproxy_h2"], p["upgradeproxy_h2"], proc)]
        group += [t for t in self.targets if t.name == "haproxy"]
        label = f"HTTP/2 req/s (h2load -c{plan.h2_conns} -m{plan.h2_streams})"
        req = self.results.h2["requests"] = Figure(label, "/s", True)
        label = f"WebSocket-over-h2 handshakes/s ({plan.h2_handshake_streams} on one connection)"
        hs = self.results.h2["handshakes"] = Figure(label, "/s", True)
        label = f"tunnel MB/s client→upstream, one stream ({_size(plan.h2_tunnel_bytes)})"
        up = self.results.h2["tunnel_up"] = Figure(label, "MB/s", True)
        try:
            for rep in range(plan.h2_reps):
                for target in rotation(group, rep):
                    win = self.window(target, self.http_upstream, in_process=False)
                    with win.measure():
                        rate, done, problems = h2bench.h2load(
                            target.port, plan.h2_seconds, plan.h2_conns, plan.h2_streams
                        )
                    if problems:
                        self.results.notes.append(f"h2load via {target.name}: {problems}")
                    req.runs[target.name].append(Run(rate, win.result, "", _per_op(win, done)))
                    win = self.window(target, self.ws_upstream, in_process=True)
                    with win.measure():
                        count = h2bench.handshakes(
                            target.port, plan.h2_seconds, plan.h2_handshake_streams
                        )
                    run = Run(count / plan.h2_seconds, win.result, "", _per_op(win, count))
                    hs.runs[target.name].append(run)
                    win = self.window(target, self.ws_upstream, in_process=True)
                    size = plan.h2_tunnel_bytes
                    seconds = h2bench.upload(target.port, size, win.clock)
                    up.runs[target.name].append(
                        Run(size / seconds / MB, win.result, "", _per_op(win, size / MB))
                    )
                    log(
                        f"  h2 rep {rep + 1} {target.name}: {rate:,.0f} req/s, "
                        f"{count / plan.h2_seconds:,.0f} handshakes/s, "
                        f"{size / seconds / MB:,.0f} MB/s"
                    )
        finally:
            self.procs.stop(proc)

    # --- workers: N --------------------------------------------------------------------

    def scaling(self) -> None:
        """upgradeproxy with `workers: 1` against `workers: 2`, if the latter exists yet."""
        p = self.ports
        one = next(t for t in self.targets if t.name == "upgradeproxy")
        proc = targets.start_upgradeproxy(
            self.procs, self.tmp, "upgradeproxy-w2", p["upgradeproxy_w2"], p["ws"], p["http"], 2
        )
        # A supervisor binds the sockets itself and starts its workers one by one: wait until
        # both said "worker ready" (or it is clear that this upgradeproxy runs `workers: 2` as
        # one process), or a load started early would pin every connection on the first.
        port = p["upgradeproxy_w2"]
        eventually(lambda: targets.workers_ready(proc) >= 2, 10.0)
        found = targets.worker_count(proc)
        if found < 2:
            self.results.scaling_note = (
                "not available: with `workers: 2` upgradeproxy still ran as one process"
            )
            log(f"  workers: 2 -> {found} process; scaling {self.results.scaling_note}")
            self.procs.stop(proc)
            return
        two = targets.Target("upgradeproxy x2", port, port, proc)
        self.sanity_check(two)
        self.results.scaling_note = f"`workers: 2` ran as {found} processes"
        hs = Figure("upgrade handshakes/s", "/s", True)
        rq = Figure("plain HTTP req/s", "/s", True)
        self.results.scaling = {"handshakes": hs, "http": rq}
        pair = [one, two]
        try:
            for rep in range(self.plan.scaling_reps):
                for target in rotation(pair, rep):
                    key = "N=1" if target is one else "N=2"
                    run = self.handshake_run(target, self.plan.hs_seconds)
                    hs.runs[key].append(run)
                    log(f"  scaling handshakes {key}: {run.value:,.0f}/s")
                    run = self.wrk_run(target, self.plan.http_seconds)
                    rq.runs[key].append(run)
                    log(f"  scaling HTTP {key}: {run.value:,.0f} req/s")
        finally:
            self.procs.stop(proc)

    # --- profile -----------------------------------------------------------------------

    def profile(self, tests: list[str]) -> str:
        """py-spy on upgradeproxy (workers: 1) while one bench load runs against it."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            raise RuntimeError("py-spy not found: run tests/bench/profile.sh, which installs it")
        target = next(t for t in self.targets if t.name == "upgradeproxy")
        assert target.proc is not None
        seconds = max(self.plan.hs_seconds, 5.0)
        loads: dict[str, Callable[[], Run]] = {
            "handshakes": lambda: self.handshake_run(target, seconds),
            "http": lambda: self.wrk_run(target, seconds),
            "rtt": lambda: self.rtt_for(target, seconds),
            "tunnel_up": lambda: self.tunnel_for(target, seconds, loadgen.upload),
            "tunnel_down": lambda: self.tunnel_for(target, seconds, loadgen.download),
        }
        parts = []
        for name in tests:
            out = RESULTS / f"profile-{name}.txt"
            # Not --nonblocking: reading a running interpreter's memory races with it and
            # truncates about 2/3 of the stacks here; a brief pause per sample at 200 Hz costs
            # a few percent. Raw output is collapsed stacks (speedscope opens it).
            argv = [spy, "record", "--pid", str(target.proc.pid), "--rate", "200"]
            argv += ["--duration", f"{seconds + 1:g}", "--format", "raw"]
            argv += ["--output", str(out)]
            recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(0.5)  # attached before the load starts
                run = loads[name]()
                _, err = recorder.communicate(timeout=seconds + 30)
            finally:
                if recorder.poll() is None:
                    recorder.kill()
                    recorder.wait()
            if not out.exists():
                raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')}")
            log(f"  profiled {name}: {run.value:,.1f} -> {out}")
            prof = report.Profile.parse(out.read_text())
            parts.append(prof.markdown(f"upgradeproxy, {name} load ({run.value:,.1f} {run.unit})"))
        return "\n\n".join(parts)

    def tunnel_for(self, target: targets.Target, seconds: float, move: Callable[..., float]) -> Run:
        """256 MiB transfers one way until `seconds` pass; the value is the mean MB/s."""
        size, moved, spent = 256 << 20, 0, 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            spent += move(target.port, size, lambda mark: None)
            moved += size
        return Run(moved / spent / MB, {}, "MB/s")

    def rtt_for(self, target: targets.Target, seconds: float) -> Run:
        """Round trips in chunks until `seconds` pass; the value is the p50 in µs."""
        samples: list[int] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples += loadgen.round_trips(target.port, 2_000, 50)
        return Run(_percentile(sorted(samples), 50) / 1e3, {}, "µs p50 round trip")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _per_op(win: CpuWindow, ops: float) -> float | None:
    """The proxy's CPU µs per operation over the window (None for direct: no proxy)."""
    if "proxy" not in win.used or ops <= 0:
        return None
    return win.used["proxy"] / ops * 1e6


def _percentile(sorted_values: list[int], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


# --- the report ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
        # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
        wrk = (out.stdout or out.stderr).split("\n")[0].split(" [")[0].strip()
    from upgradeproxy import __version__

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model}, nproc {len(os.sched_getaffinity(0))}, {_mem_gib():.0f} GiB RAM",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": targets.nginx_version(),
        "wrk": wrk,
        "upgradeproxy": __version__,
        "peers": ", ".join(targets.peer_version(p) for p in ("haproxy", "mitmproxy")),
    }


def _mem_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def render_h2(figures: dict[str, Figure]) -> str:
    """The HTTP/2 rows: upgradeproxy (a listener with `http2: true`) beside HAProxy, with the
    proxy's CPU per operation; nginx does not translate RFC 8441, so it has no row here."""
    if not figures:
        return ""
    out = [
        "## HTTP/2 from clients (rule 17), beside HAProxy",
        "",
        "| figure | upgradeproxy | haproxy | upgradeproxy ÷ haproxy | proxy CPU per op "
        "(upgradeproxy / haproxy) |",
        "|---|---:|---:|---:|---|",
    ]
    for fig in figures.values():
        ours, theirs = fig.median("upgradeproxy"), fig.median("haproxy")
        ratio = report.ratio(ours, theirs)
        per = [
            statistics.median(v) if (v := [r.per_op for r in fig.runs.get(t, [])
                                           if r.per_op is not None]) else None
            for t in ("upgradeproxy", "haproxy")
        ]  # fmt: skip
        cpu = " / ".join("-" if x is None else f"{x:,.1f} µs" for x in per)
        out.append(
            f"| {fig.label} | {_num(ours)} | {_num(theirs)} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {cpu} |"
        )
    return "\n".join(out) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(plan: Plan, results: Results, info: dict[str, str], quick: bool) -> str:
    figs = results.figures
    rows: list[Row] = []

    def add(key: str, goal: Goal | None, fmt: Callable[[float], str]) -> None:
        if key not in figs:
            return
        fig = figs[key]
        values = {t: fig.median(t) for t in report.TARGETS}
        rows.append(
            Row(fig.label, values, report.ratio(values["upgradeproxy"], values["nginx"]), goal, fmt)
        )

    def added(key: str, label: str, goal: Goal | None) -> None:
        """What a proxy adds to the direct round trip; the target compares these."""
        if key not in figs:
            return
        fig = figs[key]
        direct = fig.median("direct")
        values: dict[str, float | None] = {"direct": None}
        for t in report.proxies():
            m = fig.median(t)
            values[t] = m - direct if m is not None and direct is not None else None
        ratio = report.ratio(values["upgradeproxy"], values["nginx"])
        label = f"round trip added by the proxy (µs), {label}"
        rows.append(Row(label, values, ratio, goal, report.fmt_1))

    def per_core(key: str, label: str) -> None:
        """Rate per CPU-second the proxy used: fair even where the 2-core machine, not the
        proxy, was the limit (then nginx's rate is a floor, and its ratio flatters us)."""
        if key not in figs:
            return
        fig = figs[key]
        values: dict[str, float | None] = {"direct": None}
        for t in report.proxies():
            rate, busy = fig.median(t), fig.cpu(t).get("proxy", 0.0)
            values[t] = rate / (busy / 100) if rate is not None and busy > 0 else None
        rows.append(
            Row(
                label,
                values,
                report.ratio(values["upgradeproxy"], values["nginx"]),
                None,
                report.fmt_int,
            )
        )

    add("tunnel_up", Goal("≥ 1.0x", 1.0, True), report.fmt_int)
    add("tunnel_down", Goal("≥ 1.0x", 1.0, True), report.fmt_int)
    add("rtt_p50", None, report.fmt_1)
    add("rtt_p99", None, report.fmt_1)
    added("rtt_p50", "p50, all on one CPU", Goal("≤ 1.5x", 1.5, False))
    added("rtt_p99", "p99, all on one CPU", None)
    add("rtt_split_p50", None, report.fmt_1)
    added("rtt_split_p50", "p50, proxy on its own CPU", None)
    added("rtt_split_p99", "p99, proxy on its own CPU", None)
    # The targets of issue 13 (the first cycle's were 0.5x and 0.25x).
    add("handshakes", Goal("≥ 0.25x", 0.25, True), report.fmt_int)
    per_core("handshakes", "handshakes per proxy core-second")
    add("rss", Goal("≤ 1.0x", 1.0, False), report.fmt_1)
    add("rss_large", None, report.fmt_1)
    add("wake_first", None, report.fmt_1)
    add("wake_next", None, report.fmt_1)
    add("http", Goal("≥ 0.10x", 0.10, True), report.fmt_int)
    per_core("http", "plain HTTP requests per proxy core-second")

    lines = [
        "## Benchmark results"
        + (" (QUICK smoke run: small counts, not comparable)" if quick else ""),
        "",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['kernel']}",
        f"- software: Python {info['python']}, {info['nginx']}, {info['wrk']}, "
        f"upgradeproxy {info['upgradeproxy']}; peers: {info.get('peers', '')}",
        f"- sizes: tunnel {plan.tunnel_bytes / (1 << 20):,.0f} MiB x {plan.tunnel_reps} "
        f"(median); {plan.rtt_count:,} round trips of 32 B in {plan.rtt_chunks} interleaved "
        f"chunks; handshakes {plan.hs_clients} clients x {plan.hs_seconds:g} s x {plan.hs_reps} "
        f"(median); {plan.rss_tunnels:,} and {plan.rss_tunnels_large:,} idle tunnels; "
        f"wrk {plan.http_seconds:g} s x "
        f"{plan.http_reps} (median)",
        "",
        report.table(rows),
        "",
    ]
    per_op = [
        (label, figs[key])
        for key, label in (
            ("handshakes", "µs per upgrade handshake"),
            ("http", "µs per plain HTTP request"),
            ("rtt_p50", "µs per 32 B round trip (all on one CPU)"),
            ("tunnel_up", "µs per MB, tunnel client→upstream"),
            ("tunnel_down", "µs per MB, tunnel upstream→client"),
        )
        if key in figs
    ]
    if per_op:
        lines += [
            "### Proxy CPU per operation (median of the runs; lower is better)",
            "",
            "The proxy's CPU seconds over each measured window (all its threads and processes, "
            "from schedstat) divided by the operations it completed in that window.",
            "",
            report.per_op_table(per_op),
            "",
        ]
    if results.sweep:
        names = [t for t in report.TARGETS if any(f.median(t) for f in results.sweep.values())]
        proxies = [t for t in names if t != "direct"]
        others = [t for t in proxies if t != "nginx"]
        lines += [
            "### Tunnel by transfer size, write size and placement (MB/s; proxy CPU µs per MB)",
            "",
            "Writes: bytes per sendfile call of the sender (the client up, the upstream down). "
            "unpinned: the scheduler places every process; split: the proxies on the last CPU, "
            "client and upstream on the first; shared: everything on the first CPU.",
            "",
            "| condition | "
            + " | ".join(f"{t} MB/s" for t in names)
            + " | "
            + " | ".join(f"{t} ÷ nginx" for t in others)
            + " | "
            + " | ".join(f"{t} µs/MB" for t in proxies)
            + " |",
            "|---|" + "---:|" * (len(names) + len(others) + len(proxies)),
        ]
        for key, fig in results.sweep.items():
            rates = [report.cell(fig.median(t), report.fmt_int) for t in names]
            ratios = [
                report.cell(report.ratio(fig.median(t), fig.median("nginx")), report.fmt_ratio)
                for t in others
            ]
            cpu = [report.cell(fig.per_op(t), report.fmt_1) for t in proxies]
            lines.append(f"| {key} | {' | '.join(rates + ratios + cpu)} |")
        lines.append("")
    if results.websocket:
        names = ["direct", "upgradeproxy", WS_TARGET]
        lines += [
            "### A route with a `websocket` block (frames read) beside the spliced route",
            "",
            f"{WS_TARGET}: the same upgradeproxy with `websocket: {WS_BLOCK}` on the route. "
            "Throughput moves whole binary frames of the given payload size; CPU is the "
            "proxy's, per MB or per round trip (one message each way).",
            "",
            "| condition | " + " | ".join(names) + f" | {WS_TARGET} ÷ upgradeproxy | "
            f"upgradeproxy CPU | {WS_TARGET} CPU |",
            "|---|" + "---:|" * (len(names) + 3),
        ]
        for key, fig in results.websocket.items():
            fmt = report.fmt_int if fig.unit == "MB/s" else report.fmt_1
            cells = [report.cell(fig.median(t), fmt) for t in names]
            cells.append(
                report.cell(report.ratio(fig.median(WS_TARGET), fig.median("upgradeproxy")),
                            report.fmt_ratio)
            )  # fmt: skip
            cells += [report.cell(fig.per_op(t), report.fmt_1) for t in names[1:]]
            lines.append(f"| {key} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["### `workers: N` scaling (upgradeproxy)", ""]
    if results.scaling:
        lines += [
            "| figure | N=1 | N=2 | N=2 ÷ N=1 | proxy CPU N=1 | proxy CPU N=2 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for fig in results.scaling.values():
            a, b = fig.median("N=1"), fig.median("N=2")
            cells = [report.cell(v, report.fmt_int) for v in (a, b)]
            cells.append(report.cell(report.ratio(b, a), report.fmt_ratio))
            cells += [f"{fig.cpu(k).get('proxy', 0.0):.0f}%" for k in ("N=1", "N=2")]
            lines.append(f"| {fig.label} | {' | '.join(cells)} |")
        for fig in results.scaling.values():
            # Per core-second of proxy CPU: what each worker count gets out of the CPU it uses.
            a, b = (fig.per_op(k) for k in ("N=1", "N=2"))
            rates = [1e6 / v if v else None for v in (a, b)]
            cells = [report.cell(v, report.fmt_int) for v in rates]
            cells.append(report.cell(report.ratio(rates[1], rates[0]), report.fmt_ratio))
            cells += [report.cell(v, report.fmt_1) + " µs" for v in (a, b)]
            label = f"{fig.label} per proxy core-second (and CPU per op)"
            lines.append(f"| {label} | {' | '.join(cells)} |")
        lines += ["", results.scaling_note]
    else:
        lines.append(results.scaling_note or "not run")
    lines += [
        "",
        "### CPU per process during each test (100% = one core)",
        "",
        "client = the load generator (bench process, its handshake workers, or wrk); "
        "upstream = the WebSocket upstream (or the nginx HTTP upstream for plain HTTP); "
        "proxy = nginx's master + worker or upgradeproxy's process tree; "
        "machine busy = all CPU time on the box (/proc/stat, at most nproc x 100%); "
        "other = machine busy minus ours: kernel threads (ksoftirqd) and anything unrelated "
        "that ran at the same time.",
        "",
        report.cpu_table(
            [(k, v) for k, v in figs.items() if not k.endswith("_p99")]
            + [(f"scaling {k}", v) for k, v in results.scaling.items()]
        ),
    ]
    notes = list(results.notes)
    cores = len(os.sched_getaffinity(0))
    for key in ("handshakes", "http"):
        if key in figs:
            cpu = figs[key].cpu("nginx")
            if cpu.get("machine", 0) >= 90 * cores and cpu.get("proxy", 100) < 90:
                notes.append(
                    f"{figs[key].label}: the machine was saturated while nginx used "
                    f"{cpu['proxy']:.0f}% of a core, so nginx's figure is a floor and the "
                    "ratio flatters upgradeproxy; the per-core-second row compares work per CPU."
                )
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_json(plan: Plan, results: Results, info: dict[str, str]) -> str:
    def fig_json(fig: Figure) -> dict[str, object]:
        return {
            "label": fig.label,
            "runs": {t: [asdict(r) for r in runs] for t, runs in fig.runs.items()},
        }

    return json.dumps(
        {
            "machine": info,
            "plan": asdict(plan),
            "figures": {k: fig_json(v) for k, v in results.figures.items()},
            "scaling": {k: fig_json(v) for k, v in results.scaling.items()},
            "scaling_note": results.scaling_note,
            "sweep": {k: fig_json(v) for k, v in results.sweep.items()},
            "websocket": {k: fig_json(v) for k, v in results.websocket.items()},
            "notes": results.notes,
        },
        indent=2,
    )


# --- main ------------------------------------------------------------------------------


def raise_nofile(want: int) -> None:
    """Room for 5,000 tunnels: our 5,000 client sockets, and the proxies inherit the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((want, max(hard, want)), (min(want, hard), hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < 12_000:  # a proxy holds two sockets per tunnel
        log(f"warning: RLIMIT_NOFILE is {soft}; the 5,000-tunnel RSS test may run out of fds")


class Stop(Exception):
    """A stop signal or the time limit: unwind so that every process gets stopped."""


@contextlib.contextmanager
def stop_on_signals(limit: float) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    # SIGINT too, explicitly: a shell starts background jobs with SIGINT ignored, and then
    # Python installs no KeyboardInterrupt handler of its own.
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)
    old = {s: signal.signal(s, handler) for s in stops}
    signal.alarm(int(limit))
    try:
        yield
    finally:
        signal.alarm(0)
        for s, h in old.items():
            signal.signal(s, h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="upgradeproxy vs nginx vs direct on loopback")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run (< 60 s)")
    parser.add_argument(
        "--tests",
        default=None,
        help=f"comma-separated subset of {','.join(TESTS)} (default: all); with --profile, "
        f"of {','.join(PROFILED)} (default: handshakes,http)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: py-spy on upgradeproxy during a load",
    )
    parser.add_argument(
        "--peers",
        default="haproxy,mitmproxy",
        help="comma-separated peers to measure beside nginx: haproxy, mitmproxy, or none",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PYTHON[@VAR=VALUE]",
        help="also run upgradeproxy with another interpreter/venv (e.g. a compiled build), "
        "from that venv's parent directory, with an optional environment variable; repeatable",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions of each test (overrides the plan)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per handshake and wrk run (overrides the plan)",
    )
    parser.add_argument(
        "--tunnel-mib", type=int, default=None, help="MiB per tunnel transfer (overrides the plan)"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    # The tunnel sweep is ~14 conditions x reps x targets: asked for, never by default.
    default = (
        "handshakes,http" if args.profile else ",".join(t for t in TESTS if t != "tunnel_sweep")
    )
    args.peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() not in ("", "none"))
    if set(args.peers) - {"haproxy", "mitmproxy"}:
        parser.error(f"unknown peers: {args.peers}")
    args.tests = [t.strip() for t in (args.tests or default).split(",") if t.strip()]
    unknown = set(args.tests) - set(PROFILED if args.profile else TESTS)
    if unknown:
        parser.error(f"unknown tests: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.reps is not None:
        plan = dataclasses.replace(
            plan,
            tunnel_reps=args.reps,
            hs_reps=args.reps,
            http_reps=args.reps,
            scaling_reps=args.reps,
            rtt_chunks=args.reps,
        )
    if args.seconds is not None:
        plan = dataclasses.replace(plan, hs_seconds=args.seconds, http_seconds=args.seconds)
    if args.tunnel_mib is not None:
        plan = dataclasses.replace(plan, tunnel_bytes=args.tunnel_mib << 20)
    raise_nofile(targets.NOFILE)
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="upgradeproxy-bench-"))
    variants = tuple(targets.Variant.parse(v) for v in args.variant)
    bench = Bench(plan, tmp, args.peers, variants)
    failed = True
    started = time.monotonic()
    try:
        with stop_on_signals(plan.time_limit):
            bench.start()
            info = machine()
            if args.profile:
                text = bench.profile(args.tests)
                (RESULTS / "profile.md").write_text(text + "\n")
                print(text)
                failed = False
                return 0
            steps = {
                "throughput": bench.throughput,
                "rtt": bench.rtt,
                "handshakes": bench.handshakes,
                "rss": bench.rss,
                "wake": bench.wake,
                "http": bench.http,
                "scaling": bench.scaling,
                "h2": bench.h2,
                "tunnel_sweep": bench.tunnel_sweep,
                "websocket": bench.websocket,
            }
            for name in TESTS:
                if name in args.tests:
                    log(f"== {name}")
                    steps[name]()
        text = render(plan, bench.results, info, args.quick)
        if bench.results.h2:
            text += "\n" + render_h2(bench.results.h2)
        text += f"\n(run took {time.monotonic() - started:.0f} s)\n"
        # A smoke run must not overwrite the last full results.
        stem = "quick" if args.quick else "latest"
        (RESULTS / f"{stem}.md").write_text(text)
        (RESULTS / f"{stem}.json").write_text(to_json(plan, bench.results, info))
        print(text)
        failed = False
        return 0
    except (KeyboardInterrupt, Stop) as exc:
        log(f"stopped ({type(exc).__name__} {exc}); cleaning up")
        return 130
    finally:
        bench.procs.stop_all()
        if failed or args.keep_temp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
