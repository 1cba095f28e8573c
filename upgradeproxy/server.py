"""Listeners, connection lifecycle, reload and drain: the proxy as a running service.

`serve()` is the public entry point for embedding; `Proxy` is what `task_status.started`
hands back, so a caller (the CLI, a test) can read bound addresses, reload and drain.
"""

from __future__ import annotations

import errno
import logging
import ssl
from dataclasses import dataclass

import trio

from upgradeproxy.admin import serve_admin
from upgradeproxy.config import Address, Config, Listener
from upgradeproxy.exchange import Runtime, Shared, serve_client
from upgradeproxy.proxy_protocol import (
    MAX_HEADER_BYTES,
    NEED_MORE,
    ProxyProtocolError,
    parse_proxy_header,
)
from upgradeproxy.streams import STREAM_ERRORS, PrefixedStream, aclose_quietly, bind_socket

log = logging.getLogger("upgradeproxy")

# trio's serve_listeners treats these as "try again shortly" rather than fatal.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
BACKLOG = 4096


def server_tls_context(listener: Listener) -> ssl.SSLContext | None:
    if listener.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls.cert, listener.tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(slots=True)
class _Bound:
    config: Listener
    listener: trio.SocketListener
    scope: trio.CancelScope
    tls: ssl.SSLContext | None


class Proxy:
    """A running proxy: listeners, the current runtime, and its connections."""

    def __init__(self, config: Config, shared: Shared | None = None) -> None:
        self.runtime = Runtime.build(config)
        self.shared = shared or Shared()
        self.limiter = trio.CapacityLimiter(config.limits.max_connections)
        self.bound: dict[Address, _Bound] = {}
        self.active = 0
        self._drain = trio.Event()
        self._idle = trio.Event()
        self._accepts: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None
        self.admin_address: tuple[str, int] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of each listener, in config order."""
        return [b.listener.socket.getsockname()[:2] for b in self.bound.values()]

    @property
    def draining(self) -> bool:
        return self.shared.draining

    def drain(self) -> None:
        """Stop accepting and let in-flight work finish (within `timeouts.drain`)."""
        self.shared.draining = True
        self._drain.set()

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained; `task_status.started(self)` once every listener is bound."""
        async with trio.open_nursery() as outer:
            admin = self.runtime.config.admin
            if admin is not None:
                self.admin_address = await outer.start(
                    serve_admin,
                    admin.address,
                    lambda: not self.draining,
                    self.shared.telemetry.render,
                )
            try:
                await self._serve_until_drained(task_status)
            finally:
                for bound in self.bound.values():
                    await aclose_quietly(bound.listener)
                self.shared.pool.close_all()
            outer.cancel_scope.cancel()

    async def _serve_until_drained(self, task_status: trio.TaskStatus[Proxy]) -> None:
        async with trio.open_nursery() as conns:
            self._conns = conns
            async with trio.open_nursery() as accepts:
                self._accepts = accepts
                for listener in self.runtime.config.listeners:
                    await self._open(listener)
                task_status.started(self)
                await self._drain.wait()
                accepts.cancel_scope.cancel()
            await self._finish_drain()
            conns.cancel_scope.cancel()

    async def _finish_drain(self) -> None:
        for scope in list(self.shared.idle_waits):
            scope.cancel()
        with trio.move_on_after(self.runtime.config.timeouts.drain):
            while self.active:
                self._idle = trio.Event()
                await self._idle.wait()

    def reload(self, config: Config) -> None:
        """New connections use `config`; established ones keep the runtime they started with."""
        self.runtime = Runtime.build(config)
        self.limiter.total_tokens = config.limits.max_connections
        wanted = {listener.address: listener for listener in config.listeners}
        for address in list(self.bound):
            if address not in wanted:
                self.bound.pop(address).scope.cancel()
        assert self._accepts is not None
        for address, listener in wanted.items():
            if address in self.bound:
                old = self.bound[address]
                old.config, old.tls = listener, server_tls_context(listener)
            else:
                self._accepts.start_soon(self._open, listener)

    async def _open(self, listener: Listener) -> None:
        sock = await bind_socket(listener.address, reuse_port=self.runtime.config.workers > 1)
        sock.listen(BACKLOG)
        bound = _Bound(
            listener, trio.SocketListener(sock), trio.CancelScope(), server_tls_context(listener)
        )
        self.bound[listener.address] = bound
        assert self._accepts is not None
        self._accepts.start_soon(self._accept_loop, bound, name=f"accept {listener.address}")

    async def _accept_loop(self, bound: _Bound) -> None:
        with bound.scope:
            while True:
                token = object()
                # Waiting here, before accept, leaves excess clients in the kernel backlog.
                await self.limiter.acquire_on_behalf_of(token)
                try:
                    stream = await bound.listener.accept()
                except OSError as exc:
                    self.limiter.release_on_behalf_of(token)
                    if exc.errno not in _ACCEPT_RETRY:
                        raise
                    log.warning("accept failed, retrying: %s", exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    self.limiter.release_on_behalf_of(token)
                    raise
                assert self._conns is not None
                self.active += 1
                self._conns.start_soon(self._handle, stream, bound, token)
        await aclose_quietly(bound.listener)

    async def _handle(self, stream: trio.SocketStream, bound: _Bound, token: object) -> None:
        rt = self.runtime
        try:
            await self._serve(stream, bound, rt)
        except Exception:
            # A bug must cost one connection, never the process or a traceback to the client.
            log.exception("unexpected error on a client connection")
        finally:
            await aclose_quietly(stream)
            self.limiter.release_on_behalf_of(token)
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _serve(self, stream: trio.SocketStream, bound: _Bound, rt: Runtime) -> None:
        try:
            peer_ip = str(stream.socket.getpeername()[0])
        except OSError:
            return
        leftover = b""
        client: trio.abc.Stream = stream
        head_timeout = rt.config.timeouts.request_header
        with trio.move_on_after(head_timeout) as scope:
            if bound.config.proxy_protocol:
                found = await _read_proxy_header(stream)
                if found is None:
                    return
                peer_ip = found[0] or peer_ip
                leftover = found[1]
            if bound.tls is not None:
                transport = PrefixedStream(stream, leftover) if leftover else stream
                leftover = b""
                client = trio.SSLStream(transport, bound.tls, server_side=True)
                try:
                    await client.do_handshake()
                except (*STREAM_ERRORS, ssl.SSLError) as exc:
                    log.info("%s: TLS handshake failed: %s", peer_ip, exc)
                    return
        if scope.cancelled_caught:
            return
        await serve_client(client, peer_ip, bound.tls is not None, rt, self.shared, leftover)


async def _read_proxy_header(stream: trio.SocketStream) -> tuple[str | None, bytes] | None:
    """(client ip or None for LOCAL, bytes after the header), or None if it is not one."""
    buf = b""
    while len(buf) <= MAX_HEADER_BYTES:
        try:
            found = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            log.info("bad PROXY protocol header: %s", exc)
            return None
        if found is not NEED_MORE:
            header, used = found
            source = header.source[0] if header.source else None
            return source, buf[used:]
        try:
            data = await stream.receive_some(MAX_HEADER_BYTES)
        except STREAM_ERRORS:
            return None
        if not data:
            return None
        buf += data
    return None


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a proxy for `config` until cancelled or drained; reports the `Proxy` when bound.

    Example::

        async with trio.open_nursery() as nursery:
            proxy = await nursery.start(upgradeproxy.serve, config)
            print(proxy.addresses)
    """
    await Proxy(config).run(task_status=task_status)
