"""An HTTP/2 stream as a trio stream, for the tunnel of an extended CONNECT (RFC 8441).

The tunnel relay (`tunnel.relay`, the same one HTTP/1.1 tunnels use) reads one side and
writes the other; this adapter gives it the flow control rule 17 asks for:
- bytes from the client are credited back to its window only when the relay asks for more,
  that is once the upstream took the previous ones;
- a write to the client returns only once the stream's window is open again, so the relay
  does not read the upstream while the client's window is shut;
- END_STREAM is EOF and `send_eof` sends END_STREAM; a reset is a broken stream, and
  closing a stream that did not end both ways resets it.
"""

from __future__ import annotations

from typing import Final

import h2.errors
import trio

from upgradeproxy.connection.h2_channel import Channel, StreamState
from upgradeproxy.errors import ClientGone

_MAX_READ: Final = 65536  # what one read hands on when the caller sets no limit


class StreamIO(trio.abc.HalfCloseableStream):
    """One stream of an HTTP/2 connection, as the tunnel's client side."""

    def __init__(self, channel: Channel, st: StreamState) -> None:
        self.channel = channel
        self.st = st
        self._owed = 0  # bytes handed to the relay, credited on its next read

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        channel, st = self.channel, self.st
        if self._owed:
            channel.ack(st, self._owed)
            self._owed = 0
            await self._flush()
        data = await channel.receive(st)
        if data is None:
            return b""
        limit = _MAX_READ if max_bytes is None else max_bytes
        inbox = st.inbox
        if len(data) > limit:
            inbox.appendleft(data[limit:])
            data = data[:limit]
        elif inbox and len(data) + len(inbox[0]) <= limit:
            # The DATA frames already here leave in one write upstream, not one each.
            parts, size = [data], len(data)
            while inbox and size + len(inbox[0]) <= limit:
                parts.append(inbox.popleft())
                size += len(parts[-1])
            data = b"".join(parts)
        self._owed = len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.channel.send_data(self.st, bytes(data), flush=False)
            await self.channel.flush(now=True)  # not after the other streams' next writes
            await self.channel.wait_window(self.st)
        except ClientGone as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def wait_send_all_might_not_block(self) -> None:
        try:
            await self.channel.wait_window(self.st)
        except ClientGone as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def send_eof(self) -> None:
        try:
            await self.channel.end_stream(self.st)
        except ClientGone as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def aclose(self) -> None:
        st = self.st
        self.channel.ack(st, self._owed)  # the connection's window must not shrink for good
        self._owed = 0
        if not (st.ended and st.closed_out):
            self.channel.reset(st, h2.errors.ErrorCodes.CANCEL)
        await self._flush()
        await trio.lowlevel.checkpoint()

    async def _flush(self) -> None:
        try:
            await self.channel.flush(now=True)
        except ClientGone as exc:
            raise trio.BrokenResourceError(str(exc)) from None
