"""A proxy whose tunnels park a moment after their last byte, with WebSocket-aware routes in
front of a raw upstream and a `websockets` echo upstream: the peers of the tests of parked
WebSocket-route tunnels.

`UPGRADEPROXY_PARK_AFTER` is short, so a tunnel parks 50-100 ms after its last byte;
`upgradeproxy_tunnels_parked` on /metrics says when it has.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.clients import LOOPBACK, free_port, read_response_head
from tests.support.configs import config_yaml, route
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, RawUpstream, WsUpstream
from tests.support.processes import ProxyProcess, Record, clean_env
from tests.support.waiting import WAIT, eventually
from tests.support.wire import WS_HEADERS, status_of, switching
from tests.support.ws_frames import TEXT, frame
from upgradeproxy.tunnel.parking import PARK_AFTER_ENV

PARK = "0.05"  # seconds: a tunnel parks between 50 and 100 ms after its last byte

# Every route reads frames; `raw` is a raw-socket upstream the test drives, `echo` a
# `websockets` echo server.
ROUTES = [
    route("raw", path_prefix="/limits",
          websocket={"max_message_bytes": 1000, "max_frame_bytes": 600}),
    route("raw", path_prefix="/rate", websocket={"messages_per_second": 5}),
    route("echo", path_prefix="/echo", websocket={}),
]  # fmt: skip


EARLY_DOWN = frame(TEXT, b"sent with the 101", mask=False)


def hold_after_switch(conn: RawConn) -> None:
    """Accept the upgrade and leave the connection to the test; on a path with `/early`, a
    frame goes in the same write as the 101 (bytes the proxy reads with the response head)."""
    head = conn.read_head(timeout=WAIT)
    conn.send(switching(head) + (EARLY_DOWN if b"/early" in head.split(b"\r\n")[0] else b""))
    conn.sock.settimeout(WAIT)


@dataclass
class Parked:
    """A running proxy with a short park delay, and its two upstreams."""

    proc: ProxyProcess
    port: int
    admin: int
    raw: RawUpstream
    echo: WsUpstream
    rest: bytes = b""  # what the last `raw_pair` read past the 101

    def url(self, path: str) -> str:
        return f"ws://{LOOPBACK}:{self.port}{path}"

    def metric(self, name: str, **labels: str) -> float:
        return value(scrape(self.admin), name, **labels)

    def parked(self, count: int) -> bool:
        """Eventually exactly `count` tunnels are parked."""
        return eventually(lambda: self.metric("upgradeproxy_tunnels_parked") == count)

    def raw_pair(self, path: str, early: bytes = b"") -> tuple[socket.socket, RawConn]:
        """A raw client socket and the raw upstream's connection, past a real 101; `early`
        goes in the same write as the request head."""
        index = len(self.raw.conns)
        sock = socket.create_connection((LOOPBACK, self.port), timeout=WAIT)
        head = f"GET {path} HTTP/1.1\r\nHost: svc.test\r\n".encode() + WS_HEADERS + b"\r\n"
        sock.sendall(head + early)
        head, rest = read_response_head(sock)
        assert status_of(head) == 101, head
        self.rest = bytes(rest)
        return sock, self.raw.accept(index)

    def tunnel_line(self, path: str) -> Record:
        return self.proc.wait_log("tunnel", path=path)[0]


@contextmanager
def parked_proxy(tmp_path: Path, **top: Any) -> Iterator[Parked]:
    """`upgradeproxy run` with the routes above and `top` keys (timeouts=, drain_tunnels=),
    once it listens; everything is stopped at the end."""
    with ExitStack() as stack:
        raw = RawUpstream(hold_after_switch)
        stack.callback(raw.close)
        echo = WsUpstream()
        stack.callback(echo.close)
        port, admin = free_port(), free_port()
        config = tmp_path / "proxy.yaml"
        config.write_text(
            config_yaml(
                {"raw": raw.port, "echo": echo.port}, ROUTES, listen=port, admin=admin, **top
            )
        )
        proc = ProxyProcess(config, env=clean_env(**{PARK_AFTER_ENV: PARK}))
        stack.callback(proc.close)
        proc.ready()
        yield Parked(proc, port, admin, raw, echo)
