"""Peers for the pool tests: named raw-socket backends with a switchable /healthz, and clients.

A `Backend` answers plain requests with its name (keep-alive), upgrades WebSocket requests
(sending its name right behind the 101, then echoing), and answers `/healthz` as the test
sets `health`: ok, fail (503), hang, reset, garbage, bad-accept (a 101 with a wrong
Sec-WebSocket-Accept) or no-101 (a 200 to a WebSocket check).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time

from tests.conftest import LOOPBACK, RawConn, ok_response, read_response, read_response_head

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def switching(head: bytes) -> bytes:
    """A correct 101 head answering the WebSocket handshake in `head`."""
    key = header(head, b"sec-websocket-key") or b""
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


class Backend:
    """A named upstream server; see the module docstring."""

    def __init__(self, raw_upstream, name: str) -> None:
        self.name = name
        self.health = "ok"
        self.requests: list[bytes] = []  # request heads other than health checks
        self.checks: list[bytes] = []  # health-check heads
        self._lock = threading.Lock()
        self.up = raw_upstream(self._handle)

    @property
    def port(self) -> int:
        return self.up.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _handle(self, conn: RawConn) -> None:
        while True:
            head = conn.read_head(timeout=30)
            if head.split(b" ")[1].startswith(b"/healthz"):
                with self._lock:
                    self.checks.append(head)
                self._health(conn, head)
                return
            with self._lock:
                self.requests.append(head)
            if (header(head, b"upgrade") or b"").lower() == b"websocket":
                conn.send(switching(head) + self.name.encode() + b"\n")
                conn.sock.settimeout(60)
                while data := conn.sock.recv(65536):
                    conn.send(data)
                conn.close()  # the client's FIN came through: end the tunnel both ways
                return
            conn.send(ok_response(self.name.encode()))

    def _health(self, conn: RawConn, head: bytes) -> None:
        mode = self.health
        upgrade = header(head, b"upgrade") is not None
        if mode == "ok" and upgrade:
            conn.send(switching(head))
            conn.read_until_close(timeout=5)
        elif mode in ("ok", "no-101"):
            conn.send(ok_response(b"healthy", b"Connection: close\r\n"))
        elif mode == "fail":
            conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        elif mode == "hang":
            conn.read_until_close(timeout=30)
        elif mode == "reset":
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "garbage":
            conn.send(b"\x00\x01 this is not HTTP\r\n\r\n")
        elif mode == "bad-accept":
            conn.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
            )
        conn.close()

    def served(self) -> int:
        with self._lock:
            return len(self.requests)


def pool_yaml(
    backends: list[Backend], keys: str = "", *, listen: str = "", admin: bool = False
) -> str:
    """A proxy in front of `backends` as upstream `app`: `keys` are more keys of that upstream
    (one per line), `listen` more keys of the listener; `admin` adds an admin listener."""
    servers = "\n".join(f'      - "{b.address}"' for b in backends)
    upstream = "\n".join("    " + line for line in keys.strip().splitlines())
    admin_block = '\nadmin:\n  address: "127.0.0.1:0"' if admin else ""
    return f"""
listen:
  - address: "127.0.0.1:0"{listen}{admin_block}
upstreams:
  app:
    servers:
{servers}
{upstream}
routes:
  - upstream: app
timeouts: {{drain: 1}}
"""


def get(
    address: tuple[str, int], path: str = "/", extra: bytes = b"", *, source: str | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET on a fresh connection: (status, lower-cased headers, body)."""
    bind = (source, 0) if source else None
    with socket.create_connection(address, timeout=10, source_address=bind) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + extra + b"\r\n"
        )
        status, headers, body, _ = read_response(sock)
    return status, headers, body


def served_by(address: tuple[str, int], path: str = "/", extra: bytes = b"", **kw: str) -> str:
    status, _, body = get(address, path, extra, **kw)
    assert status == 200, (status, body)
    return body.decode()


class Tunnel:
    """A WebSocket upgrade through the proxy: `status`, `headers`, and on a 101 `server`, the
    backend's name."""

    def __init__(self, address: tuple[str, int], path: str = "/ws", extra: bytes = b"") -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            + b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n" + extra + b"\r\n"
        )  # fmt: skip
        head, buf = read_response_head(self.sock)
        self.head = head
        self.status = int(head.split(b" ")[1])
        self.headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        }
        self.server = ""
        if self.status == 101:
            while b"\n" not in buf:
                buf += self.sock.recv(65536)
            self.server = bytes(buf[: buf.index(b"\n")]).decode()

    def echo(self, data: bytes = b"ping") -> bytes:
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = self.sock.recv(65536)
            assert chunk, "tunnel closed"
            got += chunk
        return got

    def close(self) -> None:
        self.sock.close()


def admin_json(port: int, path: str = "/upstreams") -> dict:
    status, headers, body = get((LOOPBACK, port), path)
    assert status == 200, (status, body)
    assert headers[b"content-type"] == b"application/json"
    return json.loads(body)


def metrics(port: int) -> str:
    return get((LOOPBACK, port), "/metrics")[2].decode()


def wait_tunnels(proxy, count: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while proxy.call(lambda: proxy.telemetry.tunnels_active) != count:
        assert time.monotonic() < deadline, "tunnels did not settle"
        time.sleep(0.01)
