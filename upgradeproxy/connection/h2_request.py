"""One HTTP/2 stream's request (contract rule 17): checked and turned into the same `Head`
the HTTP/1.1 path plans, forwarded through `connection.forward` to an HTTP/1.1 upstream,
its answer relayed as the stream's response, or, for an extended CONNECT the upstream
accepts with a verified 101, a tunnel over the stream.

A stream's failure is its own: a `ProxyError` becomes the stream's response (or a reset
once a response has started); the connection and its other streams go on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

import h2.errors
import h11
import trio

from upgradeproxy.connection.context import Held, Peer, Runtime, Shared
from upgradeproxy.connection.forward import forward, plan_request
from upgradeproxy.connection.h2_channel import Channel, Fields, StreamState
from upgradeproxy.connection.h2_stream import StreamIO
from upgradeproxy.connection.outcome import Done, Outcome
from upgradeproxy.connection.reply import VIA
from upgradeproxy.connection.response import (
    Exchange,
    Stale,
    count_upgrade,
    header_time,
    upstream_failure,
)
from upgradeproxy.errors import (
    REASONS,
    BadRequest,
    BadSwitch,
    ClientGone,
    NoServerAvailable,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules import http2 as rules
from upgradeproxy.rules import plan as planning
from upgradeproxy.telemetry.metrics import ExchangeRecord
from upgradeproxy.transport.streams import STREAM_ERRORS, PeerClosed
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.upstream.connections import UpstreamConn

if TYPE_CHECKING:
    from upgradeproxy.rules.plan import Origin

log = logging.getLogger("upgradeproxy")

_PROTOCOL_REFUSED: Final = 400  # a :protocol the route's `upgrade` list does not allow


@dataclass(slots=True, eq=False)
class H2Client:
    """An HTTP/2 client connection's context (the `Edge` the shared request path reads)."""

    origin: Origin
    rt: Runtime
    shared: Shared
    peer: Peer | None
    channel: Channel
    first: bool = True
    over_limit: str | None = None
    held: Held = field(default_factory=Held)
    refused: bool = False  # a 429 went out: the connection closes (rule 14)

    @property
    def peer_ip(self) -> str:
        return self.origin.ip


@dataclass(slots=True, eq=False)
class StreamEdge:
    """One stream of an `H2Client`, as the shared request path's `Edge`."""

    conn: H2Client
    st: StreamState

    @property
    def origin(self) -> Origin:
        return self.conn.origin

    @property
    def rt(self) -> Runtime:
        return self.conn.rt

    @property
    def shared(self) -> Shared:
        return self.conn.shared

    @property
    def first(self) -> bool:
        return self.conn.first

    @property
    def peer(self) -> Peer | None:
        return self.conn.peer

    @property
    def over_limit(self) -> str | None:
        return self.conn.over_limit

    @property
    def held(self) -> Held:
        return self.conn.held

    @property
    def peer_ip(self) -> str:
        return self.conn.origin.ip


def _new_key() -> bytes:
    return rules.websocket_key(os.urandom(16))


async def serve_stream(conn: H2Client, st: StreamState, fields: Fields, end: bool) -> None:
    """Serve one stream's request to its end (tunnel included); never raises but Cancelled."""
    rec = ExchangeRecord(
        client=conn.origin.ip, client_cert=conn.origin.client_cert or "", http_version="2"
    )
    edge = StreamEdge(conn, st)
    try:
        with st.scope:
            outcome = await _request(edge, fields, end, rec)
            if isinstance(outcome, Switched):
                await outcome.run()
    finally:
        if st.client_reset and not rec.logged:
            rec.error = rec.error or "client reset the stream"
        if (rec.method or rec.status) and not rec.logged:
            rec.duration = time.monotonic() - rec.started
            conn.shared.telemetry.exchange_done(rec)


