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
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final, TextIO

import trio

from upgradeproxy import __version__
from upgradeproxy.config.loader import ConfigError, load_config
from upgradeproxy.errors import os_error_behind
from upgradeproxy.service.generations import Launch
from upgradeproxy.service.signals import WorkerRole, log_problems, run_with_signals
from upgradeproxy.service.workers import WORKERS_NEED_RESTART, supervise
from upgradeproxy.telemetry.logs import resolve_format, setup_logging

log = logging.getLogger("upgradeproxy")

ENV_CONFIG = "UPGRADEPROXY_CONFIG"
ENV_LOG_LEVEL = "UPGRADEPROXY_LOG_LEVEL"  # how workers inherit --log-level, too
LOG_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                     "warning": logging.WARNING, "error": logging.ERROR}  # fmt: skip


def _add_log_level(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--log-level",
        choices=tuple(LOG_LEVELS),
        default=os.environ.get(ENV_LOG_LEVEL)
        if os.environ.get(ENV_LOG_LEVEL) in LOG_LEVELS
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
    demo.add_argument(
        "--tls",
        action="store_true",
        help="serve the page over TLS with HTTP/2 (a certificate made for this run; needs the "
        "'trustme' package): the browser then carries the WebSocket inside HTTP/2",
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
        log_problems(err.problems)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "run":
        return _run(args)
    from upgradeproxy.demo.main import main as demo_main

    return demo_main(args)
