"""One HTTP/2 stream's exchange with its HTTP/1.1 upstream: the request sent, its body
pumped from the stream's DATA, and the answer relayed to the stream -- or, for an extended
CONNECT the upstream accepts with a verified 101, the `Switched` tunnel over the stream.

Flow control both ways: the client's window is credited only as the upstream takes its
bytes, and the upstream is read only as fast as the client's window lets them out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import h11
import trio

from upgradeproxy.connection.h2_channel import TUNNEL_WINDOW, Fields
from upgradeproxy.connection.h2_edge import StreamEdge
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
    BadRequest,
    BadSwitch,
    ClientGone,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules import http2 as rules
from upgradeproxy.rules import plan as planning
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import STREAM_ERRORS, PeerClosed
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.tunnel.websocket import framed_tunnel
from upgradeproxy.upstream.connections import UpstreamConn


async def exchange_on(edge: StreamEdge, ex: Exchange, conn: UpstreamConn) -> Outcome:
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
    edge: StreamEdge,
    conn: UpstreamConn,
    started: bool,
    pump: _BodyPump | None,
    drained: bool = False,
) -> h11.Event | type[h11.PAUSED]:
    """The next upstream event, with failures mapped as on HTTP/1.1 (`upstream_failure`);
    `drained`: a read without waiting just found nothing (`_ready_event`), wait at once."""
    timeout = edge.rt.config.timeouts.upstream_response
    try:
        while (event := conn.http.h11.next_event()) is h11.NEED_DATA:
            if not drained and conn.http.try_receive():
                continue  # no scope, and no write yet: what is queued may grow
            drained = False
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


def _ready_event(conn: UpstreamConn, started: bool) -> h11.Event | type[h11.PAUSED] | None:
    """The upstream's next event if its bytes are here already; None if it needs a wait."""
    try:
        while (event := conn.http.h11.next_event()) is h11.NEED_DATA:
            if not conn.http.try_receive():
                return None
    except (h11.RemoteProtocolError, PeerClosed) as exc:
        raise upstream_failure(conn, started, exc) from exc
    return event  # type: ignore[return-value]


def _ends(event: h11.Event | type[h11.PAUSED] | None) -> bool:
    """Whether `event` ends the response without trailers: END_STREAM can ride on the frame
    before it (HEADERS or the last DATA) instead of an empty DATA frame of its own."""
    return isinstance(event, h11.EndOfMessage) and not event.headers


async def _relay(
    edge: StreamEdge, ex: Exchange, conn: UpstreamConn, pump: _BodyPump | None
) -> Outcome:
    """Relay the upstream's answer to the stream: the upstream is read only as fast as the
    client's window lets its body out (each chunk is sent before the next is read)."""
    channel, st = edge.conn.channel, edge.st
    idle = edge.rt.config.timeouts.idle
    started = False
    # An event read ahead (what follows HEADERS or DATA, when it is here already).
    pending: h11.Event | type[h11.PAUSED] | None = None
    drained = False
    while True:
        if pending is None:
            event = await _upstream_event(edge, conn, started, pump, drained)
        else:
            event = pending
        if isinstance(event, h11.Data):
            ex.rec.bytes_out += len(event.data)
            pending = _ready_event(conn, started)
            drained = pending is None
            if _ends(pending):
                await channel.send_data(st, event.data, timeout=idle, end=True)
                return Done.CLOSE
            await channel.send_data(st, event.data, timeout=idle, flush=False)
            continue
        pending, drained = None, False
        if isinstance(event, h11.Response):
            started = True
            header_time(edge, ex)
            ex.rec.status = event.status_code
            if ex.plan.offer:
                count_upgrade(edge, ex, "declined")
            st.headers_sent = True
            pending = _ready_event(conn, started)
            drained = pending is None
            end = _ends(pending)
            await channel.send_headers(st, _response_fields(event, ex), end=end, flush=end)
            if end:
                return Done.CLOSE
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
    await channel.send_headers(st, fields, flush=False)
    channel.widen(st, TUNNEL_WINDOW)
    await channel.flush()
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
        frames=framed_tunnel(
            ex.plan.route.websocket, hdr.comma_list(raw, b"upgrade"),
            hdr.get_all(raw, b"sec-websocket-extensions"), rec.route, edge.shared.telemetry,
        ) if ex.plan.route.websocket is not None else None,
    )  # fmt: skip
