"""`upgradeproxy demo`: the built-in upstream and the proxy in front of it, on loopback.

The proxy runs an embedded YAML config, parsed by the same loader as `run`, so what the
banner prints is exactly what runs. `--selftest` does one scripted WebSocket round trip
through that setup. Only public pieces are used: `Proxy`, `parse_config`, the access log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from upgradeproxy import __version__
from upgradeproxy.config.loader import parse_config
from upgradeproxy.demo.upstream import serve_upstream
from upgradeproxy.errors import os_error_behind
from upgradeproxy.service.server import Proxy
from upgradeproxy.telemetry.logs import setup_logging
from upgradeproxy.transport.streams import MAX_RECV, STREAM_ERRORS

log = logging.getLogger("upgradeproxy.demo.main")

LOOPBACK: Final = "127.0.0.1"
SELFTEST_TIMEOUT: Final = 10.0
SELFTEST_MESSAGE: Final = "hello upgradeproxy"
# Headers the page and the selftest point out: what the proxy rewrites or adds on the way.
REWRITTEN: Final = frozenset({"connection", "upgrade"})
ADDED: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"}
)


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


async def serve_demo(
    port: int, *, tls: bool = False, task_status: trio.TaskStatus[Demo]
) -> None:
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


class SelftestFailed(Exception):
    """The round trip went wrong; the message says how."""


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


async def round_trip(address: tuple[str, int], out: TextIO) -> None:
    """Handshake through the proxy, check the 101, send a message and await its echo."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        key = wsproto.utilities.generate_nonce()
        http = h11.Connection(h11.CLIENT)
        head = http.send(_handshake_request(address, key))
        _show(out, ">>> request head sent to the proxy", head)
        await stream.send_all(head)
        response, raw = await _read_response(stream, http)
        _show(out, "<<< response head from the proxy", raw)
        check_switch(response, key)
        print("Sec-WebSocket-Accept matches the key: ok\n", file=out)
        ws = Connection(ConnectionType.CLIENT, trailing_data=http.trailing_data[0])
        _show_upstream_view(out, await _next_text(stream, ws))
        await stream.send_all(ws.send(TextMessage(SELFTEST_MESSAGE)))
        print(f">>> sent    {SELFTEST_MESSAGE!r}", file=out)
        echo = json.loads(await _next_text(stream, ws))
        if echo != {"type": "echo", "text": SELFTEST_MESSAGE}:
            raise SelftestFailed(f"expected the echo of {SELFTEST_MESSAGE!r}, got {echo!r}")
        print(f"<<< echoed  {echo['text']!r}\n", file=out)
        await stream.send_all(ws.send(CloseConnection(1000, "selftest done")))
        await _next_text(stream, ws, closing=True)


def _handshake_request(address: tuple[str, int], key: bytes) -> h11.Request:
    headers = [
        ("Host", f"{address[0]}:{address[1]}"),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", key.decode()),
        ("Sec-WebSocket-Version", "13"),
        ("User-Agent", f"upgradeproxy-selftest/{__version__}"),
    ]
    return h11.Request(method="GET", target="/ws", headers=headers)


async def _read_response(
    stream: trio.abc.Stream, http: h11.Connection
) -> tuple[h11.InformationalResponse, bytes]:
    """The 101 and its raw head; any other answer fails the test."""
    raw = b""
    while (event := http.next_event()) is h11.NEED_DATA:
        data = bytes(await stream.receive_some(MAX_RECV))
        raw += data
        http.receive_data(data)
    head = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    if isinstance(event, h11.ConnectionClosed):
        raise SelftestFailed("the proxy closed the connection without an answer")
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        status = getattr(event, "status_code", "?")
        raise SelftestFailed(f"expected 101 Switching Protocols, got {status}:\n{head.decode()}")
    return event, head


def check_switch(response: h11.InformationalResponse, key: bytes) -> None:
    """RFC 6455 §4.1: the 101 must name `websocket` and carry the accept token for `key`."""
    headers = dict(response.headers)
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        raise SelftestFailed(f"101 without 'Upgrade: websocket': {headers.get(b'upgrade')!r}")
    expected = wsproto.utilities.generate_accept_token(key)
    if headers.get(b"sec-websocket-accept") != expected:
        found = headers.get(b"sec-websocket-accept")
        raise SelftestFailed(f"bad Sec-WebSocket-Accept {found!r}, expected {expected!r}")


async def _next_text(stream: trio.abc.Stream, ws: Connection, *, closing: bool = False) -> str:
    """The next whole text message; with `closing`, wait for the close reply instead."""
    parts: list[str] = []
    while True:
        for event in ws.events():
            if isinstance(event, CloseConnection):
                if closing:
                    return ""
                raise SelftestFailed(f"the WebSocket closed: {event.code} {event.reason or ''}")
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished and not closing:
                    return "".join(parts)
        data = await stream.receive_some(MAX_RECV)
        ws.receive_data(bytes(data) if data else None)


def _show(out: TextIO, title: str, raw: bytes) -> None:
    text = raw.decode("latin-1").replace("\r\n", "\n").rstrip("\n")
    print(f"{title}\n{text}\n", file=out)


def _show_upstream_view(out: TextIO, message: str) -> None:
    """Print the request head the upstream received, marking what the proxy changed."""
    report = json.loads(message)
    if report.get("type") != "handshake":
        raise SelftestFailed(f"expected the upstream's handshake report, got {message!r}")
    print("--- request head the upstream received (via the proxy)", file=out)
    print(report["request_line"], file=out)
    for name, value in report["headers"]:
        note = _note(name.lower())
        print(f"{name}: {value}" + (f"    <- {note}" if note else ""), file=out)
    print(file=out)


def _note(name: str) -> str:
    if name in REWRITTEN:
        return "hop-by-hop, rebuilt by the proxy"
    if name in ADDED:
        return "added by the proxy"
    if name.startswith("sec-websocket-"):
        return "end-to-end, passed through"
    return ""
