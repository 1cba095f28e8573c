"""`upgradeproxy demo`: the built-in upstream and the proxy in front of it, on loopback.

The proxy runs an embedded YAML config, parsed by the same loader as `run`, so what the
banner prints is exactly what runs. `--selftest` does one scripted WebSocket round trip
through that setup (the client is demo/selftest.py). Only public pieces are used: `Proxy`,
`parse_config`, the access log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, TextIO

import h11
import trio
import wsproto.utilities

from upgradeproxy.config.loader import parse_config
from upgradeproxy.demo.selftest import SelftestFailed, round_trip
from upgradeproxy.demo.upstream import serve_upstream
from upgradeproxy.errors import os_error_behind
from upgradeproxy.service.server import Proxy
from upgradeproxy.telemetry.logs import setup_logging
from upgradeproxy.transport.streams import STREAM_ERRORS

log = logging.getLogger("upgradeproxy.demo.main")

LOOPBACK: Final = "127.0.0.1"
SELFTEST_TIMEOUT: Final = 10.0


def demo_yaml(
    port: int, upstream_port: int, admin_port: int, tls: tuple[str, str] | None = None
) -> str:
    """The embedded config: the page and `/ws` to the demo upstream, `/metrics` to admin;
    with `tls` (cert and key files), a TLS listener that speaks HTTP/2 too."""
    listener = f'  - address: "{LOOPBACK}:{port}"'
    if tls is not None:
        listener += (
            f'\n    tls: {{cert: "{tls[0]}", key: "{tls[1]}"}}'
            "\n    http2: true              # browsers carry the WebSocket inside HTTP/2"
        )
    return f"""\
# upgradeproxy demo: the config this run uses (ports are this run's)
listen:
{listener}
admin:
  address: "{LOOPBACK}:{admin_port}"
upstreams:
  demo:                      # the built-in upstream: the page at / and a WebSocket at /ws
    servers: ["{LOOPBACK}:{upstream_port}"]
  metrics:                   # the proxy's own admin listener, so the page can read /metrics
    servers: ["{LOOPBACK}:{admin_port}"]
routes:
  - path_prefix: "/metrics"
    upstream: metrics
    upgrade: []              # plain HTTP only
  - path_prefix: "/"
    upstream: demo
    upgrade: ["websocket"]
timeouts:
  drain: 2                   # Ctrl-C gives open tunnels this long before closing them
"""


def free_port() -> int:
    """A port that was free a moment ago: the admin address must be in the config up front."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Demo:
    """A running demo: the proxy, where its upstream listens, and the config text it runs."""

    proxy: Proxy
    upstream: tuple[str, int]
    yaml_text: str
    finished: trio.Event = field(default_factory=trio.Event)
    tls: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.addresses[0]

    @property
    def url(self) -> str:
        if self.tls:  # the certificate names localhost
            return f"https://localhost:{self.address[1]}/"
        return f"http://{LOOPBACK}:{self.address[1]}/"


async def serve_demo(port: int, *, tls: bool = False, task_status: trio.TaskStatus[Demo]) -> None:
    """Run the upstream and the proxy until the proxy has drained; reports the `Demo`."""
    with contextlib.ExitStack() as stack:
        files = None
        if tls:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="upgradeproxy-"))
            files = demo_certificate(Path(directory))
        async with trio.open_nursery() as nursery:
            upstream: tuple[str, int] = await nursery.start(serve_upstream)
            text = demo_yaml(port, upstream[1], free_port(), files)
            proxy = Proxy(parse_config(text, "<demo>"))
            demo = Demo(proxy, upstream, text, tls=tls)
            await nursery.start(_proxy_then_stop, demo, nursery.cancel_scope)
            task_status.started(demo)


def demo_certificate(directory: Path) -> tuple[str, str]:
    """A certificate for `localhost` and 127.0.0.1, made for this run by a throwaway CA
    (trustme: no key or CA outlives the demo, and none is installed anywhere).

    Raises OSError when trustme is not installed.
    """
    try:
        import trustme
    except ImportError:
        raise OSError("demo --tls needs the 'trustme' package: pip install trustme") from None
    leaf = trustme.CA().issue_cert("localhost", LOOPBACK)
    cert, key = directory / "demo.pem", directory / "demo-key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


async def _proxy_then_stop(
    demo: Demo, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Proxy]
) -> None:
    try:
        await demo.proxy.run(task_status=task_status)
    finally:
        demo.finished.set()
    scope.cancel()  # drained: the upstream has nobody left to serve


