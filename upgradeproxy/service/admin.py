"""The admin listener: /healthz, /readyz, /metrics and /upstreams on a tiny h11 server, and
its life beside a running proxy (`AdminListener`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import h11
import trio

from upgradeproxy.config.model import Address, Config
from upgradeproxy.errors import REASONS
from upgradeproxy.pool.servers import ServerBook, describe
from upgradeproxy.service.sockets import (
    Handed,
    InFlight,
    StoppableListener,
    bind_socket,
    start_error,
)
from upgradeproxy.transport.streams import (
    STREAM_ERRORS,
    HttpStream,
    PeerClosed,
    aclose_quietly,
)

log = logging.getLogger("upgradeproxy.service.admin")

Page = tuple[int, bytes, bytes]  # status, content type, body
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# How long a stopping proxy waits for the admin requests it accepted to be answered.
_STOP_GRACE: Final = 1.0


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


def upstreams_page(config: Config, book: ServerBook) -> str:
    """The /upstreams document (interface.md admin additions)."""
    return json.dumps(describe(config, book), indent=1) + "\n"


@dataclass(slots=True)
class _Serving:
    address: Address  # as configured: what a reload compares
    bound: tuple[str, int]  # as bound: port 0 resolved
    scope: trio.CancelScope
    fd: int  # what a SIGUSR2 hands to the next generation
    listener: StoppableListener


class AdminListener:
    """A proxy's admin listener over the proxy's life: bound (or taken from the sockets handed
    down), served in the proxy's service nursery, moved by a reload, handed over to a new
    generation, and stopped with the requests it accepted answered."""

    def __init__(
        self,
        handed: Handed,
        *,
        reuse_port: bool,
        ready: Callable[[], bool],
        metrics: Callable[[], str],
        upstreams: Callable[[], str],
    ) -> None:
        self._handed = handed
        self._reuse_port = reuse_port
        self._ready = ready
        self._metrics = metrics
        self._upstreams = upstreams
        self._serving: _Serving | None = None
        self._busy = InFlight()

    @property
    def address(self) -> Address | None:
        """The configured address served now, if any."""
        return self._serving.address if self._serving else None

    @property
    def bound(self) -> tuple[str, int] | None:
        """The bound (host, port) served now, if any."""
        return self._serving.bound if self._serving else None

    def handover_fds(self) -> dict[str, int]:
        """Configured address -> descriptor of the admin socket, for the next generation."""
        serving = self._serving
        return {str(serving.address): serving.fd} if serving is not None else {}

    async def open(self, address: Address) -> trio.SocketListener:
        """The listening socket for `address`: handed down, else bound here."""
        if (handed := self._handed.take_listener(address, 128)) is not None:
            return handed
        try:
            return await open_admin(address, reuse_port=self._reuse_port)
        except OSError as exc:
            raise start_error(exc, "admin.address", address) from exc

    def start(
        self, services: trio.Nursery, address: Address, listener: trio.SocketListener
    ) -> None:
        """Serve `listener` (opened for `address`) in `services` until stopped or moved."""
        scope = trio.CancelScope()
        sock = listener.socket
        stoppable = StoppableListener(listener, self._busy)
        self._serving = _Serving(address, sock.getsockname()[:2], scope, sock.fileno(), stoppable)
        services.start_soon(self._serve, stoppable, scope, name=f"admin {address}")

    def move(
        self, services: trio.Nursery | None, opened: tuple[Address, trio.SocketListener] | None
    ) -> None:
        """A reload moved the address: stop serving the old one, serve `opened` (if any)."""
        if self._serving is not None:
            self._serving.scope.cancel()
        self._serving = None
        if opened is not None:
            assert services is not None
            self.start(services, *opened)

    def release(self) -> None:
        """A new generation serves the socket now: stop accepting (a request in progress
        still gets its answer)."""
        if self._serving is not None:
            self._serving.listener.stop()
            self._serving = None

    async def stop(self) -> None:
        """Stop accepting and answer the connections accepted (with workers the socket stays
        open in the others, so probes keep getting answers)."""
        with trio.move_on_after(_STOP_GRACE):
            if self._serving is not None:
                self._serving.listener.stop()
                await self._serving.listener.closed.wait()  # no accept left half-done
            await self._busy.idle.wait()

    async def _serve(self, listener: StoppableListener, scope: trio.CancelScope) -> None:
        with scope:
            # serve_admin only accepts and closes: any trio Listener of SocketStreams will do.
            await serve_admin(
                cast(trio.SocketListener, listener),
                self._ready,
                self._metrics,
                self._upstreams,
                listener.busy,
            )
