"""Reading a request head from the client, under `request_header` and `idle`.

h11 parses; this adds what h11 lets through (obs-fold, a whole oversized head arriving in
one read) and the two deadlines: `idle` between keep-alive requests, `request_header` from
the first byte of a head to its end.
"""

from __future__ import annotations

import re
from typing import Final

import h11
import trio

from upgradeproxy.connection.context import Client
from upgradeproxy.errors import BadRequest, RequestTimeout
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules import plan as planning
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import CLIENT_IO

_HEAD_END: Final = re.compile(rb"\n\r?\n")


async def read_request(client: Client, rec: ExchangeRecord) -> h11.Request | None:
    """The next request head, or None when the client closed or idled out between requests.

    Raises BadRequest (400/431), RequestTimeout and ClientGone.
    """
    conn = client.http.h11
    timeouts = client.rt.config.timeouts
    started = client.first or bool(conn.trailing_data[0])
    deadline = trio.current_time() + (timeouts.request_header if started else timeouts.idle)
    head = _check_raw_head(conn, client.rt.config.limits.max_request_header_bytes)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # h11 took the head out of its buffer: the log's method and path come from ours.
            rec.method, rec.path = planning.request_line(head)
            raise BadRequest(str(exc), status=exc.error_status_hint) from None
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed
        data = await _receive_until(client, deadline, started)
        if data is None:
            return None
        if not started and data:
            started = True
            deadline = trio.current_time() + timeouts.request_header
        conn.receive_data(data)
        if data:
            head = _check_raw_head(conn, client.rt.config.limits.max_request_header_bytes)


async def _receive_until(client: Client, deadline: float, started: bool) -> bytes | None:
    """One read before `deadline`; None if an idle wait ran out (close quietly).

    A wait before any byte of the request (a keep-alive connection between requests, or a new
    one before its first) is idle: a drain may end it early (its scope is in
    `shared.keepalive_waits`). Raises RequestTimeout when a started head runs out of time,
    ClientGone on a broken stream.
    """
    with CLIENT_IO:
        data = client.http.try_receive_some()  # no scope when the bytes are already there
    if data is not None:
        return data
    shared = client.shared
    # Between requests `started` says it; a first request has its own deadline from the start.
    idle = not started or (client.first and not client.http.h11.trailing_data[0])
    with trio.CancelScope(deadline=deadline) as scope:
        if idle:
            shared.keepalive_waits.add(scope)
            if shared.draining:
                scope.deadline = shared.idle_deadline(deadline)
        try:
            with CLIENT_IO:
                return await client.http.receive_some()
        finally:
            shared.keepalive_waits.discard(scope)
    if idle:
        # Cancelling a wait does not look at the socket: bytes that came in the meantime (a
        # request sent as the grace ran out) are read and answered, not reset by the close.
        with CLIENT_IO:
            data = await client.http.last_look(client.rt.config.timeouts.request_header)
        if data is not None:
            return data
        if shared.draining:
            return None  # no request on its way, not even a first one: close quietly
    if started:
        raise RequestTimeout("request head not received in time")
    return None


def _check_raw_head(conn: h11.Connection, limit: int) -> bytes:
    """Reject what h11 would accept before it parses the head: obs-fold, an oversized head.

    h11 enforces its size limit only on an incomplete head; one that arrives whole in a
    single read would slip through, so the complete head is measured here too. Returns the
    complete head (b"" if there is none yet).
    """
    if conn.their_state is not h11.IDLE:
        return b""
    buf = conn.trailing_data[0]
    found = _HEAD_END.search(buf)  # where h11 ends a head too, bare LFs included
    if found is None:
        return b""
    end = found.start()
    if end > limit:
        raise BadRequest("request head too large", status=431)
    if problem := hdr.raw_head_problem(buf[:end]):
        raise BadRequest(problem)
    return buf[: found.end()]