def main(args: argparse.Namespace) -> int:
    """`upgradeproxy demo [--selftest] [--port N] [--log-format F]`; returns the exit code."""
    setup_logging(args.log_format, logging.getLevelNamesMapping()[args.log_level.upper()])
    logging.getLogger("upgradeproxy.access").addFilter(not_a_metrics_poll)
    try:
        if args.selftest:
            return trio.run(selftest, sys.stdout)
        trio.run(_interactive, _demo_port(args.port), args.tls)
    except KeyboardInterrupt:
        return 130  # Ctrl-C before the signal handlers were in place, or during --selftest
    except (OSError, BaseExceptionGroup) as exc:
        reason = os_error_behind(exc)
        if reason is None:
            raise
        print(f"upgradeproxy demo: cannot start: {reason}", file=sys.stderr)
        return 1
    return 0


DEFAULT_PORT = 8080


def _demo_port(asked: int | None) -> int:
    """The port asked for; without one, 8080 unless something already listens there.

    A first run should just work, so a busy default falls back to a free port (said on
    stderr); a port given explicitly is used as given, and a busy one is an error.
    """
    if asked is not None:
        return asked
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            print(f"upgradeproxy demo: port {DEFAULT_PORT} is taken; using a free one",
                  file=sys.stderr)  # fmt: skip
            return 0
    return DEFAULT_PORT


def not_a_metrics_poll(record: logging.LogRecord) -> bool:
    """Drop access lines for /metrics: the page polls it every second, drowning the rest."""
    fields = getattr(record, "record", None)
    return not (isinstance(fields, dict) and str(fields.get("path", "")).startswith("/metrics"))


# --- interactive -----------------------------------------------------------------------


async def _interactive(port: int, tls: bool = False) -> None:
    """Serve until SIGINT/SIGTERM drains the proxy (a second signal stops at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            demo: Demo = await nursery.start(partial(serve_demo, port, tls=tls))
            print(banner(demo), flush=True)
            nursery.start_soon(_drain_on_signals, signals, demo.proxy, nursery.cancel_scope)
            await demo.finished.wait()
            nursery.cancel_scope.cancel()


def banner(demo: Demo) -> str:
    """What the demo prints first: where to point a browser, and the config it runs."""
    base = demo.url.rstrip("/")
    admin = demo.proxy.admin_address or ("?", 0)
    # With --port 0, show the port the kernel picked, so the printed config can be reused.
    host, port = demo.address
    config = demo.yaml_text.replace(f'address: "{host}:0"', f'address: "{host}:{port}"')
    return (
        "upgradeproxy demo: a WebSocket echo/chat upstream behind the proxy, on loopback\n\n"
        f"  Open       {demo.url}  in a browser (a second tab joins the chat)\n"
        f"  WebSocket  {base.replace('http', 'ws', 1)}/ws  -> built-in upstream "
        f"{demo.upstream[0]}:{demo.upstream[1]}\n"
        f"  Metrics    {base}/metrics  -> the proxy's admin listener {admin[0]}:{admin[1]}\n\n"
        + (
            "  TLS        a certificate made for this run: the browser warns once; past it,\n"
            "             the page and its WebSocket share one HTTP/2 connection (RFC 8441)\n\n"
            if demo.tls
            else ""
        )
        + f"The config it runs:\n\n{config}\n"
        "Access log on stderr: one line per request and per closed tunnel "
        "(the page's /metrics polls are left out). Ctrl-C drains and stops.\n"
    )


async def _drain_on_signals(
    signals: AsyncIterator[int], proxy: Proxy, scope: trio.CancelScope
) -> None:
    async for signum in signals:
        if proxy.draining:
            log.warning("second stop signal: exiting now")
            scope.cancel()
            return
        log.info("draining", extra={"signal": signal.Signals(signum).name})
        proxy.drain()


# --- selftest --------------------------------------------------------------------------


async def selftest(out: TextIO) -> int:
    """One scripted WebSocket round trip through a fresh demo; 0 if it worked, else 1."""
    async with trio.open_nursery() as nursery:
        demo: Demo = await nursery.start(serve_demo, 0)
        print(
            f"upgradeproxy demo --selftest: proxy {LOOPBACK}:{demo.address[1]} -> "
            f"upstream {demo.upstream[0]}:{demo.upstream[1]}\n",
            file=out,
        )
        reason = await _attempt(demo, out)
        demo.proxy.drain()
    if reason is not None:
        print(f"selftest FAILED: {reason}", file=out, flush=True)
        return 1
    print("selftest ok", file=out, flush=True)
    return 0


async def _attempt(demo: Demo, out: TextIO) -> str | None:
    """The round trip under its deadline; None on success, else why it failed."""
    try:
        with trio.fail_after(SELFTEST_TIMEOUT):
            await round_trip(demo.address, out)
    except SelftestFailed as exc:
        return str(exc)
    except trio.TooSlowError:
        return f"no answer within {SELFTEST_TIMEOUT:g} s"
    except STREAM_ERRORS as exc:
        return f"connection to the proxy failed: {exc}"
    except (h11.ProtocolError, wsproto.utilities.ProtocolError) as exc:
        return f"protocol error: {exc}"
    return None
