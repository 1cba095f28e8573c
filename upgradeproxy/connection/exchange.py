"""One client connection: read a request, route it, forward it, relay or switch.

Invariants:
- The client side is parsed only by h11 (plus the checks in `headers`); nothing the client
  sends after a request head reaches an upstream unless that upstream answered a valid 101.
- A `ProxyError` becomes a short response while one can still be written; anything else
  closes the connection. No exception reaches the client.
- An upstream connection returns to the pool only after a complete, non-upgrade exchange.
"""

from __future__ import annotations

import contextlib
import logging
import time

import h11
import trio

from upgradeproxy.connection.admission import admit_at_accept, release
from upgradeproxy.connection.body import BodyPump
from upgradeproxy.connection.context import (
    Client,
    ConnectionOwner,
    Peer,
    Runtime,
    Shared,
    new_request_id,
)
from upgradeproxy.connection.forward import forward, plan_request
from upgradeproxy.connection.outcome import Done, Outcome
from upgradeproxy.connection.reply import send_error
from upgradeproxy.connection.request import read_request
from upgradeproxy.connection.response import Exchange, Stale, client_reusable, relay_response
from upgradeproxy.errors import ClientGone, ProxyError, UpstreamUnavailable
from upgradeproxy.rules import plan as planning
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import (
    STREAM_ERRORS,
    HttpStream,
    PeerClosed,
    aclose_quietly,
    bytes_waiting,
    linger,
)
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.upstream.connections import UpstreamConn

log = logging.getLogger("upgradeproxy")


async def serve_client(
    stream: trio.abc.Stream,
    peer: Peer,
    rt: Runtime,
    shared: Shared,
    owner: ConnectionOwner | None = None,
    token: object = None,
) -> bool:
    """Serve requests on one client connection until it closes, errs, drains or switches.

    True if its tunnel parked: the connection, `stream` included, then belongs to the tunnel,
    which tells `owner` (with `token`) when it ends; the caller must leave it open."""
    conn = h11.Connection(
        h11.SERVER, max_incomplete_event_size=rt.config.limits.max_request_header_bytes
    )
    if peer.leftover:
        conn.receive_data(peer.leftover)
    origin = planning.Origin(peer.ip, b"https" if peer.tls else b"http", peer.client_cert)
    client = Client(HttpStream(conn, stream), origin, rt, shared, peer=peer)
    held = client.held
    parked = False
    try:
        admit_at_accept(client)
        switched = await _serve_http(client)
        if switched is not None:
            # The HTTP frames and state (h11, the Client, request headers) are gone: an idle
            # tunnel holds only what `Switched` and `held` carry.
            del client, conn
            if parked := await switched.run():
                held.shared, held.owner, held.token = shared, owner, token
                switched.owner = held
    finally:
        if not parked:
            release(held, shared)  # first: nothing below may skip it
            await aclose_quietly(stream)
    return parked


async def _serve_http(client: Client) -> Switched | None:
    conn, stream, shared = client.http.h11, client.http.stream, client.shared
    while True:
        outcome = await _one_exchange(client)
        if isinstance(outcome, Switched):
            return outcome
        # Draining needs no test here: a response that began during the drain said
        # `Connection: close`, and one that began before it leaves an idle wait with the grace.
        if outcome is Done.CLOSE:
            if conn.their_state in (h11.SEND_BODY, h11.ERROR) or (
                shared.draining and _pipelined(client)
            ):
                await linger(stream)  # the client may still be sending what we did not read
            return None
        conn.start_next_cycle()
        client.first = False
        # Reads and writes that need not wait no longer yield (streams.HttpStream): one
        # schedule point per exchange, so a client pipelining requests to a fast upstream
        # cannot hold the run loop for a whole burst.
        await trio.lowlevel.checkpoint()


def _pipelined(client: Client) -> bool:
    """Whether bytes of a next request are here: closing on them would reset the connection
    (and could destroy the response just written before the client reads it)."""
    return bool(client.http.h11.trailing_data[0]) or bytes_waiting(client.http.stream)


