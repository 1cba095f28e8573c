"""What a route's `websocket` block (rule 18) costs: proxy CPU per MB and per message.

    python tests/bench/websocket_cost.py [--mib 256] [--messages 200000] [--reps 3]

Starts the bench's raw upstream and three upgradeproxy processes in front of it: the route
without the block (the byte splice), with the block (headers read in Python, long payloads
spliced in the kernel in exact lengths), and with the block but every payload copied through
Python (the alternative the relay did not take, for comparison). Then, per process, in
rotation: frames of several sizes each way, and 32-byte messages pipelined (CPU per message)
and one at a time (round trips). CPU is the proxy process's user + system time over each
transfer, from /proc. Prints a markdown table; not part of any test run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import loadgen
import targets
import wire
from procs import CpuWindow, Managed, Processes, free_ports

BLOCK = "{max_message_bytes: 1073741824, max_frame_bytes: 1073741824, messages_per_second: 1000000}"
# The copy alternative: the same relay with the splice threshold out of reach.
COPY = "import runpy, upgradeproxy.tunnel.frame_pumps as w; w._SPLICE_MIN = 1 << 62; "
COPY += "runpy.run_module('upgradeproxy', run_name='__main__')"


def start(procs: Processes, tmp: Path, name: str, port: int, ws: int, http: int, block: str,
          copy: bool = False) -> Managed:  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(targets.upgradeproxy_conf(port, ws, http, 1, websocket=block))
    head = [sys.executable, "-c", COPY] if copy else [sys.executable, "-m", "upgradeproxy"]
    argv = [*head, "run", "--config", str(path), "--log-format", "json", "--no-access-log"]
    proc = procs.start(name, argv, tmp / f"{name}.log", cwd=targets.REPO)
    targets.wait_for_port(port, proc)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per bulk transfer")
    parser.add_argument("--messages", type=int, default=200_000, help="pipelined messages")
    parser.add_argument("--round-trips", type=int, default=5_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tests", default="bulk,pipelined,rtt", help="a subset of these")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ws-cost-"))
    procs = Processes()
    ws, p_splice, p_frames, p_copy = free_ports(4)
    try:
        upstream = targets.start_ws_upstream(procs, tmp, ws, 1)
        proxies = {
            "no block (splice)": start(procs, tmp, "splice", p_splice, ws, ws, ""),
            "block (splice payloads)": start(procs, tmp, "frames", p_frames, ws, ws, BLOCK),
            "block (copy payloads)": start(procs, tmp, "copy", p_copy, ws, ws, BLOCK, True),
        }
        ports = dict(zip(proxies, (p_splice, p_frames, p_copy), strict=True))
        rows: dict[str, dict[str, list[float]]] = {}

        def measure(label: str, work: object, ops: float) -> None:
            for rep in range(args.reps):
                names = list(proxies)
                names = names[rep % 3 :] + names[: rep % 3]
                for name in names:
                    win = CpuWindow({"proxy": proxies[name]}, client_in_process=True)
                    work(ports[name], win)  # type: ignore[operator]
                    rows.setdefault(label, {}).setdefault(name, []).append(
                        win.used["proxy"] * 1e6 / ops
                    )
            print(f"{label}: " + ", ".join(
                f"{n} {statistics.median(v):.1f}" for n, v in rows[label].items()
            ), file=sys.stderr)  # fmt: skip

        size = args.mib << 20
        tests = args.tests.split(",")
        bulk_cases = (("up", 1 << 20), ("up", 16384), ("up", 1024),
                      ("down", 1 << 20), ("down", 16384), ("down", 1024))  # fmt: skip
        for direction, payload in bulk_cases if "bulk" in tests else ():
            unit = wire.frame_size(payload, masked=direction == "up")
            n = max(1, size // unit) * unit
            move = loadgen.upload if direction == "up" else loadgen.download

            def bulk(port: int, win: CpuWindow, move=move, n=n, payload=payload) -> None:
                move(port, n, win.clock, framed=payload)

            measure(f"{direction}, {payload:,} B frames: µs per MB", bulk, n / 1e6)
        unit = wire.frame_size(32, masked=True)
        n = args.messages * unit

        def pipelined(port: int, win: CpuWindow) -> None:
            loadgen.upload(port, n, win.clock, write=64 * unit, framed=32)

        if "pipelined" in tests:
            label = "32 B messages, pipelined (64 per write): µs per message"
            measure(label, pipelined, args.messages)

        def round_trips(port: int, win: CpuWindow) -> None:
            with win.measure():
                loadgen.round_trips(port, args.round_trips, 0)

        if "rtt" in tests:
            label = "32 B round trips, one in flight: µs per round trip"
            measure(label, round_trips, args.round_trips)
        del upstream
    finally:
        procs.stop_all()
    names = list(proxies)
    print(f"\n| proxy CPU | {' | '.join(names)} | added by the block |")
    print("|---|" + "---:|" * (len(names) + 1))
    for label, by in rows.items():
        med = [statistics.median(by[n]) for n in names]
        print(f"| {label} | {' | '.join(f'{m:.1f}' for m in med)} | {med[1] - med[0]:+.1f} |")
    print("\nEvery run, in the order measured:")
    for label, by in rows.items():
        runs = (f"{n} " + ", ".join(f"{v:.1f}" for v in by[n]) for n in names)
        print(f"- {label}: " + "; ".join(runs))
    print(f"\n({time.strftime('%Y-%m-%d')}, {args.reps} reps, median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
