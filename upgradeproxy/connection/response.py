"""The upstream's answer, relayed to the client: a response (head, body, end), or a valid
101 and what the tunnel needs from the exchange.

Whatever is queued for the client is written only when the upstream has nothing more
buffered, so a response head and a small body leave in one write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from sys import intern
from typing import Final, TypeVar

import h11
import trio

from upgradeproxy.connection.body import BodyPump
from upgradeproxy.connection.context import Client, Edge
from upgradeproxy.connection.outcome import Done, Outcome
from upgradeproxy.connection.reply import MIGHT_SWITCH, VIA
from upgradeproxy.errors import BadSwitch, ClientGone, UpstreamTimeout, UpstreamUnavailable
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules import plan as planning
from upgradeproxy.rules.plan import Plan
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import CLIENT_IO, PeerClosed
from upgradeproxy.tunnel.session import Switched
from upgradeproxy.tunnel.websocket import framed_tunnel
from upgradeproxy.upstream.connections import UpstreamConn

_PUMP_GRACE: Final = 0.05
_Head = TypeVar("_Head", h11.Response, h11.InformationalResponse)


class Stale(Exception):
    """A reused keep-alive connection died before answering: safe to retry on a fresh one."""


@dataclass(slots=True)
class Exchange:
    """One request in flight: its plan, its access record and its body pump."""

    method: bytes
    plan: Plan
    rec: ExchangeRecord
    pump: BodyPump | None = None  # set while a request body is being streamed
    upstream_started: float = 0.0  # monotonic: this attempt's connect (or pool pick) began
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)  # on the response head


def client_reusable(client: Client) -> bool:
    """Whether the client connection finished its exchange cleanly and may carry another."""
    conn = client.http.h11
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _upstream_event(
    client: Client, conn: UpstreamConn, started: bool, pump: BodyPump | None
) -> h11.Event | type[h11.PAUSED]:
    """The next upstream event, with failures mapped to ProxyErrors.

    Whatever is queued for the client is written only when the upstream has nothing more
    buffered, so a response head and a small body leave in one write. Raises Stale for a
    reused connection that closed before answering, UpstreamUnavailable, UpstreamTimeout and
    ClientGone (while flushing).
    """
    timeout = client.rt.config.timeouts.upstream_response
    try:
        while (event := conn.http.h11.next_event()) is h11.NEED_DATA:
            await _flush(client)
            if conn.http.try_receive():
                continue  # no scope when the answer is already there
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


def upstream_failure(conn: UpstreamConn, started: bool, exc: Exception) -> Exception:
    """What an upstream that failed to answer means: Stale (retry a reused connection) or
    UpstreamUnavailable (a close, or a response h11 could not parse)."""
    unread, closed = conn.http.h11.trailing_data
    if conn.reused and not started and not unread:
        return Stale()
    if isinstance(exc, PeerClosed) or (closed and not unread):
        # h11 reports an EOF where a response was due as a protocol error; it is a close.
        what = "closed the connection" if not started else "closed mid-response"
        return UpstreamUnavailable(f"upstream {what}", kind="reset")
    return UpstreamUnavailable(f"upstream sent a bad response: {exc}", kind="protocol")


async def _flush(client: Client) -> None:
    """Write what is queued for the client; one that stops reading for `timeouts.idle` goes."""
    with CLIENT_IO:
        if client.http.try_flush():
            return  # all of it left at once: no scope needed
    deadline = trio.current_time() + client.rt.config.timeouts.idle
    with trio.CancelScope(deadline=deadline) as scope, CLIENT_IO:
        await client.http.flush()
    if scope.cancelled_caught:
        raise ClientGone("client stopped reading")


async def _to_client(client: Client, event: h11.Event) -> None:
    """Write `event` (after anything queued) to the client now."""
    client.http.queue(event)
    await _flush(client)


async def relay_response(client: Client, ex: Exchange, conn: UpstreamConn) -> Outcome:
    """Relay the upstream's answer, or hand over to a tunnel on a valid 101."""
    started = False
    out = client.http
    while True:
        event = await _upstream_event(client, conn, started, ex.pump)
        if isinstance(event, h11.Data):
            ex.rec.bytes_out += len(event.data)
            out.queue(h11.Data(data=event.data))
        elif isinstance(event, h11.Response):
            started = True
            header_time(client, ex)
            ex.rec.status = event.status_code
            if ex.plan.offer:
                count_upgrade(client, ex, "declined")
            close = client.shared.draining or not await _body_sent(ex)
            out.queue(
                _relayed_head(
                    h11.Response, event, close=close, rid=ex.plan.request_id, extra=ex.extra
                )
            )
        elif isinstance(event, h11.EndOfMessage):
            await _to_client(client, h11.EndOfMessage())
            return Done.KEEP_ALIVE if client_reusable(client) else Done.CLOSE
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return await _switch(client, ex, conn, event)
            if out.h11.their_http_version == b"1.1":
                out.queue(_relayed_head(h11.InformationalResponse, event, close=False, rid=None))
        else:
            raise UpstreamUnavailable("upstream closed mid-response", kind="reset")


