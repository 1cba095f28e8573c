"""The request path both client protocols share: a head becomes a plan, the plan picks a
server, a pooled or new connection carries it, and the connection goes back to the pool
(or is closed) when the exchange is over.

HTTP/1.1 (`exchange`) and HTTP/2 (`h2_request`) differ only in how they send the request
and relay the answer: each passes its own `ExchangeOn` to `forward`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import h11
import trio

from upgradeproxy.connection.admission import admit, preamble, upstream_pool
from upgradeproxy.connection.context import Edge, new_request_id
from upgradeproxy.connection.outcome import Done, Outcome
from upgradeproxy.connection.response import Exchange, Stale
from upgradeproxy.errors import ErrorKind, ProxyError, UpstreamTimeout, UpstreamUnavailable
from upgradeproxy.pool.balancer import Balancer, no_server_available
from upgradeproxy.rules import plan as planning
from upgradeproxy.rules.plan import Plan
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import aclose_quietly
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.upstream.connections import (
    ConnectFailed,
    UpstreamConn,
    connect,
    new_upstream_conn,
)

log = logging.getLogger("upgradeproxy")

E = TypeVar("E", bound=Edge)
ExchangeOn = Callable[[E, Exchange, UpstreamConn], Awaitable[Outcome]]


def plan_request(client: Edge, head: planning.Head, rec: ExchangeRecord) -> Plan:
    """The pure plan for `head`, noting in `rec` what is known before each check."""
    rec.method, rec.host, rec.path = planning.log_fields(head)
    if client.first:
        admit(client, head, rec)
    config = client.rt.config
    rec.query, rec.user_agent = planning.log_extras(head, config)
    rid = planning.request_id(head.headers, client.origin, config, new_request_id)
    rec.request_id = "" if rid is None else rid.decode("latin-1")
    located = planning.locate(head, client.rt.router)
    rec.host = (located.authority or b"").decode("latin-1")
    rec.path = located.path
    rec.route = located.route_label
    rec.upstream = located.route.upstream
    return planning.plan(head, located, client.origin, config, rid)


async def forward(client: E, ex: Exchange, exchange_on: ExchangeOn[E]) -> Outcome:
    """Forward one planned request with `exchange_on` and relay (or switch on) its answer."""
    balancer = client.rt.balancers[ex.plan.upstream.name]
    rec = ex.rec
    for attempt in range(2):
        # A retry after a stale pick goes to a fresh connection: the rest of the pool for
        # that server may have died with it (an upstream restart closes them all).
        conn = await _open_upstream(client, ex, balancer, pooled_ok=not attempt)
        rec.server = str(conn.server.address)
        balancer.acquire(conn.server)
        ex.extra = balancer.set_cookie(
            conn.server, ex.plan.pin, secure=client.origin.proto == b"https"
        )
        outcome: Outcome = Done.CLOSE
        try:
            outcome = await exchange_on(client, ex, conn)
            return outcome
        except Stale:
            if attempt:
                raise UpstreamUnavailable("upstream closed the connection", kind="reset") from None
            continue
        finally:
            if isinstance(outcome, Switched):
                outcome.release = (balancer, conn.server)  # held until the tunnel closes
            else:
                balancer.release(conn.server)
                if not _return_to_pool(client, ex, conn):
                    await aclose_quietly(conn.stream)
    raise AssertionError("unreachable")


def _return_to_pool(client: Edge, ex: Exchange, conn: UpstreamConn) -> bool:
    """Put `conn` back in the pool if it may carry another request."""
    h = conn.http.h11
    if ex.plan.offer or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
        return False
    upstream_pool(client, ex.plan.upstream).put(conn, ex.plan.upstream.tls)
    return True


async def _open_upstream(
    client: Edge, ex: Exchange, balancer: Balancer, *, pooled_ok: bool = True
) -> UpstreamConn:
    """A pooled (if `pooled_ok`) or new connection, trying servers in the balancer's order.

    Raises UpstreamUnavailable or UpstreamTimeout when no server answered.
    """
    shared, rt, upstream = client.shared, client.rt, ex.plan.upstream
    pool = upstream_pool(client, upstream)
    now = trio.current_time()
    last: ConnectFailed | None = None
    timed_out = True
    plan = ex.plan
    tried = False
    for server in balancer.candidates(
        now, key=plan.balance_key, tunnel=bool(plan.offer), pin=plan.pin
    ):
        tried = True
        ex.upstream_started = time.monotonic()
        pooled = pool.take(server, upstream.tls, probe=plan.has_body) if pooled_ok else None
        if pooled is not None:
            ex.rec.upstream_connect = 0.0
            return pooled
        try:
            stream = await connect(
                server,
                rt.config.timeouts.connect,
                upstream.tls,
                rt.tls_contexts[upstream.name],
                preamble(client, upstream),  # only a new connection needs one
            )
        except ConnectFailed as exc:
            last = exc
            ex.rec.server = str(server.address)  # the last one tried, like nginx's $upstream_addr
            timed_out = timed_out and exc.timed_out
            balancer.mark_failed(server, trio.current_time())
            kind: ErrorKind = "connect_timeout" if exc.timed_out else "connect"
            shared.telemetry.upstream_error(upstream.name, kind)
            log.warning("upstream %s: %s", upstream.name, exc)
            continue
        ex.rec.upstream_connect = time.monotonic() - ex.upstream_started
        shared.telemetry.upstream_connected(upstream.name, ex.rec.upstream_connect)
        return new_upstream_conn(server, stream)
    if not tried:
        raise no_server_available(upstream, balancer.known())
    detail = f"no server of upstream {upstream.name!r} answered ({last})"
    err: ProxyError = (
        UpstreamTimeout(detail, kind="connect_timeout")
        if timed_out
        else UpstreamUnavailable(detail, kind="connect")
    )
    err.counted = True
    raise err
