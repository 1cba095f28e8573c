"""HTTP/2 clients for the tests: a blocking client built on the `h2` library (the raw client)
that sends what a test tells it to, hostile frames included, and records every event; and a
WebSocket client (wsproto framing) on one of its extended CONNECT streams (RFC 8441)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

Fields = list[tuple[bytes, bytes]]


class H2Peer:
    """One HTTP/2 connection to the proxy; `events` holds everything received, in order."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
        window: int | None = None,
        preface: bool = True,
    ) -> None:
        raw = socket.create_connection(address, timeout=5)
        self.sock: socket.socket = (
            tls.wrap_socket(raw, server_hostname="localhost") if tls is not None else raw
        )
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.events: list[h2.events.Event] = []
        self.closed = False
        self.auto_ack = True
        self.no_ack: set[int] = set()  # streams whose window the client keeps shut
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        if preface:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        authority: str = "localhost",
        extra: Fields | None = None,
        end: bool = True,
        fields: Fields | None = None,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        if fields is None:
            fields = [
                (b":method", method.encode()),
                (b":scheme", b"http"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                *(extra or []),
            ]
        self.conn.send_headers(sid, fields, end_stream=end)
        self.flush()
        return sid

    def websocket(
        self, path: str = "/", extra: Fields | None = None, protocol: bytes = b"websocket"
    ) -> int:
        """An extended CONNECT (RFC 8441)."""
        return self.request(
            fields=[
                (b":method", b"CONNECT"),
                (b":protocol", protocol),
                (b":scheme", b"http"),
                (b":authority", b"localhost"),
                (b":path", path.encode()),
                (b"sec-websocket-version", b"13"),
                *(extra or []),
            ],
            end=False,
        )

    def send(self, sid: int, data: bytes, *, end: bool = False, timeout: float = 20) -> None:
        """Send DATA as the proxy's windows allow, reading its WINDOW_UPDATEs meanwhile."""
        while data:
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                assert self.until(lambda: self.conn.local_flow_control_window(sid) > 0, timeout), (
                    "the proxy's window stayed shut"
                )
                continue
            n = min(window, self.conn.max_outbound_frame_size, len(data))
            self.conn.send_data(sid, data[:n])
            self.flush()
            data = data[n:]
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def pump(self, timeout: float = 5) -> bool:
        """Read once (up to `timeout`); False when the connection closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True  # nothing yet: still open
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.ConnectionTerminated):
                # h2 closes its state machine on any GOAWAY; a graceful one (RFC 9113 §6.8)
                # lets the streams below its last id finish, so keep reading them.
                self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            if isinstance(event, h2.events.DataReceived) and self.auto_ack:
                n = event.flow_controlled_length
                if event.stream_id in self.no_ack:
                    # The stream's window stays shut; the connection's is credited, as a
                    # browser does for a socket whose page is busy.
                    if n:
                        self.conn.increment_flow_control_window(n)
                else:
                    self.conn.acknowledge_received_data(n, event.stream_id)
        try:
            self.flush()
        except OSError:
            self.closed = True
        return True

    def until(self, predicate: Callable[[], bool], timeout: float = 10) -> bool:
        end = time.monotonic() + timeout
        while not predicate():
            left = end - time.monotonic()
            if left <= 0 or not self.pump(min(left, 5)):
                return predicate()
        return True

    def of(self, sid: int, kind: type[Any] | None = None) -> list[Any]:
        return [
            e for e in self.events
            if getattr(e, "stream_id", None) == sid and (kind is None or isinstance(e, kind))
        ]  # fmt: skip

    def finished(self, sid: int) -> bool:
        return bool(self.of(sid, h2.events.StreamEnded) or self.of(sid, h2.events.StreamReset))

    def response(self, sid: int, timeout: float = 10) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers, body) of a complete response; status 0 when the stream was reset."""
        assert self.until(lambda: self.finished(sid) or self.closed, timeout), "no response"
        heads = self.of(sid, h2.events.ResponseReceived)
        if not heads:
            return 0, {}, b""
        fields = dict(heads[0].headers)
        body = b"".join(e.data for e in self.of(sid, h2.events.DataReceived))
        return int(fields[b":status"]), fields, body

    def head(self, sid: int, timeout: float = 10) -> dict[bytes, bytes]:
        assert self.until(
            lambda: bool(self.of(sid, h2.events.ResponseReceived)) or self.finished(sid), timeout
        )
        heads = self.of(sid, h2.events.ResponseReceived)
        return dict(heads[0].headers) if heads else {}

    def data(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, h2.events.DataReceived))

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None

    def close(self) -> None:
        self.sock.close()


class WsOverH2:
    """A WebSocket client (wsproto framing) on an accepted extended CONNECT stream."""

    def __init__(self, peer: H2Peer, sid: int, extensions: list[Any] | None = None) -> None:
        from wsproto.connection import Connection, ConnectionType

        self.peer, self.sid = peer, sid
        self.ws = Connection(ConnectionType.CLIENT, extensions=extensions or [])
        self._fed = 0  # DATA events of the stream already given to wsproto
        self._parts: list[Any] = []
        self.messages: list[str | bytes] = []

    def send(self, message: str | bytes) -> None:
        from wsproto.events import BytesMessage, TextMessage

        event: Any = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        self.peer.send(self.sid, self.ws.send(event))

    def recv(self, timeout: float = 20) -> str | bytes:
        """The next whole message from the upstream."""
        from wsproto.events import Message

        def ready() -> bool:
            data = self.peer.of(self.sid, h2.events.DataReceived)
            for event in data[self._fed :]:
                self.ws.receive_data(event.data)
            self._fed = len(data)
            for ev in self.ws.events():
                if isinstance(ev, Message):
                    self._parts.append(ev.data)
                    if ev.message_finished:
                        first = self._parts[0]
                        joined = ("" if isinstance(first, str) else b"").join(self._parts)
                        self._parts = []
                        self.messages.append(joined)
            return bool(self.messages)

        assert self.peer.until(ready, timeout), "no message"
        return self.messages.pop(0)
