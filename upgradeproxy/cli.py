"""Command line: `run`, `check`, `demo`, `--version`, and the exit codes the contract names.

Exit codes: 0 ok (and after a drain, or a stop cut short by a second signal), 1 `check` found
problems, `demo --selftest` failed or `run` could not start (e.g. a port in use), 2 a config
that fails validation stopped `run`, or the command line was wrong.

`run` serves in this process when `workers` is 1; above that it becomes the supervisor in
`upgradeproxy.service.workers`, which starts each worker as `run --worker I`. SIGUSR2 to a lone
process starts its successor as `run --takeover-fd N` (`upgradeproxy.service.generations`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

import trio

from upgradeproxy import __version__
from upgradeproxy.config.loader import ConfigError, ConfigProblem, load_config
from upgradeproxy.config.model import Address, Config
from upgradeproxy.report.logs import resolve_format, setup_logging
from upgradeproxy.rules.errors import os_error_behind
from upgradeproxy.service.generations import Generations, Launch
from upgradeproxy.service.server import Proxy
from upgradeproxy.service.sockets import inherited_sockets
from upgradeproxy.service.workers import WORKERS_NEED_RESTART, supervise

log = logging.getLogger("upgradeproxy")

ENV_CONFIG = "UPGRADEPROXY_CONFIG"
ENV_LOG_LEVEL = "UPGRADEPROXY_LOG_LEVEL"  # how workers inherit --log-level, too
LOG_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                     "warning": logging.WARNING, "error": logging.ERROR}  # fmt: skip


def _add_log_level(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--log-level",
        choices=tuple(LOG_LEVELS),
        default=os.environ.get(ENV_LOG_LEVEL) if os.environ.get(ENV_LOG_LEVEL) in LOG_LEVELS
        else "info",
        help=f"lowest level logged (default: ${ENV_LOG_LEVEL} or info); access-log lines "
        "are governed by --no-access-log only",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upgradeproxy",
        description="A reverse proxy for WebSocket and other upgraded HTTP/1.1 connections.",
    )
    parser.add_argument("--version", action="version", version=f"upgradeproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the proxy in the foreground"),
        ("check", "validate a config file and exit"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--config", "-c", metavar="FILE", help=f"the YAML config (default: ${ENV_CONFIG})"
        )
        cmd.add_argument(
            "--log-format",
            choices=("json", "text"),
            default=None,
            help="log format on stderr (default: text on a TTY, json otherwise)",
        )
    # Internal: how the `workers` supervisor starts its workers (see upgradeproxy.service.workers).
    run = sub.choices["run"]
    run.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not write access-log lines (other logs still go to stderr)",
    )
    _add_log_level(run)
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--takeover-fd", type=int, default=None, help=argparse.SUPPRESS)
    demo = sub.add_parser(
        "demo",
        help="run a WebSocket echo upstream behind the proxy",
        description="run a WebSocket echo upstream behind the proxy",
    )
    demo.add_argument(
        "--selftest",
        action="store_true",
        help="do one scripted round trip through the demo and exit 0/1",
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="proxy port (default 8080, or any free port if 8080 is taken; 0 picks one)",
    )
    demo.add_argument("--log-format", choices=("json", "text"), default=None)
    _add_log_level(demo)
    return parser


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get(ENV_CONFIG) or None  # "" means unset
    return path


def _check(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path is None:
        print(
            f"upgradeproxy check: no config: pass --config FILE or set ${ENV_CONFIG}",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_problems(err)
        return 1
    routes = len(config.routes)
    for warning in config.warnings:
        print(warning)
    print(
        f"{path}: ok ({len(config.listeners)} listener(s), {len(config.upstreams)} "
        f"upstream(s), {routes} route(s))"
    )
    return 0


def _print_problems(err: ConfigError) -> None:
    """One line per problem, the same for `check` and `run`: on stderr, where errors go, and
    on stdout too when that is another file, so a script reading either stream sees them
    (a terminal, where both are one, shows them once)."""
    text = "\n".join(str(problem) for problem in err.problems)
    print(text, file=sys.stderr, flush=True)
    if not _same_file(sys.stdout, sys.stderr):
        print(text, flush=True)


def _log_problems(problems: Sequence[ConfigProblem], prefix: str = "") -> None:
    for problem in problems:
        level = logging.WARNING if problem.why.startswith("warning: ") else logging.ERROR
        log.log(level, "%s%s", prefix, problem)


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError):  # no real file behind one of them (e.g. pytest capture)
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _run(args: argparse.Namespace) -> int:
    worker: int | None = args.worker
    static = None if worker is None else {"worker": worker}
    setup_logging(args.log_format, LOG_LEVELS[args.log_level], static=static)
    os.environ[ENV_LOG_LEVEL] = args.log_level  # workers and new generations inherit it
    # Telemetry checks this level before building a record, so off costs nothing; on, it
    # does not depend on --log-level.
    access = logging.getLogger("upgradeproxy.access")
    access.setLevel(logging.INFO if args.access_log else logging.WARNING)
    path = _config_path(args)
    if path is None:
        log.error("no config: pass --config FILE or set $%s", ENV_CONFIG)
        return 2
    try:
        config = load_config(path)
    except ConfigError as err:
        # In the chosen log format, on stderr only (`check` prints plain lines).
        _log_problems(err.problems)
        return 2
    for warning in config.warnings:
        log.warning(warning)
    log_format = resolve_format(args.log_format)
    if config.workers > 1 and worker is None:
        if args.takeover_fd is None:
            return supervise(config, path, log_format, args.access_log)
        log.warning(WORKERS_NEED_RESTART, 1, config.workers)  # a SIGUSR2 keeps the shape
    # Every line of a serving process names it: across a SIGUSR2, two generations (or two
    # workers of one slot) write to the same stream.
    tags = {"pid": os.getpid(), **({} if worker is None else {"worker": worker})}
    setup_logging(args.log_format, LOG_LEVELS[args.log_level], static=tags)
    role = None if worker is None else WorkerRole(worker, args.ready_fd, os.getppid())
    launch = Launch(path, log_format, args.access_log)
    try:
        trio.run(run_with_signals, config, path, role, launch, args.takeover_fd)
    except (OSError, BaseExceptionGroup) as exc:
        reason = os_error_behind(exc)
        if reason is None:
            raise
        log.error("cannot start: %s", reason.strerror or reason)
        return 1
    return 0


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
        _log_problems(err.problems, "reload rejected: ")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "run":
        return _run(args)
    from upgradeproxy.demo.main import main as demo_main

    return demo_main(args)