async def _request(
    edge: StreamEdge, fields: Fields, end: bool, rec: ExchangeRecord
) -> Outcome:
    conn, st = edge.conn, edge.st
    request = None
    try:
        request = rules.request_head(fields, end, _new_key)
        rec.started = time.monotonic()
        if request.protocol is not None:
            rec.protocol = request.protocol.decode("latin-1")
        plan = plan_request(edge, request.head, rec)
        conn.first = False
        if request.protocol is not None:
            rec.method = "CONNECT"
            if not plan.offer:
                raise ProxyError(
                    f"protocol {rec.protocol!r} not allowed on route {rec.route}",
                    status=_PROTOCOL_REFUSED,
                    kind="bad_request",
                )
        ex = Exchange(request.head.method, plan, rec)
        return await forward(edge, ex, _exchange_on)
    except ProxyError as err:
        if request is not None and request.protocol is not None:
            rec.method = "CONNECT"  # the plan logged the GET it would have sent
        await _refuse(edge, err, rec, fields)
    except ClientGone as exc:
        rec.error = rec.error or str(exc)
        conn.channel.reset(st)
    return Done.CLOSE


async def _refuse(edge: StreamEdge, err: ProxyError, rec: ExchangeRecord, fields: Fields) -> None:
    """Answer `err` on the stream (or reset it once a response has begun), as rule 7 says."""
    conn, st, channel = edge.conn, edge.st, edge.conn.channel
    rec.status = err.status
    rec.error = err.detail
    log.info("%s %s: %s", conn.origin.ip, err.status, err.detail)
    shared = conn.shared
    if err.upstream_side and not err.counted:
        shared.telemetry.upstream_error(rec.upstream, err.kind)
    shared.telemetry.refused(err.kind, rec.route)
    if not rec.method:
        method = dict(f for f in fields if f[0] == b":method").get(b":method", b"")
        path = dict(f for f in fields if f[0] == b":path").get(b":path", b"")
        rec.method = method.decode("latin-1")
        rec.path = path.split(b"?", 1)[0].decode("latin-1")
    if conn.rt.config.request_id and not rec.request_id:
        rec.request_id = os.urandom(16).hex()
    if err.status == 429:
        conn.refused = True
    if st.headers_sent:
        conn.channel.reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
        return
    reason = REASONS.get(err.status, b"Error")
    body = b"" if rec.method == "HEAD" else b"%d %s\n" % (err.status, reason)
    headers = [
        (b":status", b"%d" % err.status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"via", VIA),
    ]
    if rec.request_id:
        headers.append((b"x-request-id", rec.request_id.encode("latin-1")))
    if isinstance(err, NoServerAvailable):
        headers.append((b"retry-after", str(err.retry_after).encode()))
    try:
        with trio.move_on_after(conn.rt.config.timeouts.idle):
            st.headers_sent = True
            await channel.send_headers(st, headers, end=not body)
            if body:
                await channel.send_data(st, body, end=True)
                rec.bytes_out += len(body)
        if not st.ended:
            # RFC 9113 §8.1: a complete response before the request's end; stop its body.
            channel.reset(st, h2.errors.ErrorCodes.NO_ERROR)
            await channel.flush()
    except ClientGone:
        channel.reset(st)


# --- towards the upstream ------------------------------------------------------------


