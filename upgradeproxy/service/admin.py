"""The admin listener: /healthz, /readyz, /metrics and /upstreams on a tiny h11 server."""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import trio

from upgradeproxy.config.model import Address
from upgradeproxy.errors import REASONS
from upgradeproxy.service.sockets import InFlight, bind_socket
from upgradeproxy.transport.streams import (
    STREAM_ERRORS,
    HttpStream,
    PeerClosed,
    aclose_quietly,
)

log = logging.getLogger("upgradeproxy.service.admin")

Page = tuple[int, bytes, bytes]  # status, content type, body
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def admin_page(
    path: bytes,
    ready: Callable[[], bool],
    metrics: Callable[[], str],
    upstreams: Callable[[], str] | None = None,
) -> Page:
    """What the admin endpoint answers for `path`."""
    path = path.split(b"?", 1)[0]
    if path == b"/healthz":
        return 200, b"text/plain", b"ok\n"
    if path == b"/readyz":
        if not ready():
            return 503, b"text/plain", b"draining\n"
        return 200, b"text/plain", b"ready\n"
    if path == b"/metrics":
        return 200, METRICS_TYPE, metrics().encode()
    if path == b"/upstreams" and upstreams is not None:
        return 200, b"application/json", upstreams().encode()
    return 404, b"text/plain", b"not found\n"


async def _serve_admin_client(
    stream: trio.abc.Stream,
    ready: Callable[[], bool],
    metrics: Callable[[], str],
    upstreams: Callable[[], str] | None = None,
) -> None:
    http = HttpStream(h11.Connection(h11.SERVER), stream)
    try:
        while True:
            with trio.fail_after(30):
                event = await http.next_event()
            if not isinstance(event, h11.Request):
                return
            request_target, method = event.target, event.method
            while not isinstance(event, h11.EndOfMessage):
                with trio.fail_after(30):
                    event = await http.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
            status, ctype, body = admin_page(request_target, ready, metrics, upstreams)
            headers = [(b"Content-Type", ctype), (b"Content-Length", str(len(body)).encode())]
            if method not in (b"GET", b"HEAD"):
                status, body = 405, b"method not allowed\n"
                headers = [(b"Content-Type", b"text/plain"), (b"Allow", b"GET, HEAD"),
                           (b"Content-Length", str(len(body)).encode())]  # fmt: skip
            reason = REASONS.get(status, b"")
            # HEAD gets GET's Content-Length (RFC 9110 §9.3.2), without the body.
            http.queue(h11.Response(status_code=status, headers=headers, reason=reason))
            if body and method != b"HEAD":
                http.queue(h11.Data(data=body))
            await http.send(h11.EndOfMessage())
            if http.h11.our_state is not h11.DONE or http.h11.their_state is not h11.DONE:
                return
            http.h11.start_next_cycle()
    except (h11.ProtocolError, PeerClosed, trio.TooSlowError, *STREAM_ERRORS):
        return
    finally:
        await aclose_quietly(stream)


async def open_admin(address: Address, *, reuse_port: bool) -> trio.SocketListener:
    """Bind the admin listener; `reuse_port` lets every worker answer scrapes on one address."""
    sock = await bind_socket(address, reuse_port=reuse_port)
    sock.listen(128)
    return trio.SocketListener(sock)


async def serve_admin(
    listener: trio.SocketListener,
    ready: Callable[[], bool],
    metrics: Callable[[], str],
    upstreams: Callable[[], str] | None = None,
    busy: InFlight | None = None,
) -> None:
    """Serve the admin endpoints on `listener` until cancelled, then close it. `busy` is the
    count a StoppableListener raised for each connection it accepted: lowered when served."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_admin_client(stream, ready, metrics, upstreams)
        finally:
            if busy is not None:
                busy.leave()

    try:
        await trio.serve_listeners(handler, [listener])
    finally:
        await aclose_quietly(listener)
