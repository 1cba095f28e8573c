"""A request body on its way upstream, streamed beside the response relay.

Runs as its own task so an upstream may answer before the body is complete (RFC 9110 §15.5:
an early 413 or 401); stops at the first bad chunk, so nothing past it reaches the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

from upgradeproxy.context import Client
from upgradeproxy.errors import BadRequest, ClientGone, RequestTimeout
from upgradeproxy.streams import STREAM_ERRORS, PeerClosed
from upgradeproxy.telemetry import ExchangeRecord
from upgradeproxy.upstream import UpstreamConn


@dataclass(slots=True)
class BodyPump:
    """Copies request body events from client to upstream, stopping at the first bad chunk."""

    client: Client
    conn: UpstreamConn
    rec: ExchangeRecord
    done: bool = False
    error: Exception | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    async def run(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump(scope)
        finally:
            self.finished.set()

    async def _pump(self, scope: trio.CancelScope) -> None:
        read_timeout = self.client.rt.config.timeouts.idle
        try:
            while not self.done:
                with trio.fail_after(read_timeout):
                    event = await self.client.http.next_event()
                await self._forward(event)
        except h11.RemoteProtocolError as exc:
            self.error = BadRequest(f"bad request body: {exc}", exc.error_status_hint)
        except trio.TooSlowError:
            self.error = RequestTimeout("request body stalled")
        except PeerClosed as exc:
            self.error = ClientGone(str(exc))
        else:
            return
        scope.cancel()

    async def _forward(self, event: h11.Event | type[h11.PAUSED]) -> None:
        if isinstance(event, h11.Data):
            self.rec.bytes_in += len(event.data)
            out: h11.Event = h11.Data(data=event.data)
        elif isinstance(event, h11.EndOfMessage):
            out = h11.EndOfMessage()
            self.done = True
        else:
            raise PeerClosed("client closed in the middle of the request body")
        try:
            await self.conn.http.send(out)
        except (*STREAM_ERRORS, h11.LocalProtocolError):
            # The upstream stopped reading; the response side reports what happened.
            self.done = False
            await trio.sleep_forever()