async def _exchange_on(edge: StreamEdge, ex: Exchange, conn: UpstreamConn) -> Outcome:
    """Send the stream's request on `conn` (HTTP/1.1) and relay the answer to the stream."""
    headers = ex.plan.headers
    if ex.plan.needs_host:
        headers = [(b"Host", str(conn.server.address).encode()), *headers]
    try:
        # Not `_parsed`: h11 checks every name and value that came from HPACK.
        request = h11.Request(method=ex.method, target=ex.plan.located.target, headers=headers)
    except h11.LocalProtocolError as exc:
        raise BadRequest(f"invalid request field: {exc}") from None
    try:
        await conn.http.send(request)
    except STREAM_ERRORS as exc:
        if conn.reused:
            raise Stale() from exc
        raise UpstreamUnavailable(f"upstream reset: {exc}", kind="reset") from exc
    if not ex.plan.has_body:
        await conn.http.send(h11.EndOfMessage())
        return await _relay(edge, ex, conn, None)
    pump = _BodyPump(edge, conn, ex.rec, ex.plan.body == "chunked")
    failure: BaseException | None = None
    outcome: Outcome = Done.CLOSE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, nursery.cancel_scope, name=f"h2 stream {edge.st.id} body")
        try:
            outcome = await _relay(edge, ex, conn, pump)
        except Stale:
            failure = UpstreamUnavailable("upstream closed the connection", kind="reset")
        except (ProxyError, ClientGone) as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if pump.error is not None:
        raise pump.error
    if failure is not None:
        raise failure
    return outcome


