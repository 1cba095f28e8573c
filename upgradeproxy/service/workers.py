"""The `workers: N` supervisor: N worker processes share the listeners; this parent serves nothing.

Workers are fresh interpreters (`python -m upgradeproxy run --worker I`, or the standalone
binary itself, `upgradeproxy run --worker I`), not forks and not `multiprocessing` children:
nothing of the parent's trio loop, sockets or locks leaks into them, $PROMETHEUS_MULTIPROC_DIR
is in their environment before prometheus-client is imported (it picks its storage at import),
nothing is pickled, and a worker runs exactly the `workers: 1` code path with SO_REUSEPORT on
every listener; the admin socket is one shared by all (any worker answers a scrape, with the
totals of all of them read from the shared directory).

The parent owns the listening sockets (one SO_REUSEPORT socket per listener address and worker
slot, one admin socket for all, or the one systemd passed) and hands them to each worker
(service/sockets.py): a worker that dies, or a generation that ends, never closes a socket, so
no connection waiting in a queue is reset.

Signals the parent takes, and what its workers get:
- SIGTERM/SIGINT: SIGTERM (drain); a second one: SIGUSR1 (close everything now).
- SIGHUP: the file is validated here first; if valid, SIGHUP (each worker reloads it),
  otherwise every problem is logged and nothing is forwarded.
- SIGUSR2: a new generation: the file is validated, N new workers start (the code now on disk)
  on the same sockets, and once all of them are ready each old worker gets SIGUSR2 (retire:
  stop accepting, finish within `timeouts.upgrade_grace`, exit).

A worker that dies is replaced after a backoff that grows while replacements die young; one that
cannot start the first time stops the whole group (exit 1), as `workers: 1` would (in a new
generation it only ends the upgrade: the old generation keeps serving).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Final

import trio
from prometheus_client.multiprocess import mark_process_dead

from upgradeproxy.config.loader import ConfigError, load_config
from upgradeproxy.config.model import Config
from upgradeproxy.pool.discovery import SEED_FILE_ENV
from upgradeproxy.service.sockets import (
    Owned,
    close_all,
    fds_env,
    inherited_sockets,
    own_sockets,
    sd_notify,
)
from upgradeproxy.telemetry.metrics import MULTIPROC_ENV

log = logging.getLogger("upgradeproxy.service.workers")

RESTART_MIN: Final = 0.5  # seconds before replacing a worker that died
RESTART_MAX: Final = 30.0
STABLE_AFTER: Final = 10.0  # a worker that lived this long resets the backoff
WORKERS_NEED_RESTART: Final = "reload: workers %d -> %d takes a restart; the count stays as it is"


def supervise(config: Config, path: str, log_format: str, access_log: bool = True) -> int:
    """Run `config.workers` workers until a signal drains them; the exit code for `run`."""
    try:
        sockets = own_sockets(config, config.workers, inherited_sockets(config))
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        return 1
    with tempfile.TemporaryDirectory(prefix="upgradeproxy-metrics-") as metrics_dir:
        supervisor = Supervisor(config, path, log_format, metrics_dir)
        supervisor.access_log = access_log
        supervisor.sockets = sockets
        try:
            return trio.run(supervisor.run)
        finally:
            supervisor.close_sockets()


@dataclass(slots=True)
class _Generation:
    """The workers started by one `run` or one SIGUSR2."""

    number: int
    ready: int = 0
    done: trio.Event = field(default_factory=trio.Event)  # all ready, or one failed
    failed: bool = False


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
        # The servers found in DNS, for a worker that starts (upstream/discovery.py).
        self.env[SEED_FILE_ENV] = os.path.join(metrics_dir, "discovered.json")
        self.env.pop("NOTIFY_SOCKET", None)  # systemd hears from this process only
        self.procs: dict[tuple[int, int], trio.Process] = {}  # (generation, slot) -> worker
        # Workers not ready yet: a SIGHUP would kill them (no handler yet), so a reload while
        # they start is owed to them and sent once they are ready.
        self.starting: set[tuple[int, int]] = set()
        self.reload_owed: set[tuple[int, int]] = set()
        self.stopping = False
        self.failed = False
        self._stop = trio.Event()
        self.sockets: Owned = {}
        self.current = _Generation(0)
        self.upgrading = False
        self._slots: trio.Nursery | None = None

    async def run(self) -> int:
        """Serve until every worker has exited after a stop; 1 if one could not start."""
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, received, nursery, name="signals")
                async with trio.open_nursery() as slots:
                    self._slots = slots
                    self._start(self.current)
                    await self.current.done.wait()
                    if not self.current.failed:
                        sd_notify("READY=1")
                nursery.cancel_scope.cancel()
        log.info("all workers exited")
        return 1 if self.failed else 0

    def stop(self, sig: int) -> None:
        """Stop replacing workers and pass `sig` to the live ones."""
        if not self.stopping:
            sd_notify("STOPPING=1")
        self.stopping = True
        self._stop.set()
        self.current.done.set()  # an upgrade waiting for its workers gives up
        # Our copies closed: each listener closes when its workers close theirs (the drain).
        self.close_sockets()
        self._signal_all(sig)

    def close_sockets(self) -> None:
        close_all(sock for socks in self.sockets.values() for sock in socks)
        self.sockets = {}

    def _start(self, generation: _Generation) -> None:
        assert self._slots is not None
        for slot in range(self.config.workers):
            name = f"worker {slot} (generation {generation.number})"
            self._slots.start_soon(self._keep_running, slot, generation, name=name)

    async def _upgrade(self) -> None:
        """SIGUSR2: start a new generation on our sockets; once it is ready, retire the old."""
        if self.stopping or self.upgrading or not self.current.done.is_set():
            log.warning("upgrade ignored: %s", "draining" if self.stopping else "one in progress")
            return
        config = self._read_config("upgrade")
        if config is None:
            return
        try:  # listeners added since the start (SIGHUP) are bound here and handed over too
            sockets = own_sockets(config, self.config.workers, {}, self.sockets)
        except OSError as exc:
            log.error("upgrade failed: %s", exc.strerror or exc)
            return
        self.upgrading = True
        old, new = self.current, _Generation(self.current.number + 1)
        previous, self.sockets = self.sockets, sockets
        log.info("upgrade: starting a new generation", extra={"generation": new.number})
        self.current = new
        self._start(new)
        await new.done.wait()
        self.upgrading = False
        if self.stopping:  # stop() closed `sockets`; the ones only the old file named too
            close_all(_only_in(previous, sockets))
            return
        if new.failed:
            log.error("upgrade failed: a new worker could not start; the old generation serves")
            self.current, self.sockets = old, previous
            self._signal_generation(new.number, signal.SIGTERM)
            close_all(_only_in(sockets, previous))
            return
        # Listeners the new file dropped: they close once the old workers close theirs.
        close_all(_only_in(previous, sockets))
        extra = {"generation": new.number}
        log.info("upgrade: new generation ready, retiring the old one", extra=extra)
        self._signal_generation(old.number, signal.SIGUSR2, older=True)

    def _read_config(self, action: str) -> Config | None:
        """The file as it is now, or None after logging why `action` is rejected."""
        try:
            config = load_config(self.path)
        except ConfigError as err:
            for problem in err.problems:
                log.error("%s rejected: %s", action, problem)
            return None
        if config.workers != self.config.workers:
            log.warning(WORKERS_NEED_RESTART, self.config.workers, config.workers)
        return config

    def _signal_generation(self, number: int, sig: int, *, older: bool = False) -> None:
        """`sig` to the workers of generation `number` (and every older one if `older`)."""
        for (gen, _), proc in self.procs.items():
            if gen == number or (older and gen < number):
                proc.send_signal(sig)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            proc.send_signal(sig)

    async def _on_signals(self, received: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in received:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR2:
                nursery.start_soon(self._upgrade, name="upgrade")
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
        if self._read_config("reload") is None:
            return
        log.info("reloading workers", extra={"config": self.path})
        self.reload_owed |= self.starting  # they may have read the file before it changed
        for key, proc in self.procs.items():
            if key not in self.starting:
                proc.send_signal(signal.SIGHUP)

    async def _keep_running(self, slot: int, generation: _Generation) -> None:
        """Run worker `slot`, replacing it whenever it dies, until the group stops or a newer
        generation takes over."""
        delay = 0.0
        first = True
        while not self.stopping:
            began = trio.current_time()
            ready, code = await self._run_once(slot, generation)
            if self.stopping or generation is not self.current:
                return
            if first and not ready:
                generation.failed = True
                generation.done.set()
                if generation.number == 0:
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

    async def _run_once(self, slot: int, generation: _Generation) -> tuple[bool, int]:
        """Start worker `slot` and wait for it to exit: (it became ready, exit code)."""
        fds = {key: socks[slot % len(socks)].fileno() for key, socks in self.sockets.items()}
        ready_r, ready_w = os.pipe()
        key = (generation.number, slot)
        # Starting from before the fork: a reload that comes while open_process runs is owed
        # to this worker too (the child may read the file before it changes).
        self.starting.add(key)
        try:
            proc = await trio.lowlevel.open_process(
                self._argv(slot, ready_w),
                env={**self.env, **fds_env(fds)},
                pass_fds=(ready_w, *fds.values()),
            )
        except BaseException:
            os.close(ready_r)
            self.starting.discard(key)
            self.reload_owed.discard(key)
            raise
        finally:
            os.close(ready_w)  # the worker holds the only write end: EOF means it died
        self.procs[key] = proc
        try:
            if self.stopping:  # a stop raced the start
                proc.send_signal(signal.SIGTERM)
            async with trio.lowlevel.FdStream(ready_r) as ready_stream:
                ready = bool(await ready_stream.receive_some(64))
            self.starting.discard(key)
            if ready and key in self.reload_owed:
                proc.send_signal(signal.SIGHUP)
            if ready:
                extra = {"worker": slot, "pid": proc.pid, "generation": generation.number}
                log.info("worker ready", extra=extra)
                generation.ready += 1
                if generation.ready == self.config.workers:
                    generation.done.set()
            code = await proc.wait()
        finally:
            del self.procs[key]
            self.starting.discard(key)
            self.reload_owed.discard(key)
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


def _only_in(these: Owned, not_those: Owned) -> Iterator[socket.socket]:
    """The sockets of `these` for addresses `not_those` does not have."""
    return (s for key, socks in these.items() if key not in not_those for s in socks)
