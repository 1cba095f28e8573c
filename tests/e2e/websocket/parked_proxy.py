"""A proxy whose tunnels park a moment after their last byte, in front of a raw upstream and
a `websockets` echo upstream, for the tests of parked WebSocket-route tunnels.

`UPGRADEPROXY_PARK_AFTER` is short, so a tunnel parks 50-100 ms after its last byte;
`upgradeproxy_tunnels_parked` on /metrics says when it has.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import (
    LOOPBACK,
    SWITCH_WS,
    WAIT,
    WS_HEADERS,
    RawConn,
    RawUpstream,
    WsUpstream,
    eventually,
    free_port,
    read_response_head,
    scrape,
    status_of,
    value,
)
from tests.e2e.test_operations import ProxyProcess
from upgradeproxy.tunnel.parking import PARK_AFTER_ENV

PARK = "0.05"  # seconds: a tunnel parks between 50 and 100 ms after its last byte

# Every route reads frames; `raw` is a raw-socket upstream the test drives, `echo` a
# `websockets` echo server.
ROUTES = """\
routes:
  - path_prefix: /limits
    upstream: raw
    websocket: {max_message_bytes: 1000, max_frame_bytes: 600}
  - path_prefix: /rate
    upstream: raw
    websocket: {messages_per_second: 5}
  - path_prefix: /echo
    upstream: echo
    websocket: {}
"""


def hold_after_switch(conn: RawConn) -> None:
    """Accept the upgrade and leave the connection to the test."""
    conn.read_head()
    conn.send(SWITCH_WS)


@dataclass
class Parked:
    """A running proxy with short park delays and its two upstreams."""

    proc: ProxyProcess
    port: int
    admin: int
    raw: RawUpstream
    echo: WsUpstream

    def url(self, path: str) -> str:
        return f"ws://{LOOPBACK}:{self.port}{path}"

    def metric(self, name: str, **labels: str) -> float:
        return value(scrape(self.admin), name, **labels)

    def parked(self, count: int) -> bool:
        """Eventually exactly `count` tunnels are parked."""
        return eventually(lambda: self.metric("upgradeproxy_tunnels_parked") == count)

    def raw_pair(self, path: str) -> tuple[socket.socket, RawConn]:
        """A raw client socket and the raw upstream's connection, past a real 101."""
        index = len(self.raw.conns)
        sock = socket.create_connection((LOOPBACK, self.port), timeout=WAIT)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: svc.test\r\n".encode() + WS_HEADERS + b"\r\n")
        head, rest = read_response_head(sock)
        assert status_of(head) == 101, head
        assert not rest
        return sock, self.raw.accept(index)

    def tunnel_line(self, path: str) -> dict[str, Any]:
        return self.proc.wait_log("tunnel", path=path)[0]


@contextmanager
def parked_proxy(tmp_path: Path, extra: str = "") -> Iterator[Parked]:
    """`upgradeproxy run` with the routes above and `extra` top-level keys, once it listens."""
    raw, echo = RawUpstream(hold_after_switch), WsUpstream()
    port, admin = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f'listen:\n  - address: "{LOOPBACK}:{port}"\n'
        f'admin:\n  address: "{LOOPBACK}:{admin}"\n'
        f'upstreams:\n  raw:\n    servers: ["{LOOPBACK}:{raw.port}"]\n'
        f'  echo:\n    servers: ["{LOOPBACK}:{echo.port}"]\n'
        f"{ROUTES}{extra}\n"
    )
    proc = ProxyProcess(config, env={**os.environ, PARK_AFTER_ENV: PARK})
    try:
        proc.wait_log("listening")
        yield Parked(proc, port, admin, raw, echo)
    finally:
        proc.close()
        raw.close()
        echo.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the peer closes (bounded by the socket's timeout)."""
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)