@dataclass(slots=True)
class _BodyPump:
    """The stream's DATA to the upstream; the client's window is credited as each chunk
    leaves, so a slow upstream slows the client (back-pressure through flow control)."""

    edge: StreamEdge
    conn: UpstreamConn
    rec: ExchangeRecord
    chunked: bool
    done: bool = False
    error: Exception | None = None
    finished: trio.Event = field(default_factory=trio.Event)
    response_wait: trio.CancelScope | None = None

    async def run(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump(scope)
        finally:
            self.finished.set()
            if self.response_wait is not None:
                timeout = self.edge.rt.config.timeouts.upstream_response
                self.response_wait.deadline = trio.current_time() + timeout

    async def _pump(self, scope: trio.CancelScope) -> None:
        channel, st = self.edge.conn.channel, self.edge.st
        idle = self.edge.rt.config.timeouts.idle
        held = 0  # read from the stream, not yet credited back
        try:
            while True:
                with trio.fail_after(idle):
                    data = await channel.receive(st)
                if data is None:
                    break
                held = len(data)
                self.rec.bytes_in += held
                await self._send(h11.Data(data=data))
                channel.ack(st, held)
                held = 0
                await channel.flush()
            trailers = st.trailers if self.chunked else []
            await self._send(h11.EndOfMessage(headers=trailers))
            self.done = True
            return
        except trio.TooSlowError:
            self.error = RequestTimeout("request body stalled")
        except h11.LocalProtocolError as exc:
            # A body longer or shorter than its Content-Length: malformed (RFC 9113 §8.1.1).
            self.error = BadRequest(f"bad request body: {exc}")
        except (trio.BrokenResourceError, ClientGone) as exc:
            self.error = ClientGone(str(exc))
        finally:
            channel.ack(st, held)  # cancelled mid-send: the connection's window gets it back
        scope.cancel()

    async def _send(self, event: h11.Event) -> None:
        try:
            await self.conn.http.send(event)
        except STREAM_ERRORS:
            # The upstream stopped reading; the response side reports what happened.
            await trio.sleep_forever()


async def _upstream_event(
    edge: StreamEdge, conn: UpstreamConn, started: bool, pump: _BodyPump | None
) -> h11.Event | type[h11.PAUSED]:
    """The next upstream event, with failures mapped as on HTTP/1.1 (`upstream_failure`)."""
    timeout = edge.rt.config.timeouts.upstream_response
    try:
        while (event := conn.http.h11.next_event()) is h11.NEED_DATA:
            if conn.http.try_receive():
                continue  # no scope, and no write yet: what is queued may grow
            # Nothing more now: what is queued for the client leaves in one write.
            await edge.conn.channel.flush()
            with trio.CancelScope() as scope:
                if pump is not None and not pump.finished.is_set():
                    pump.response_wait = scope  # the pump starts the clock when it is done
                else:
                    scope.deadline = trio.current_time() + timeout
                await conn.http.receive()
            if pump is not None:
                pump.response_wait = None
            if scope.cancelled_caught:
                raise UpstreamTimeout(f"upstream did not respond within {timeout:g}s")
    except (h11.RemoteProtocolError, PeerClosed) as exc:
        raise upstream_failure(conn, started, exc) from exc
    return event  # type: ignore[return-value]


async def _relay(
    edge: StreamEdge, ex: Exchange, conn: UpstreamConn, pump: _BodyPump | None
) -> Outcome:
    """Relay the upstream's answer to the stream: the upstream is read only as fast as the
    client's window lets its body out (each chunk is sent before the next is read)."""
    channel, st = edge.conn.channel, edge.st
    idle = edge.rt.config.timeouts.idle
    started = False
    while True:
        event = await _upstream_event(edge, conn, started, pump)
        if isinstance(event, h11.Data):
            ex.rec.bytes_out += len(event.data)
            await channel.send_data(st, event.data, timeout=idle, flush=False)
        elif isinstance(event, h11.Response):
            started = True
            header_time(edge, ex)
            ex.rec.status = event.status_code
            if ex.plan.offer:
                count_upgrade(edge, ex, "declined")
            st.headers_sent = True
            await channel.send_headers(st, _response_fields(event, ex), flush=False)
        elif isinstance(event, h11.EndOfMessage):
            trailers = rules.response_fields(list(event.headers.raw_items()))
            await channel.end_stream(st, trailers)
            return Done.CLOSE
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return await _switch(edge, ex, conn, event)
            raw = hdr.response_headers(
                list(event.headers.raw_items()), VIA, status=event.status_code
            )
            fields = [(b":status", b"%d" % event.status_code), *rules.response_fields(raw)]
            await channel.send_headers(st, fields)
        else:
            raise UpstreamUnavailable("upstream closed mid-response", kind="reset")


def _response_fields(event: h11.Response, ex: Exchange) -> Fields:
    headers = hdr.response_headers(list(event.headers.raw_items()), VIA, status=event.status_code)
    headers = planning.with_request_id(headers, ex.plan.request_id)
    headers.extend(ex.extra)
    return [(b":status", b"%d" % event.status_code), *rules.response_fields(headers)]


async def _switch(
    edge: StreamEdge, ex: Exchange, conn: UpstreamConn, event: h11.InformationalResponse
) -> Switched:
    """Check the upstream's 101 against what was sent (rule 2) and answer the extended
    CONNECT with `200`; the returned `Switched` relays the stream and the upstream."""
    raw = list(event.headers.raw_items())
    header_time(edge, ex)
    problem = hdr.switch_problem(list(ex.plan.offer), raw, ex.plan.ws_key)
    if problem is not None:
        count_upgrade(edge, ex, "rejected")
        raise BadSwitch(problem)
    fields = [(b":status", b"200"), *rules.tunnel_response_headers(raw), (b"via", VIA)]
    if ex.plan.request_id is not None:
        fields.append((b"x-request-id", ex.plan.request_id))
    fields.extend(rules.response_fields(ex.extra))
    channel, st = edge.conn.channel, edge.st
    st.headers_sent = True
    st.tunnel = True
    await channel.send_headers(st, fields)
    rec = ex.rec
    rec.status = 200
    count_upgrade(edge, ex, "switched")
    rec.duration = time.monotonic() - rec.started
    edge.shared.telemetry.exchange_done(rec)
    rec.logged = True
    tunnel_rec = replace(
        rec, kind="tunnel", logged=False, started=time.monotonic(), duration=0.0,
        bytes_in=0, bytes_out=0,
    )  # fmt: skip
    config = edge.rt.config
    return Switched(
        client=StreamIO(channel, st),
        upstream=conn.stream,
        client_rest=b"",
        upstream_rest=conn.http.h11.trailing_data[0],
        rec=tunnel_rec,
        idle=config.timeouts.tunnel_idle,
        telemetry=edge.shared.telemetry,
        lifetime=config.timeouts.tunnel_max_lifetime,
        tunnels=edge.shared.tunnels,
    )
