"""One HTTP/2 stream's request (contract rule 17): checked and turned into the same `Head`
the HTTP/1.1 path plans, forwarded through `connection.forward` to an HTTP/1.1 upstream
(`h2_relay`), and answered on the stream.

A stream's failure is its own: a `ProxyError` becomes the stream's response (or a reset
once a response has started); the connection and its other streams go on.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Final

import h2.errors
import trio

from upgradeproxy.connection.forward import forward, plan_request
from upgradeproxy.connection.h2_channel import Fields, StreamState
from upgradeproxy.connection.h2_edge import H2Client, StreamEdge
from upgradeproxy.connection.h2_relay import exchange_on
from upgradeproxy.connection.outcome import Done, Outcome
from upgradeproxy.connection.reply import VIA
from upgradeproxy.connection.response import Exchange
from upgradeproxy.errors import REASONS, ClientGone, NoServerAvailable, ProxyError
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules import http2 as rules
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.tunnel.session import Switched

log = logging.getLogger("upgradeproxy")

_PROTOCOL_REFUSED: Final = 400  # a :protocol the route's `upgrade` list does not allow


def _new_key() -> bytes:
    return hdr.websocket_key(os.urandom(16))


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


async def _request(edge: StreamEdge, fields: Fields, end: bool, rec: ExchangeRecord) -> Outcome:
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
        return await forward(edge, ex, exchange_on)
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
