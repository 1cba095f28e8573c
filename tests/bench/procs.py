"""Child processes of the bench and what /proc says about them.

Every server the bench starts is a `Managed` process in its own session (process group), so
stopping it reaches its workers too, and `Processes.stop_all` runs on every way out: normal
end, an exception, Ctrl-C, SIGTERM, or the bench's own time limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import repo_path  # noqa: F401  (before tests.support: puts the repository on sys.path)

from tests.support.clients import accepts
from tests.support.processes import Process
from tests.support.procfs import tree
from tests.support.waiting import eventually

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


# --- /proc -----------------------------------------------------------------------------


def _stat_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat: clock ticks, so only 10 ms resolution."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name, which may itself hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _sched_seconds(pid: int) -> float:
    """On-CPU time of every thread of `pid` from schedstat, in ns: exact, even for a window
    of a few milliseconds (a 64 MiB transfer), where clock ticks would read 0 or 10 ms."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


_HAVE_SCHEDSTAT: Final = os.path.exists("/proc/self/schedstat")


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += _sched_seconds(pid) if _HAVE_SCHEDSTAT else _stat_seconds(pid)
    return total


def rss_kib(pids: Sequence[int]) -> int:
    """Resident set size of `pids`, summed, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def machine_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat.

    Busy counts everything but idle and iowait, so softirq work that no process is charged
    for shows up here; steal is time a VM's host gave to someone else.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already included in user; count each tick once.
    total = sum(fields[:8])
    return (total - idle - steal) / CLK_TCK, steal / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of this process's reaped children (the load generators and wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    """CPU of the bench process itself (it is the client in the in-process tests)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- ports ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(port: int, proc: Managed, timeout: float = 15.0) -> None:
    """Return once `port` accepts connections; raise if `proc` died or time ran out."""

    def listening() -> bool:
        if not proc.process.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        return accepts(port)

    if not eventually(listening, timeout):
        why = f"did not listen on {port} within {timeout:g}s"
        raise RuntimeError(f"{proc.name} {why}; see {proc.log}")


# --- managed processes ---------------------------------------------------------------


@dataclass
class Managed:
    """A server process the bench started, in its own process group, its output in `log`."""

    name: str
    process: Process
    log: Path

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        return self.process.popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return tree(self.pid)


@dataclass
class Processes:
    """Everything started so far; `stop_all` ends it, gently first."""

    started: list[Managed] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Managed:
        # Its own process group (a signal to it reaches workers); stdout and stderr in `log`.
        process = Process(argv, env=env, cwd=cwd, log=log, merge_stdout=True)
        proc = Managed(name, process, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Managed, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
        if proc in self.started:
            self.started.remove(proc)
        proc.process.stop(grace, group=True)
        proc.process.close()

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


# --- CPU over a window ---------------------------------------------------------------


@dataclass
class CpuWindow:
    """CPU% (100 = one core) over one measurement: of named process trees, of the client, and
    of the whole machine ("machine" busy, "steal")."""

    watched: dict[str, Managed]
    client_in_process: bool
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    result: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)  # CPU seconds per role, not %
    seconds: float = 0.0  # the window's wall time

    def _snapshot(self) -> dict[str, float]:
        snap = {name: cpu_seconds(proc.pids()) for name, proc in self.watched.items()}
        snap["client"] = self_cpu_seconds() if self.client_in_process else children_cpu_seconds()
        snap["machine"], snap["steal"] = machine_seconds()
        return snap

    def begin(self) -> None:
        self._start = self._snapshot()
        self._wall = time.monotonic()

    def end(self) -> None:
        wall = max(time.monotonic() - self._wall, 1e-9)
        now = self._snapshot()
        self.used = {k: now[k] - self._start[k] for k in now}
        self.seconds = wall
        self.result = {k: 100.0 * self.used[k] / wall for k in now}
        # /proc/stat counts in clock ticks: over a short window it can read past the machine.
        cores = len(os.sched_getaffinity(0))
        self.result["machine"] = min(self.result["machine"], 100.0 * cores)

    def clock(self, mark: str) -> None:
        """The callback the in-process clients call around their timed part."""
        if mark == "start":
            self.begin()
        else:
            self.end()

    @contextlib.contextmanager
    def measure(self) -> Iterator[CpuWindow]:
        self.begin()
        yield self
        self.end()