async def _one_exchange(client: Client) -> Outcome:
    """Handle one request: the connection goes on, closes, or becomes the returned tunnel."""
    rec = ExchangeRecord(client=client.peer_ip, client_cert=client.origin.client_cert or "")
    try:
        request = await read_request(client, rec)
        if request is None:
            return Done.CLOSE
        rec.started = time.monotonic()
        if request.http_version != b"1.1":
            rec.http_version = "1.0"  # h11 reads no other
        head = planning.Head(
            request.method, request.target, request.http_version, list(request.headers.raw_items())
        )
        ex = Exchange(request.method, plan_request(client, head, rec), rec)
        return await forward(client, ex, _exchange_on)
    except ProxyError as err:
        rec.status = err.status
        rec.error = err.detail
        log.info("%s %s: %s", client.peer_ip, err.status, err.detail)
        if err.upstream_side and not err.counted:
            client.shared.telemetry.upstream_error(rec.upstream, err.kind)
        client.shared.telemetry.refused(err.kind, rec.route)
        if not rec.method:  # the head did not parse: its request line may have
            rec.method, rec.path = planning.request_line(client.http.h11.trailing_data[0])
        if client.rt.config.request_id and not rec.request_id:
            rec.request_id = new_request_id().decode()
        method = rec.method.encode() if rec.method else None
        _drain_buffered_body(client)
        sent = await send_error(client, err, method, rec)
        return Done.KEEP_ALIVE if sent and not err.close and client_reusable(client) else Done.CLOSE
    except (ClientGone, PeerClosed):
        rec.error = rec.error or "client closed the connection"
        return Done.CLOSE
    finally:
        # Errors raised before h11 produced a request (400, 431, 408) are exchanges too.
        if (rec.method or rec.status) and not rec.logged:
            rec.duration = time.monotonic() - rec.started
            client.shared.telemetry.exchange_done(rec)


def _drain_buffered_body(client: Client) -> None:
    """Consume what h11 already holds of a request's body, so keep-alive can go on if that
    was all of it; a body still on the wire is not read, and the connection closes."""
    conn = client.http.h11
    with contextlib.suppress(h11.RemoteProtocolError):
        while conn.their_state is h11.SEND_BODY:
            if not isinstance(conn.next_event(), h11.Data):
                break


# --- forwarding (the shared half is in connection.forward) ---------------------------


async def _exchange_on(client: Client, ex: Exchange, conn: UpstreamConn) -> Outcome:
    """Send the request on `conn` and relay the answer.

    Raises Stale when a reused connection fails before any byte of the answer, and the
    ProxyErrors of the relay.
    """
    headers = ex.plan.headers
    if ex.plan.needs_host:
        # An HTTP/1.0 client may omit Host; the upstream leg is HTTP/1.1 and needs one.
        headers = [(b"Host", str(conn.server.address).encode()), *headers]
    # _parsed: h11 skips its per-header regexes. Every header here is one h11 parsed from the
    # client or one the plan made from such values and constants (X-Forwarded-*, Via).
    request = h11.Request(
        method=ex.method, target=ex.plan.located.target, headers=headers, _parsed=True
    )
    try:
        await conn.http.send(request)
    except STREAM_ERRORS as exc:
        if conn.reused:
            raise Stale() from exc
        raise UpstreamUnavailable(f"upstream reset: {exc}", kind="reset") from exc
    if not ex.plan.has_body:
        client.http.h11.next_event()  # EndOfMessage: h11 knows there is no body.
        await conn.http.send(h11.EndOfMessage())
        return await relay_response(client, ex, conn)
    return await _with_body(client, ex, conn)


async def _with_body(client: Client, ex: Exchange, conn: UpstreamConn) -> Outcome:
    """Stream the request body while relaying the response: an upstream may answer early."""
    pump = ex.pump = BodyPump(client, conn, ex.rec, ex.plan.body == "chunked")
    failure: BaseException | None = None
    outcome: Outcome = Done.CLOSE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, nursery.cancel_scope, name="request body")
        try:
            outcome = await relay_response(client, ex, conn)
        except Stale:
            # Body bytes may already be gone: never replay a request that had one.
            failure = UpstreamUnavailable("upstream closed the connection", kind="reset")
        except (ProxyError, ClientGone) as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if pump.error is not None:
        raise pump.error
    if failure is not None:
        raise failure
    if outcome is Done.KEEP_ALIVE and not pump.done:
        return Done.CLOSE
    return outcome
