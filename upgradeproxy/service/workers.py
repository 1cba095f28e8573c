"""The `workers: N` supervisor: N worker processes share the listeners; this parent serves nothing.

Workers are fresh interpreters (`python -m upgradeproxy run --worker I`, or the standalone
binary itself, `upgradeproxy run --worker I`), not forks and not `multiprocessing` children:
nothing of the parent's trio loop, sockets or locks leaks into them, $PROMETHEUS_MULTIPROC_DIR
is in their environment before prometheus-client is imported (it picks its storage at import),
nothing is pickled, and a worker runs exactly the `workers: 1` code path with SO_REUSEPORT on
every listener, the admin one included (so any worker answers a scrape, with the totals of all
of them read from the shared directory).

Signals the parent takes, and what its workers get:
- SIGTERM/SIGINT: SIGTERM (drain); a second one: SIGUSR1 (close everything now).
- SIGHUP: the file is validated here first; if valid, SIGHUP (each worker reloads it),
  otherwise every problem is logged and nothing is forwarded.

A worker that dies is replaced after a backoff that grows while replacements die young; one that
cannot start the first time stops the whole group (exit 1), as `workers: 1` would.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Final

import trio
from prometheus_client.multiprocess import mark_process_dead

from upgradeproxy.config.loader import ConfigError, load_config
from upgradeproxy.config.model import Config
from upgradeproxy.report.telemetry import MULTIPROC_ENV

log = logging.getLogger("upgradeproxy.service.workers")

RESTART_MIN: Final = 0.5  # seconds before replacing a worker that died
RESTART_MAX: Final = 30.0
STABLE_AFTER: Final = 10.0  # a worker that lived this long resets the backoff
WORKERS_NEED_RESTART: Final = "reload: workers %d -> %d takes a restart; the count stays as it is"


def supervise(config: Config, path: str, log_format: str, access_log: bool = True) -> int:
    """Run `config.workers` workers until a signal drains them; the exit code for `run`."""
    with tempfile.TemporaryDirectory(prefix="upgradeproxy-metrics-") as metrics_dir:
        supervisor = Supervisor(config, path, log_format, metrics_dir)
        supervisor.access_log = access_log
        return trio.run(supervisor.run)


class Supervisor:
    """Starts, replaces and signals the workers of one `run`."""

    def __init__(self, config: Config, path: str, log_format: str, metrics_dir: str) -> None:
        self.config = config
        self.path = path
        self.log_format = log_format
        self.access_log = True
        self.metrics_dir = metrics_dir
        # A fresh directory per run: counters must not resume from a previous run's files.
        self.env = {**os.environ, MULTIPROC_ENV: metrics_dir}
        self.procs: dict[int, trio.Process] = {}
        self.stopping = False
        self.failed = False
        self._stop = trio.Event()

    async def run(self) -> int:
        """Serve until every worker has exited after a stop; 1 if one could not start."""
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, received, name="signals")
                async with trio.open_nursery() as slots:
                    for slot in range(self.config.workers):
                        slots.start_soon(self._keep_running, slot, name=f"worker {slot}")
                nursery.cancel_scope.cancel()
        log.info("all workers exited")
        return 1 if self.failed else 0

    def stop(self, sig: int) -> None:
        """Stop replacing workers and pass `sig` to the live ones."""
        self.stopping = True
        self._stop.set()
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            proc.send_signal(sig)

    async def _on_signals(self, received: AsyncIterator[int]) -> None:
        async for signum in received:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self._reload()
            elif self.stopping:
                log.warning("stopping now", extra={"signal": name})
                self._signal_all(signal.SIGUSR1)
            else:
                log.info("draining", extra={"signal": name})
                self.stop(signal.SIGTERM)

    def _reload(self) -> None:
        """Validate the file; forward SIGHUP only if it passes."""
        if self.stopping:
            log.warning("reload ignored: draining")
            return
        try:
            config = load_config(self.path)
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload rejected: %s", problem)
            return
        if config.workers != self.config.workers:
            log.warning(WORKERS_NEED_RESTART, self.config.workers, config.workers)
        log.info("reloading workers", extra={"config": self.path})
        self._signal_all(signal.SIGHUP)

    async def _keep_running(self, slot: int) -> None:
        """Run worker `slot`, replacing it whenever it dies, until the group stops."""
        delay = 0.0
        first = True
        while not self.stopping:
            began = trio.current_time()
            ready, code = await self._run_once(slot)
            if self.stopping:
                return
            if first and not ready:
                log.error("worker could not start: stopping", extra={"worker": slot})
                self.failed = True
                self.stop(signal.SIGTERM)
                return
            first = False
            lived = trio.current_time() - began
            # Doubling while replacements die young, so a crash loop never spins hot.
            delay = RESTART_MIN if lived >= STABLE_AFTER else min(2 * delay, RESTART_MAX)
            delay = max(delay, RESTART_MIN)
            log.warning(
                "worker died: replacing it",
                extra={"worker": slot, "exit_code": code, "restart_in": delay},
            )
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _run_once(self, slot: int) -> tuple[bool, int]:
        """Start worker `slot` and wait for it to exit: (it became ready, exit code)."""
        ready_r, ready_w = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                self._argv(slot, ready_w), env=self.env, pass_fds=(ready_w,)
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)  # the worker holds the only write end: EOF means it died
        self.procs[slot] = proc
        try:
            if self.stopping:  # a stop raced the start
                proc.send_signal(signal.SIGTERM)
            async with trio.lowlevel.FdStream(ready_r) as ready_stream:
                ready = bool(await ready_stream.receive_some(64))
            if ready:
                log.info("worker ready", extra={"worker": slot, "pid": proc.pid})
            code = await proc.wait()
        finally:
            del self.procs[slot]
            if proc.returncode is None:
                proc.kill()  # only if the supervisor itself is failing: never leave orphans
            # Its counters stay (totals must not drop); its live gauges go.
            mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        log.info("worker exited", extra={"worker": slot, "pid": proc.pid, "exit_code": code})
        return ready, code

    def _argv(self, slot: int, ready_fd: int) -> list[str]:
        return [
            *worker_command(),
            "run",
            "--config",
            self.path,
            "--log-format",
            self.log_format,
            "--worker",
            str(slot),
            "--ready-fd",
            str(ready_fd),
            *(() if self.access_log else ("--no-access-log",)),
        ]


def worker_command() -> list[str]:
    """How to start this program again: `python -m upgradeproxy`, or the frozen binary alone.

    A PyInstaller binary has no `-m` (its sys.executable is the binary); started from inside
    the bundle, it runs as a sub-process of it, reusing the already unpacked files.
    """
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "upgradeproxy"]
