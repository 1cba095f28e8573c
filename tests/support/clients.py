"""The client side over real loopback sockets: blocking sockets, one-shot requests, tunnels.

Every read is bounded by the socket's timeout (WAIT unless a caller sets another).
"""

from __future__ import annotations

import base64
import os
import select
import socket
import ssl
import struct
import time

from tests.support.waiting import WAIT
from tests.support.wire import WS_HEADERS, head_fields, header, status_of, ws_accept

LOOPBACK = "127.0.0.1"

Address = tuple[str, int]


def address_of(target: int | Address) -> Address:
    """A port on loopback, or an address as it is."""
    return (LOOPBACK, target) if isinstance(target, int) else target


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    """A port nothing listens on right now (bind 0, read it back, close)."""
    host = LOOPBACK if family == socket.AF_INET else "::1"
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def refused(port: int, host: str = LOOPBACK) -> bool:
    """Whether a connection to `port` is refused now (nothing listens).

    A connection that lands on a listener as it closes is reset by the kernel rather than
    refused: that counts as "not yet", for a caller polling until it is refused.
    """
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def accepts(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts a connection on `port` now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def raw_client(address: int | Address, timeout: float = WAIT) -> socket.socket:
    return socket.create_connection(address_of(address), timeout=timeout)


def rst(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- reading ----------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int, buf: bytearray | bytes | None = None) -> bytes:
    """Exactly `n` bytes, taking first from `buf` (bytes read earlier past a head)."""
    pending = buf if isinstance(buf, bytearray) else bytearray(buf or b"")
    while len(pending) < n:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"closed after {len(pending)} of {n} bytes: {bytes(pending)[:200]!r}")
        pending += data
    out = bytes(pending[:n])
    del pending[:n]
    return out


def read_to_eof(sock: socket.socket, timeout: float = WAIT) -> tuple[bytes, bool]:
    """(bytes, closed): everything until EOF/RST, or what came before `timeout` passed."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out), True
        except TimeoutError:
            return bytes(out), False
        if not data:
            return bytes(out), True
        out += data


def read_until_close(sock: socket.socket, buf: bytes = b"", timeout: float = WAIT) -> bytes:
    """`buf` and everything after it until the peer closes (FIN or RST)."""
    data, closed = read_to_eof(sock, timeout)
    assert closed, f"still open after {timeout} s; got {data[:200]!r}"
    return bytes(buf) + data


def readable(sock: socket.socket) -> bool:
    """Bytes or the peer's FIN (or a reset) are waiting on `sock` now (a look, no wait)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, Python would wait for data to come
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)
    return True


def closed_by_peer(sock: socket.socket, leftover: bytes | bytearray = b"") -> bool:
    """True when the peer closes `sock` (FIN or RST) without sending anything more."""
    if leftover:
        return False
    data, closed = read_to_eof(sock)
    return closed and data == b""


def close_times(socks: list[socket.socket], since: float, limit: float = 10.0) -> list[float]:
    """Seconds after `since` at which the peer closed each of `socks`, in the order they closed
    (watched together, so a late close never hides an early one); raises on data or timeout."""
    poller = select.poll()
    pending = {sock.fileno(): sock for sock in socks}
    for fd in pending:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    times: list[float] = []
    while pending:
        left = since + limit - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} socket(s) still open after {limit} s")
        for fd, _ in poller.poll(left * 1000):
            try:
                data = pending[fd].recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                raise AssertionError(f"expected a close, got {data!r}")
            times.append(time.monotonic() - since)
            poller.unregister(fd)
            del pending[fd]
    return times


