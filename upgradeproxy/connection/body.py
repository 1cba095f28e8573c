"""A request body on its way upstream, streamed beside the response relay.

Runs as its own task so an upstream may answer before the body is complete (RFC 9110 §15.5:
an early 413 or 401); stops at the first bad chunk, so nothing past it reaches the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

from upgradeproxy.connection.context import Client
from upgradeproxy.errors import BadRequest, ClientGone, RequestTimeout
from upgradeproxy.rules.headers import bare_lf_chunk_line
from upgradeproxy.telemetry.access import ExchangeRecord
from upgradeproxy.transport.streams import STREAM_ERRORS, PeerClosed
from upgradeproxy.upstream.connections import UpstreamConn


@dataclass(slots=True)
class BodyPump:
    """Copies request body events from client to upstream, stopping at the first bad chunk."""

    client: Client
    conn: UpstreamConn
    rec: ExchangeRecord
    chunked: bool = False
    done: bool = False
    error: Exception | None = None
    at_chunk_line: bool = True  # chunked: the next bytes are a chunk-size line (or trailers)
    finished: trio.Event = field(default_factory=trio.Event)
    # The relay's wait for the response: its `upstream_response` clock starts only once the
    # whole body is upstream (a slow but steady upload is not a slow upstream).
    response_wait: trio.CancelScope | None = None

    async def run(self, scope: trio.CancelScope) -> None:
        try:
            await self._pump(scope)
        finally:
            self.finished.set()
            if self.response_wait is not None:
                timeout = self.client.rt.config.timeouts.upstream_response
                self.response_wait.deadline = trio.current_time() + timeout

    async def _pump(self, scope: trio.CancelScope) -> None:
        try:
            while not self.done:
                await self._forward(await self._next_event())
        except (h11.RemoteProtocolError, ValueError) as exc:
            # Always 400: h11's 431 hint is about heads, not an overlong chunk line.
            self.error = BadRequest(f"bad request body: {exc}")
        except trio.TooSlowError:
            self.error = RequestTimeout("request body stalled")
        except PeerClosed as exc:
            self.error = ClientGone(str(exc))
        else:
            return
        scope.cancel()

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next body event, reading under `timeouts.idle`; ValueError for a bare-LF
        chunk line, which h11 would wait on for a CRLF that never comes."""
        http = self.client.http
        while (event := http.h11.next_event()) is h11.NEED_DATA:
            if (
                self.chunked
                and self.at_chunk_line
                and bare_lf_chunk_line(http.h11.trailing_data[0])
            ):
                raise ValueError("chunk line not ended by CRLF")
            with trio.fail_after(self.client.rt.config.timeouts.idle):
                await http.receive()
        return event  # type: ignore[return-value]

    async def _forward(self, event: h11.Event | type[h11.PAUSED]) -> None:
        if isinstance(event, h11.Data):
            self.at_chunk_line = event.chunk_end
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
