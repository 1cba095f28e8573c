"""The short responses the proxy writes itself: one per `ProxyError`, while one can be sent."""

from __future__ import annotations

from typing import Final

import h11
import trio

from upgradeproxy.connection.context import Client
from upgradeproxy.errors import REASONS, NoServerAvailable, ProxyError
from upgradeproxy.rules import plan as planning
from upgradeproxy.rules.forwarding import via_value
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import STREAM_ERRORS

VIA: Final = via_value(b"1.1")
MIGHT_SWITCH: Final = h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
_CLOSE_ON_ERROR: Final = (h11.LocalProtocolError, *STREAM_ERRORS)


async def send_error(
    client: Client, err: ProxyError, method: bytes | None, rec: ExchangeRecord
) -> bool:
    """Write a short error response if the protocol state still allows one; its body bytes
    count in `rec.bytes_out` (what the proxy itself wrote)."""
    conn = client.http.h11
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False
    reason = REASONS.get(err.status, b"Error")
    body = b"" if method == b"HEAD" else b"%d %s\n" % (err.status, reason)
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Via", VIA),
    ]
    if rec.request_id:
        headers.append((planning.REQUEST_ID, rec.request_id.encode("latin-1")))
    if isinstance(err, NoServerAvailable):
        headers.append((b"Retry-After", str(err.retry_after).encode()))
    if err.close or client.shared.draining or conn.their_state not in (h11.DONE, MIGHT_SWITCH):
        # Say so when the connection will close: the request was not read to its end, or the
        # proxy drains.
        headers.append((b"Connection", b"close"))
    try:
        with trio.move_on_after(5):
            await client.http.send(
                h11.Response(status_code=err.status, headers=headers, reason=reason)
            )
            if body:
                await client.http.send(h11.Data(data=body))
                rec.bytes_out += len(body)
            await client.http.send(h11.EndOfMessage())
            return True
    except _CLOSE_ON_ERROR:
        pass
    return False