def read_response_head(
    sock: socket.socket, buf: bytearray | None = None
) -> tuple[bytes, bytearray]:
    """Read one response head from `sock`; returns (head, bytes already read past it)."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"closed before a response head; got {bytes(buf)!r}")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head, buf


Response = tuple[int, dict[bytes, bytes], bytes, bytearray]


def read_response(sock: socket.socket, buf: bytearray | None = None) -> Response:
    """(status, lower-cased headers, body, leftover) for a Content-Length or chunked response
    (a response without either has no body here: read it with read_until_close)."""
    head, buf = read_response_head(sock, buf)
    headers = head_fields(head)
    body = b""
    if b"content-length" in headers:
        body = recv_exactly(sock, int(headers[b"content-length"]), buf)
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _read_chunked(sock, buf)
    return status_of(head), headers, body, buf


def _read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()
    while True:
        while b"\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed mid-chunk")
            buf += data
        line_end = buf.index(b"\r\n")
        size = int(bytes(buf[:line_end]).split(b";")[0], 16)
        del buf[: line_end + 2]
        body += recv_exactly(sock, size + 2, buf)[:size]
        if size == 0:
            return bytes(body)


# --- one request --------------------------------------------------------------------------


def http(
    target: int | Address, path: str = "/", *, host: str = "svc.test", method: str = "GET",
    extra: bytes = b"", body: bytes | None = None, close: bool = True, source: str | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request on a fresh connection: (status, lower-cased headers, body). A `body` is
    sent with its Content-Length; `extra` adds header lines (each ending in CRLF)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
    head += (b"Connection: close\r\n" if close else b"") + extra
    if body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
    bind = (source, 0) if source else None
    with socket.create_connection(address_of(target), timeout=WAIT, source_address=bind) as sock:
        sock.sendall(head + b"\r\n" + (body or b""))
        status, headers, data, _ = read_response(sock)
    return status, headers, data


def raw_tunnel(target: int | Address, path: str = "/tunnel") -> tuple[socket.socket, bytes]:
    """A WebSocket handshake (a fresh key, its Accept checked) on a fresh connection: the socket
    and any tunnel bytes that came with the 101."""
    tunnel = Tunnel(target, path)
    assert tunnel.status == 101, tunnel.head
    return tunnel.sock, bytes(tunnel.buf)


def tls_get(context: ssl.SSLContext, target: int | Address, sni: str = "localhost") -> int:
    """The status of one `GET /` over TLS (`sni` as the server name) on a fresh connection."""
    with (
        socket.create_connection(address_of(target), timeout=WAIT) as raw,
        context.wrap_socket(raw, server_hostname=sni) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        return read_response(sock)[0]


def ws_upgrade(sock: socket.socket, path: str = "/ws", host: str = "svc.test") -> bytearray:
    """Send a WebSocket handshake on `sock`, expect a 101; returns bytes read past its head."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + WS_HEADERS + b"\r\n")
    head, buf = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return buf


class Tunnel:
    """A client's WebSocket upgrade through the proxy, on a fresh connection, with a fresh key.

    `status`, `head` and `headers` (lower-cased) describe the answer. On a 101 the Accept is
    checked, and with `tag` set the bytes the upstream sends first are read into `tag`: that
    many bytes (an int) or up to a delimiter (bytes, left out).
    """

    def __init__(
        self, target: int | Address, path: str = "/chat", extra: bytes = b"", *,
        host: str = "svc.test", tag: int | bytes | None = None,
    ) -> None:  # fmt: skip
        self.sock = raw_client(target)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n".encode()
            + b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
            + key + b"\r\n" + extra + b"\r\n"
        )  # fmt: skip
        self.head, self.buf = read_response_head(self.sock)
        self.status = status_of(self.head)
        self.headers = head_fields(self.head)
        self.tag = b""
        if self.status != 101:
            return
        assert header(self.head, b"sec-websocket-accept") == ws_accept(key), self.head
        if isinstance(tag, int):
            self.tag = self.recv(tag)
        elif tag is not None:
            self.tag = self.recv_until(tag)

    @property
    def server(self) -> str:
        """The tag as text: the name of the upstream server behind this tunnel."""
        return self.tag.decode()

    def recv(self, n: int) -> bytes:
        return recv_exactly(self.sock, n, self.buf)

    def recv_until(self, delimiter: bytes) -> bytes:
        while delimiter not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"tunnel closed before {delimiter!r}")
            self.buf += data
        out, _, rest = bytes(self.buf).partition(delimiter)
        self.buf = bytearray(rest)
        return out

    def echo(self, data: bytes = b"ping") -> bytes:
        self.sock.sendall(data)
        return self.recv(len(data))

    def works(self) -> bool:
        try:
            return self.echo(b"ping") == b"ping"
        except (EOFError, OSError):
            return False

    def closed_by_peer(self) -> bool:
        """True once the proxy closes it (within WAIT), with nothing more sent."""
        return closed_by_peer(self.sock, self.buf)

    def close(self) -> None:
        self.sock.close()
