"""Listeners, connection lifecycle, reload and drain: the proxy as a running service (its
admin listener is service/admin.py's `AdminListener`; an accepted client is served by
service/clients.py).

`serve()` is the public entry point for embedding; `Proxy` is what `task_status.started`
hands back, so a caller (the CLI, a test) can read bound addresses, reload and drain.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence

import trio

from upgradeproxy.config.model import Address, Config, Listener
from upgradeproxy.connection.context import Runtime, Shared
from upgradeproxy.pool.discovery import Lookup
from upgradeproxy.rules.plan import route_label
from upgradeproxy.service.accept import accept_clients, take_backlog
from upgradeproxy.service.admin import AdminListener, upstreams_page
from upgradeproxy.service.clients import Bound, serve_accepted
from upgradeproxy.service.sockets import Handed, bind_socket, close_all, start_error
from upgradeproxy.transport.streams import aclose_quietly
from upgradeproxy.transport.tls import server_tls_context
from upgradeproxy.tunnel.parking import Parking, park_after_from_env
from upgradeproxy.tunnel.session import spread_ends
from upgradeproxy.upstream.discovery import Discovery
from upgradeproxy.upstream.health_checks import Probers

log = logging.getLogger("upgradeproxy")

BACKLOG = 4096


def _contexts(listeners: Sequence[Listener]) -> list[ssl.SSLContext | None]:
    return [
        server_tls_context(lsn.tls, f"listen[{i}].tls", http2=lsn.http2)
        for i, lsn in enumerate(listeners)
    ]


class Proxy:
    """A running proxy: listeners, the current runtime, and its connections."""

    def __init__(
        self,
        config: Config,
        shared: Shared | None = None,
        *,
        reuse_port: bool | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self.shared = shared or Shared()
        self.parking = Parking(park_after_from_env(), self.shared.telemetry.tunnels_parked)
        self.runtime = Runtime.build(config, self.shared.book)
        self.probers = Probers()
        self.discovery = Discovery(self.shared.book, self.shared.telemetry, self.shared.pool)
        self.shared.telemetry.declare_routes(_route_protocols(config))
        self.limiter = trio.CapacityLimiter(config.limits.max_connections)
        # Fixed for the process: every socket sharing a port must set SO_REUSEPORT, so a worker
        # keeps it even after a reload to `workers: 1` (which only a restart applies).
        self.reuse_port = config.workers > 1 if reuse_port is None else reuse_port
        self.bound: dict[Address, Bound] = {}
        self.active = 0
        self._drain = trio.Event()
        self._idle = trio.Event()
        self._services: trio.Nursery | None = None
        self._accepts: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None
        self._handed = Handed(sockets)
        self._admin = AdminListener(
            self._handed,
            reuse_port=self.reuse_port,
            ready=lambda: not self.draining,
            metrics=self.shared.telemetry.render,
            upstreams=lambda: upstreams_page(self.runtime.config, self.shared.book),
        )
        self.retiring = False  # a new generation took the sockets over: finish and exit
        self._deadline: float | None = None  # when the drain cuts what is left
        self._finish: trio.CancelScope | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of each listener, in config order."""
        return [b.listener.socket.getsockname()[:2] for b in self.bound.values()]

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The bound (host, port) of the admin listener, if there is one."""
        return self._admin.bound

    @property
    def draining(self) -> bool:
        return self.shared.draining

    def drain(self) -> None:
        """Stop accepting and let in-flight work finish (within `timeouts.drain`); from now on
        responses say `Connection: close` and idle keep-alive connections get
        `timeouts.keepalive_drain` for a request already on its way."""
        self.shared.begin_drain(self.runtime.config.timeouts.keepalive_drain)
        self._drain.set()

    def retire(self, grace: float) -> None:
        """A new generation accepts on our sockets: stop accepting, finish within `grace`."""
        self.retiring = True
        self._deadline = trio.current_time() + grace
        self._admin.release()
        self.drain()

    def cut_to_drain(self) -> None:
        """A stop during a change: what is left gets at most `timeouts.drain` from now."""
        cut = trio.current_time() + self.runtime.config.timeouts.drain
        self._deadline = cut if self._deadline is None else min(self._deadline, cut)
        if self._finish is not None:
            self._finish.deadline = self._deadline

    def handover_fds(self) -> dict[str, int]:
        """Configured address -> descriptor of every listening socket, the admin one included."""
        fds = {str(a): b.listener.socket.fileno() for a, b in self.bound.items()}
        fds.update(self._admin.handover_fds())
        return fds

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained; `task_status.started(self)` once every listener is bound."""
        async with trio.open_nursery() as services:
            self._services = services
            # Servers found in DNS are known before the first client is accepted.
            fresh = await self.discovery.look_ahead(self.runtime.config)
            self._sync_services(services, self.runtime, fresh)
            admin = self.runtime.config.admin
            if admin is not None:
                listener = await self._admin.open(admin.address)
                self._admin.start(services, admin.address, listener)
            try:
                await self._serve_until_drained(task_status)
            finally:
                await self._close_listeners()
                self.shared.pool.close_all()
            await self._admin.stop()
            services.cancel_scope.cancel()

    def _sync_services(
        self, services: trio.Nursery, runtime: Runtime, fresh: Mapping[str, Lookup]
    ) -> None:
        """Resolver loops (with the first lookups' sets), then health-check probers."""
        shared = self.shared
        self.discovery.sync(services, runtime.config, fresh)
        upstreams, contexts = runtime.config.upstreams, runtime.tls_contexts
        self.probers.sync(services, upstreams, contexts, shared.book, shared.telemetry)

    async def _serve_until_drained(self, task_status: trio.TaskStatus[Proxy]) -> None:
        async with trio.open_nursery() as conns:
            self._conns = conns
            # Parked tunnels live in this nursery too: the drain's end cancels them with the rest.
            await conns.start(self.parking.run, name="parked tunnels")
            self.shared.parking = self.parking
            async with trio.open_nursery() as accepts:
                self._accepts = accepts
                listeners = self.runtime.config.listeners
                tls = _contexts(listeners)
                socks = await self._bind_all([listener.address for listener in listeners])
                for listener, sock, context in zip(listeners, socks, tls, strict=True):
                    self._listen(listener, sock, context)
                self._handed.close_rest()
                task_status.started(self)
                await self._drain.wait()
                # /readyz is 503 already: a load balancer polling it stops sending clients
                # before the listeners close (until then, new clients are still served).
                delay = 0 if self.retiring else self.runtime.config.timeouts.drain_delay
                if delay > 0:
                    log.info("drain: accepting for drain_delay", extra={"seconds": delay})
                    await trio.sleep(delay)
                accepts.cancel_scope.cancel()
            if not self.retiring:  # else the next generation accepts them
                for bound in self.bound.values():
                    take_backlog(bound.listener, self.limiter, self._starter(bound))
            # Closed now rather than at exit: new clients are refused at once instead of
            # waiting in a backlog that nobody will read.
            await self._close_listeners()
            await self._finish_drain()
            conns.cancel_scope.cancel()

    async def _finish_drain(self) -> None:
        config = self.runtime.config
        now = trio.current_time()
        if self._deadline is None:
            self._deadline = now + config.timeouts.drain
        if config.drain_tunnels == "spread":  # over what is left: upgrade_grace when retiring
            spread_ends(self.shared.tunnels, now, max(self._deadline - now, 0.0))
        with trio.CancelScope(deadline=self._deadline) as self._finish:
            while self.active:
                self._idle = trio.Event()
                await self._idle.wait()

    async def _close_listeners(self) -> None:
        for bound in self.bound.values():
            await aclose_quietly(bound.listener)

    async def reload(self, config: Config) -> None:
        """New connections use `config`; established ones keep the runtime they started with.

        All or nothing: if a new listener cannot be bound or a certificate does not load
        (OSError, ssl.SSLError included), nothing changes and the error propagates.
        """
        if self.draining:
            raise RuntimeError("cannot reload while draining")
        fresh = await self.discovery.look_ahead(config)  # names new to this config
        runtime = Runtime.build(config, self.shared.book, trio.current_time())
        self.shared.telemetry.declare_routes(_route_protocols(config))
        wanted = {listener.address: listener for listener in config.listeners}
        tls = dict(zip(wanted, _contexts(config.listeners), strict=True))
        new = [address for address in wanted if address not in self.bound]
        socks = await self._bind_all(new, config)
        wanted_admin = config.admin.address if config.admin else None
        admin_moved = wanted_admin != self._admin.address
        admin = None
        try:
            if admin_moved and wanted_admin is not None:
                admin = (wanted_admin, await self._admin.open(wanted_admin))
            if self.draining:  # a drain began while we were binding
                raise RuntimeError("cannot reload while draining")
        except BaseException:
            close_all(socks)
            if admin is not None:
                admin[1].socket.close()
            raise
        # Commit. Nothing below waits, so no connection ever sees half a reload.
        self.runtime = runtime
        if self._services is not None:
            self._sync_services(self._services, runtime, fresh)
        self.limiter.total_tokens = config.limits.max_connections
        for address in [a for a in self.bound if a not in wanted]:
            self.bound.pop(address).scope.cancel()
        for address, bound in self.bound.items():
            bound.config, bound.tls = wanted[address], tls[address]
        for address, sock in zip(new, socks, strict=True):
            self._listen(wanted[address], sock, tls[address])
        if admin_moved:
            self._admin.move(self._services, admin)

    async def _bind_all(
        self, addresses: list[Address], config: Config | None = None
    ) -> list[trio.socket.SocketType]:
        """One bound socket per address, or none at all (and the error) if one fails."""
        listeners = (config or self.runtime.config).listeners
        fields = {lsn.address: f"listen[{i}].address" for i, lsn in enumerate(listeners)}
        socks: list[trio.socket.SocketType] = []
        try:
            for address in addresses:
                if (handed := self._handed.take(address)) is not None:
                    socks.append(handed)
                    continue
                try:
                    socks.append(await bind_socket(address, reuse_port=self.reuse_port))
                except OSError as exc:
                    raise start_error(exc, fields.get(address, "listen"), address) from exc
        except BaseException:
            close_all(socks)
            raise
        return socks

    def _listen(
        self, listener: Listener, sock: trio.socket.SocketType, tls: ssl.SSLContext | None
    ) -> None:
        sock.listen(BACKLOG)
        bound = Bound(listener, trio.SocketListener(sock), trio.CancelScope(), tls)
        self.bound[listener.address] = bound
        assert self._accepts is not None
        self._accepts.start_soon(self._accept_loop, bound, name=f"accept {listener.address}")

    async def _accept_loop(self, bound: Bound) -> None:
        with bound.scope:
            await accept_clients(
                bound.listener,
                self.limiter,
                limited=self.shared.telemetry.connection_limited,
                stopping=lambda: self.retiring,
                start=self._starter(bound),
            )
        await aclose_quietly(bound.listener)

    def _starter(self, bound: Bound) -> Callable[[trio.SocketStream, object], None]:
        return functools.partial(self._start_client, bound)

    def _start_client(self, bound: Bound, stream: trio.SocketStream, token: object) -> None:
        assert self._conns is not None
        self.active += 1
        self._conns.start_soon(self._handle, stream, bound, token)

    async def _handle(self, stream: trio.SocketStream, bound: Bound, token: object) -> None:
        rt = self.runtime
        self.shared.telemetry.connection_opened()
        parked = False
        try:
            parked = await serve_accepted(stream, bound, rt, self.shared, self, token)
        except Exception:
            # A bug must cost one connection, never the process or a traceback to the client.
            log.exception("unexpected error on a client connection")
        finally:
            if not parked:  # else its tunnel calls connection_done when it ends
                await aclose_quietly(stream)
                self.connection_done(token)

    def connection_done(self, token: object) -> None:
        """A client connection ended: its slot, its count, and the drain's wait."""
        self.limiter.release_on_behalf_of(token)
        self.shared.telemetry.connection_closed()
        self.active -= 1
        if not self.active:
            self._idle.set()


def _route_protocols(config: Config) -> list[tuple[str, tuple[str, ...]]]:
    return [(route_label(r), r.upgrade) for r in config.routes]


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
