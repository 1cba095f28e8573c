"""A serving process and its signals: SIGTERM/SIGINT drain, SIGHUP reloads, SIGUSR2 starts a
new generation (or, in a worker, retires it), SIGUSR1 stops a worker at once.

The supervisor of `workers: N` has its own half in `workers.py`: it turns the same signals
into signals to its workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from upgradeproxy.config.loader import ConfigError, ConfigProblem, load_config
from upgradeproxy.config.model import Address, Config
from upgradeproxy.service.generations import Generations, Launch
from upgradeproxy.service.server import Proxy
from upgradeproxy.service.sockets import inherited_sockets
from upgradeproxy.service.workers import WORKERS_NEED_RESTART

log = logging.getLogger("upgradeproxy")


def log_problems(problems: Sequence[ConfigProblem], prefix: str = "") -> None:
    """Config problems as log lines: warnings as warnings, the rest as errors."""
    for problem in problems:
        level = logging.WARNING if problem.why.startswith("warning: ") else logging.ERROR
        log.log(level, "%s%s", prefix, problem)


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """How a worker under the `workers` supervisor differs from a lone process."""

    index: int
    ready_fd: int | None  # written to once the listeners are bound, then closed
    parent_pid: int


async def run_with_signals(
    config: Config,
    path: str | None,
    role: WorkerRole | None = None,
    launch: Launch | None = None,
    previous_fd: int | None = None,
) -> None:
    """Run `config` until SIGTERM/SIGINT drains it; SIGHUP reloads `path`; SIGUSR2 hands the
    sockets to a new process (a worker: retires, its supervisor started the new generation).

    A second SIGTERM/SIGINT stops at once. A worker instead ignores repeats (systemd's
    control-group kill and the supervisor each send one) and stops at once on SIGUSR1.
    """
    proxy = Proxy(config, reuse_port=True if role else None, sockets=inherited_sockets(config))
    generations = Generations(proxy, None if role else launch, previous_fd)
    watched = (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR2, *((signal.SIGUSR1,) if role else ()))
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
            listening = [str(Address(h, p)) for h, p in proxy.addresses]  # [::1]:8080 for IPv6
            log.info("listening", extra={"addresses": listening})
            handler = _Signals(proxy, path, nursery, role, generations)
            nursery.start_soon(handler.run, signals)
            if role is not None:
                _report_ready(role)
                nursery.start_soon(_watch_parent, proxy, role.parent_pid)
            else:
                await generations.started()
                if generations.previous is not None:
                    nursery.start_soon(generations.follow_previous)


_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_PARENT_POLL: Final = 1.0  # seconds between checks that the supervisor still runs


async def _serve_then_stop(
    proxy: Proxy, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Proxy]
) -> None:
    await proxy.run(task_status=task_status)
    scope.cancel()  # drained: stop listening for signals too


@dataclass(slots=True)
class _Signals:
    """What each signal does to a serving process."""

    proxy: Proxy
    path: str | None
    nursery: trio.Nursery
    role: WorkerRole | None
    generations: Generations
    stop_signals: int = 0  # SIGTERM/SIGINT received so far

    async def run(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            await self.on(signum)

    async def on(self, signum: int) -> None:
        proxy, name = self.proxy, signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self.generations.upgrading and not proxy.draining:
                log.warning("reload ignored: an upgrade is in progress")
                return
            await _reload(proxy, self.path, lone=self.role is None)
        elif signum == signal.SIGUSR2 and self.role is None:
            self.nursery.start_soon(self.generations.upgrade, name="upgrade")
        elif signum == signal.SIGUSR2:  # the supervisor's new generation accepts
            if not proxy.draining:
                grace = proxy.runtime.config.timeouts.upgrade_grace
                log.info("retiring: a new generation accepts", extra={"grace": grace})
                proxy.retire(grace)
        elif signum == signal.SIGUSR1 or (self.stop_signals and self.role is None):
            log.warning("stopping now", extra={"signal": name})
            self.nursery.cancel_scope.cancel()
        elif self.stop_signals:
            log.info("already draining", extra={"signal": name})
        else:
            # The first stop signal drains, whatever else drains already: a retiring
            # generation cuts its grace to `timeouts.drain`, and the generations on either
            # side drain too.
            self.stop_signals += 1
            log.info("draining", extra={"signal": name})
            if proxy.retiring:
                proxy.cut_to_drain()
            elif not proxy.draining:
                proxy.drain()
            await self.generations.tell_drain()


def _report_ready(role: WorkerRole) -> None:
    """Tell the supervisor the listeners are bound (it reads EOF if we die first)."""
    if role.ready_fd is not None:
        with contextlib.suppress(OSError):  # a supervisor gone already: _watch_parent sees it
            os.write(role.ready_fd, b"ready\n")
        os.close(role.ready_fd)


async def _watch_parent(proxy: Proxy, parent_pid: int) -> None:
    """Drain if the supervisor dies (SIGKILL, OOM): orphans would serve unsupervised."""
    # Polled: nothing portable wakes a process when its parent dies (no SIGCHLD that way).
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await trio.sleep(_PARENT_POLL)
    log.warning("supervisor gone: draining")
    proxy.drain()


async def _reload(proxy: Proxy, path: str | None, *, lone: bool) -> None:
    if path is None:
        return
    if proxy.draining:
        log.warning("reload ignored: draining")
        return
    try:
        config = load_config(path)
    except ConfigError as err:
        log_problems(err.problems, "reload rejected: ")
        return
    for warning in config.warnings:
        log.warning(warning)
    if lone and config.workers != 1:
        # The supervisor logs this for its workers; a lone process says it itself.
        log.warning(WORKERS_NEED_RESTART, 1, config.workers)
    try:
        await proxy.reload(config)
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("reload failed, old config kept: %s", exc)
        return
    log.info("reloaded", extra={"config": path})
