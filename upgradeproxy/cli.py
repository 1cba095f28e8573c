"""Command line: `run`, `check`, `demo`, `--version`, and the exit codes the contract names.

Exit codes: 0 ok (and after a clean drain), 1 `check` found problems or `demo --selftest`
failed, 2 a config that fails validation stopped `run`, or the command line was wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from upgradeproxy import __version__
from upgradeproxy.config import Config
from upgradeproxy.loader import ConfigError, load_config
from upgradeproxy.logs import setup_logging
from upgradeproxy.server import Proxy

log = logging.getLogger("upgradeproxy")

ENV_CONFIG = "UPGRADEPROXY_CONFIG"


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
    demo.add_argument("--port", type=int, default=8080, help="proxy port (0 picks one)")
    demo.add_argument("--log-format", choices=("json", "text"), default=None)
    return parser


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get(ENV_CONFIG)
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
        for problem in err.problems:
            print(problem)
        print(f"{path}: {len(err.problems)} problem(s)", file=sys.stderr)
        return 1
    routes = len(config.routes)
    print(
        f"{path}: ok ({len(config.listeners)} listener(s), {len(config.upstreams)} "
        f"upstream(s), {routes} route(s))"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    setup_logging(args.log_format)
    if path is None:
        print(
            f"upgradeproxy run: no config: pass --config FILE or set ${ENV_CONFIG}", file=sys.stderr
        )
        return 2
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 2
    try:
        trio.run(run_with_signals, config, path)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def run_with_signals(config: Config, path: str | None) -> None:
    """Run `config` until SIGTERM/SIGINT drains it; SIGHUP reloads `path`."""
    proxy = Proxy(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
            log.info("listening", extra={"addresses": [f"{h}:{p}" for h, p in proxy.addresses]})
            nursery.start_soon(_handle_signals, signals, proxy, path, nursery.cancel_scope)


async def _serve_then_stop(
    proxy: Proxy, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Proxy]
) -> None:
    await proxy.run(task_status=task_status)
    scope.cancel()  # drained: stop listening for signals too


async def _handle_signals(
    signals: AsyncIterator[int],
    proxy: Proxy,
    path: str | None,
    scope: trio.CancelScope,
) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            _reload(proxy, path)
        elif proxy.draining:
            log.warning("second stop signal: exiting now")
            scope.cancel()
        else:
            log.info("draining", extra={"signal": signal.Signals(signum).name})
            proxy.drain()


def _reload(proxy: Proxy, path: str | None) -> None:
    if path is None:
        return
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            log.error("reload rejected: %s", problem)
        return
    try:
        proxy.reload(config)
    except (OSError, ValueError) as exc:
        log.error("reload failed: %s", exc)
        return
    log.info("reloaded", extra={"config": path})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "run":
        return _run(args)
    from upgradeproxy.demo import main as demo_main

    return demo_main(args)
