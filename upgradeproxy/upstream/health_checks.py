"""Active health checks (interface.md rule 10): the one trio edge behind `pool.health`.

One task per upstream with a `health_check`, in the proxy's service nursery. Each round probes
every server at once, each probe bounded by `timeout`, and feeds the result to the pure state
machine; rounds start every `interval`. A reload restarts the task of a changed upstream only;
the states live in the `ServerBook`, so a kept server keeps its health and streak.

Client requests never wait on a probe: they read the last state, nothing else.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Mapping
from functools import partial
from typing import Final

import h11
import trio

from upgradeproxy.config.model import HealthCheck, Server, Upstream, UpstreamTls
from upgradeproxy.pool.health import Health, observe
from upgradeproxy.pool.servers import CheckResult, ServerBook, UpstreamState, servers_of
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules.proxy_header import proxy_header
from upgradeproxy.rules.websocket_frames import close_frame
from upgradeproxy.telemetry.metrics import Telemetry
from upgradeproxy.transport.streams import MAX_RECV, STREAM_ERRORS, aclose_quietly
from upgradeproxy.upstream.connections import ConnectFailed, connect

log = logging.getLogger("upgradeproxy")

# A WebSocket Close, code 1000, masked: a client must mask, and any key (zeros) is valid.
_WS_CLOSE: Final = close_frame(1000, "", mask=bytes(4))
_USER_AGENT: Final = b"upgradeproxy-health-check"


async def check_server(
    server: Server,
    check: HealthCheck,
    tls: UpstreamTls | None,
    tls_ctx: ssl.SSLContext | None,
    proxy_protocol: int = 0,
) -> str | None:
    """One check of `server` within `check.timeout`: None if it passed, else why it failed.

    With `proxy_protocol` (rule 15) the check starts with a PROXY header naming the proxy's
    own address as the source, as a server behind it expects on every connection.
    """
    preamble = partial(_own_proxy_header, proxy_protocol) if proxy_protocol else b""
    with trio.move_on_after(check.timeout):
        try:
            stream = await connect(server, check.timeout, tls, tls_ctx, preamble)
        except ConnectFailed as exc:
            return f"connect failed: {exc}"
        try:
            return await _ask(stream, server, check, tls)
        except h11.RemoteProtocolError as exc:
            return f"bad response: {exc}"
        except STREAM_ERRORS as exc:
            return f"connection failed: {exc or type(exc).__name__}"
        finally:
            await aclose_quietly(stream)
    return f"no answer within {check.timeout:g}s"


def _own_proxy_header(version: int, sock: trio.SocketStream) -> bytes:
    local = sock.socket.getsockname()
    peer = sock.socket.getpeername()
    return proxy_header(version, (local[0], local[1]), (peer[0], peer[1]))


async def _ask(
    stream: trio.abc.Stream, server: Server, check: HealthCheck, tls: UpstreamTls | None
) -> str | None:
    """Send the check's GET (or WebSocket handshake) and judge the answer's head."""
    conn = h11.Connection(h11.CLIENT)
    host = tls.server_name if tls is not None and tls.server_name else str(server.address)
    headers = [(b"Host", host.encode()), (b"User-Agent", _USER_AGENT)]
    key = None
    if check.upgrade:
        key = hdr.websocket_key(os.urandom(16))
        headers += [
            (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", b"13"),
        ]  # fmt: skip
    else:
        headers.append((b"Connection", b"close"))
    request = h11.Request(method=b"GET", target=check.path.encode(), headers=headers)
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(MAX_RECV)))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            # h11 accepts a 101 only to an upgrade offer; the offer's answer is checked here
            # exactly as a client's would be.
            problem = hdr.switch_problem([hdr.WEBSOCKET], list(event.headers.raw_items()), key)
            if problem is not None:
                return f"bad 101: {problem}"
            await stream.send_all(_WS_CLOSE)
            return None
        elif isinstance(event, h11.Response):
            status = event.status_code
            if check.upgrade:
                return f"status {status} instead of 101"
            return None if 200 <= status < 300 else f"status {status}"
        elif isinstance(event, h11.ConnectionClosed):
            return "closed before a response"


async def probe_upstream(
    upstream: Upstream, state: UpstreamState, tls_ctx: ssl.SSLContext | None, telemetry: Telemetry
) -> None:
    """Probe every server of `upstream` once per interval, forever (a discovered upstream:
    the servers it has at the start of each round)."""
    check = upstream.health_check
    assert check is not None
    while True:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for server in servers_of(upstream, state):
                nursery.start_soon(
                    _probe, upstream, server, state, tls_ctx, telemetry,
                    name=f"health check {server.address}",
                )  # fmt: skip
        await trio.sleep_until(started + check.interval)


async def _probe(
    upstream: Upstream,
    server: Server,
    state: UpstreamState,
    tls_ctx: ssl.SSLContext | None,
    telemetry: Telemetry,
) -> None:
    check = upstream.health_check
    assert check is not None
    try:
        why = await check_server(server, check, upstream.tls, tls_ctx, upstream.proxy_protocol)
    except Exception as exc:
        # A bug must cost one check, never the service nursery (and with it the proxy).
        log.exception("health check of %s failed unexpectedly", server.address)
        why = f"check failed: {type(exc).__name__}"
    entry = state.servers[server.address]
    entry.last_check = CheckResult(why is None, why or "ok", time.time())
    health = observe(entry.health, why is None, check.healthy_after, check.unhealthy_after)
    if health.up != entry.health.up:
        state.version += 1
        if health.up:
            entry.up_since = trio.current_time()  # slow_start ramps from here
            log.warning("upstream %s: server %s is up again (%s)", upstream.name, server.address,
                        f"{check.healthy_after} checks passed")  # fmt: skip
        else:
            log.warning("upstream %s: server %s is down: %s", upstream.name, server.address, why)
        telemetry.upstream_healthy(upstream.name, str(server.address), health.up)
    entry.health = health


class Probers:
    """The running prober tasks, one per upstream with a health_check."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Upstream, trio.CancelScope]] = {}

    def sync(
        self,
        nursery: trio.Nursery,
        upstreams: Mapping[str, Upstream],
        tls_contexts: Mapping[str, ssl.SSLContext | None],
        book: ServerBook,
        telemetry: Telemetry,
    ) -> None:
        """Start, restart (if changed) or stop probers to match `upstreams`."""
        for name, (old, scope) in list(self._running.items()):
            if upstreams.get(name) != old:
                scope.cancel()
                del self._running[name]
        for name, upstream in upstreams.items():
            state = book.upstreams[name]
            if upstream.health_check is None:
                _all_up(state)  # a check removed by a reload must not leave a server down
            elif name not in self._running:
                scope = trio.CancelScope()
                self._running[name] = (upstream, scope)
                nursery.start_soon(
                    _run_in, scope, upstream, state, tls_contexts[name], telemetry,
                    name=f"health checks {name}",
                )  # fmt: skip
            for server in servers_of(upstream, state):
                up = state.servers[server.address].health.up
                telemetry.upstream_healthy(name, str(server.address), up)


async def _run_in(
    scope: trio.CancelScope,
    upstream: Upstream,
    state: UpstreamState,
    tls_ctx: ssl.SSLContext | None,
    telemetry: Telemetry,
) -> None:
    with scope:
        await probe_upstream(upstream, state, tls_ctx, telemetry)


def _all_up(state: UpstreamState) -> None:
    for entry in state.servers.values():
        if not entry.health.up:
            entry.health = Health()
            state.version += 1