def _relayed_head(
    cls: type[_Head],
    event: h11.Response | h11.InformationalResponse,
    *,
    close: bool,
    rid: bytes | None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> _Head:
    """The upstream's response head as the client gets it: hop-by-hop gone, Via (and `extra`,
    a sticky cookie) added."""
    headers = hdr.response_headers(list(event.headers.raw_items()), VIA, status=event.status_code)
    headers = planning.with_request_id(headers, rid)
    headers.extend(extra or ())
    if close:
        headers.append((b"Connection", b"close"))
    # _parsed: the upstream's headers, as h11 parsed them, plus constants (see _exchange_on).
    return cls(status_code=event.status_code, headers=headers, reason=event.reason, _parsed=True)


async def _body_sent(ex: Exchange) -> bool:
    """Whether the request body (if any) is all upstream, so the client may keep alive.

    An upstream that answers once it has the body can overtake our pump's last step, so the
    pump gets a moment; one that answers early (a 413 mid-upload) means we close.
    """
    pump = ex.pump
    if pump is None or pump.finished.is_set():
        return pump is None or pump.done
    with trio.move_on_after(_PUMP_GRACE):
        await pump.finished.wait()
    return pump.done


def header_time(client: Edge, ex: Exchange) -> None:
    """Note the upstream's time to response head (nginx's $upstream_header_time)."""
    if ex.rec.upstream_header is None:
        ex.rec.upstream_header = time.monotonic() - ex.upstream_started
        client.shared.telemetry.upstream_header(ex.plan.upstream.name, ex.rec.upstream_header)


def count_upgrade(client: Edge, ex: Exchange, result: str) -> None:
    protocol = hdr.protocol_name(ex.plan.offer[0]).decode("latin-1")
    client.shared.telemetry.upgrade(ex.rec.route, protocol, result)


async def _switch(
    client: Client, ex: Exchange, conn: UpstreamConn, event: h11.InformationalResponse
) -> Switched:
    """Check a 101 and relay it; the returned `Switched` carries what the tunnel needs.

    Raises BadSwitch (502) for a 101 that does not answer the offer or came too early.
    """
    raw = list(event.headers.raw_items())
    header_time(client, ex)
    problem = hdr.switch_problem(list(ex.plan.offer), raw, ex.plan.ws_key)
    if problem is None and ex.pump is not None:
        # The upstream may have read the whole body before our pump task read the client's
        # end of it from h11: let the pump finish before judging the request incomplete.
        with trio.move_on_after(client.rt.config.timeouts.upstream_response):
            await ex.pump.finished.wait()
    if problem is None and client.http.h11.their_state is not MIGHT_SWITCH:
        problem = "101 before the request body was complete"
    if problem is not None:
        if ex.plan.offer:
            count_upgrade(client, ex, "rejected")
        raise BadSwitch(problem)
    chosen = hdr.comma_list(raw, b"upgrade")
    headers = planning.with_request_id(
        hdr.response_headers(raw, VIA, switched_to=chosen, status=101) + ex.extra,
        ex.plan.request_id,
    )
    await _to_client(
        client,
        h11.InformationalResponse(
            status_code=101, headers=headers, reason=event.reason, _parsed=True
        ),
    )
    rec = ex.rec
    rec.status = 101
    rec.protocol = b", ".join(chosen).decode("latin-1")
    count_upgrade(client, ex, "switched")
    rec.duration = time.monotonic() - rec.started
    client.shared.telemetry.exchange_done(rec)
    rec.logged = True
    # Interned: thousands of open tunnels share a few hosts, routes, servers and agents, so
    # their records keep one copy of each (the request's own copies go with the request).
    tunnel_rec = replace(
        rec, kind="tunnel", logged=False, started=time.monotonic(), duration=0.0,
        bytes_in=0, bytes_out=0, client=intern(rec.client), method=intern(rec.method),
        host=intern(rec.host), path=intern(rec.path), route=intern(rec.route),
        upstream=intern(rec.upstream), server=intern(rec.server),
        protocol=intern(rec.protocol), user_agent=intern(rec.user_agent),
    )  # fmt: skip
    return Switched(
        client=client.http.stream,
        upstream=conn.stream,
        client_rest=client.http.h11.trailing_data[0],
        upstream_rest=conn.http.h11.trailing_data[0],
        rec=tunnel_rec,
        idle=client.rt.config.timeouts.tunnel_idle,
        telemetry=client.shared.telemetry,
        lifetime=client.rt.config.timeouts.tunnel_max_lifetime,
        tunnels=client.shared.tunnels,
        parking=client.shared.parking,
        frames=framed_tunnel(
            ex.plan.route.websocket, chosen, hdr.get_all(raw, b"sec-websocket-extensions"),
            rec.route, client.shared.telemetry,
        ) if ex.plan.route.websocket is not None else None,
    )  # fmt: skip
