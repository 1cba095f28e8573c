"""Rule 18, WebSocket-aware routes, from the outside: a proxy process, the `websockets` library
as client and upstream, and raw sockets for peers that break the protocol.

One proxy serves every test here; each test uses paths of its own, so its tunnel's log line
is found by path, and metrics are compared before and after.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame
from websockets.sync.client import ClientConnection, connect

from tests.support.certs import client_context, tls_keys, write_pair
from tests.support.clients import (
    LOOPBACK,
    free_port,
    read_response_head,
    read_until_close,
    recv_exactly,
)
from tests.support.configs import config_yaml, listener, route
from tests.support.metrics import scrape, value
from tests.support.peers import RawConn, RawUpstream, WsUpstream
from tests.support.processes import ProxyProcess, Record, run_cli
from tests.support.waiting import WAIT, eventually
from tests.support.wire import status_of, switching, ws_request
from tests.support.ws_frames import BINARY, CLOSE, CONT, PING, TEXT, close_code, frame, frames_of

# --- peers -----------------------------------------------------------------------------------


class Upstream:
    """A `websockets` echo server that records how each connection closed. It echoes binary
    messages in frames of 500 bytes at most (under /limits' max_frame_bytes), text in one
    frame; `big:N` asks it for a text message of N bytes."""

    def __init__(self) -> None:
        self.closes: queue.Queue[tuple[str, int | None, str]] = queue.Queue()
        self.received: dict[str, list[str | bytes]] = {}
        self.server = WsUpstream(self.handler)

    async def handler(self, ws: Any) -> None:
        received = self.received.setdefault(ws.request.path, [])
        try:
            async for message in ws:
                received.append(message)
                if isinstance(message, str) and message.startswith("big:"):
                    await ws.send("x" * int(message[4:]))
                elif isinstance(message, bytes) and len(message) > 500:
                    await ws.send([message[i : i + 500] for i in range(0, len(message), 500)])
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.put((ws.request.path, ws.close_code, ws.close_reason))

    def close_of(self, path: str) -> tuple[int | None, str]:
        """How the upstream's connection for `path` was closed: (code received, reason)."""
        while True:
            got, code, reason = self.closes.get(timeout=WAIT)
            if got == path:
                return code, reason


class Recorder:
    """A raw upstream that accepts every WebSocket handshake, then records every byte it gets
    until the proxy closes the connection: what the proxy forwarded, exactly."""

    def __init__(self) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.raw = RawUpstream(self.handler)

    def handler(self, conn: RawConn) -> None:
        head = conn.read_head()
        path = head.split(b" ")[1].decode()
        conn.send(switching(head))
        self.got.put((path, conn.read_until_close(timeout=WAIT)))

    def frames_for(self, path: str) -> list[Frame]:
        """The frames the upstream connection for `path` received, once it closed."""
        while True:
            got, data = self.got.get(timeout=WAIT)
            if got == path:
                return frames_of(data, masked=True)


@dataclass
class Proxy:
    proc: ProxyProcess
    port: int
    admin: int
    upstream: Upstream
    raw: RawUpstream
    recorder: Recorder

    def url(self, path: str) -> str:
        return f"ws://{LOOPBACK}:{self.port}{path}"

    def tunnel_line(self, path: str) -> Record:
        return self.proc.wait_record(lambda r: r.get("msg") == "tunnel" and r["path"] == path)[0]

    def metric(self, name: str, **labels: str) -> float:
        return value(scrape(self.admin), name, **labels)

    def raw_pair(self, path: str) -> tuple[socket.socket, RawConn]:
        """A client socket and the raw upstream's connection, both past a real 101."""
        index = len(self.raw.conns)
        sock = socket.create_connection((LOOPBACK, self.port), timeout=WAIT)
        sock.sendall(ws_request(target=path.encode(), host=b"x"))
        conn = self.raw.accept(index)
        conn.send(switching(conn.read_head()))
        head, rest = read_response_head(sock)
        assert status_of(head) == 101, head
        assert not rest
        return sock, conn


def config(port: int, admin: int, echo: int, raw: int, recorder: int) -> str:
    """One proxy for every test: a route per behaviour, each on paths of its own."""
    routes = [
        route("echo", path_prefix="/checks", websocket={}),
        route("echo", path_prefix="/limits",
              websocket={"max_message_bytes": 1000, "max_frame_bytes": 600}),
        route("echo", path_prefix="/rate", websocket={"messages_per_second": 20}),
        route("raw", path_prefix="/raw", websocket={"max_message_bytes": 1000}),
        route("recorder", path_prefix="/recorded-rate", websocket={"messages_per_second": 20}),
        route("raw", path_prefix="/free", websocket={}),
        route("echo", path_prefix="/plain"),
    ]  # fmt: skip
    return config_yaml({"echo": echo, "raw": raw, "recorder": recorder}, routes, listen=port,
                       admin=admin)  # fmt: skip


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    upstream, raw, recorder = Upstream(), RawUpstream(), Recorder()
    port, admin = free_port(), free_port()
    path: Path = tmp_path_factory.mktemp("wsroutes") / "proxy.yaml"
    path.write_text(config(port, admin, upstream.server.port, raw.port, recorder.raw.port))
    proc = ProxyProcess(path)
    try:
        proc.ready()
        yield Proxy(proc, port, admin, upstream, raw, recorder)
    finally:
        proc.close()
        upstream.server.close()
        raw.close()
        recorder.raw.close()


def policy_close(ws: ClientConnection) -> int:
    """The close code the client got, once the proxy closed its side."""
    with pytest.raises(ConnectionClosed) as closed:
        _read_forever(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def _read_forever(ws: ClientConnection) -> None:
    while True:
        ws.recv(timeout=WAIT)


# --- messages through, counted ---------------------------------------------------------------


@pytest.mark.parametrize("compression", ["deflate", None], ids=["compressed", "uncompressed"])
def test_messages_pass_unchanged_and_are_counted(proxy: Proxy, compression: str | None) -> None:
    """Text, binary, fragmented, and permessage-deflate messages arrive as sent; the tunnel's
    log line and the route's metric count them each way."""
    path = f"/checks/messages-{compression}"
    before = {d: proxy.metric("upgradeproxy_websocket_messages_total", route="*/checks",
                              direction=d) for d in ("up", "down")}  # fmt: skip
    with connect(proxy.url(path), compression=compression, max_size=None) as ws:
        assert ("permessage-deflate" in str(ws.response.headers)) == (compression is not None)
        ws.send("héllo")
        assert ws.recv(timeout=WAIT) == "héllo"
        ws.send(b"\x00\xff" * 5000)
        assert ws.recv(timeout=WAIT) == b"\x00\xff" * 5000
        ws.send(["frag", "ment", "ed"])  # one message in three frames
        assert ws.recv(timeout=WAIT) == "fragmented"
        ws.ping(b"not a message").wait(WAIT)
        big = os.urandom(300_000)  # long payloads are spliced, not read
        ws.send(big)
        assert ws.recv(timeout=WAIT) == big
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line["messages_out"]) == (4, 4)
    assert line["first_close"] in ("client", "upstream")
    assert "error" not in line
    after = {d: proxy.metric("upgradeproxy_websocket_messages_total", route="*/checks",
                             direction=d) for d in ("up", "down")}  # fmt: skip
    assert (after["up"] - before["up"], after["down"] - before["down"]) == (4, 4)


def test_route_without_the_block_logs_no_message_counts(proxy: Proxy) -> None:
    with connect(proxy.url("/plain/x"), compression=None) as ws:
        ws.send("a")
        assert ws.recv(timeout=WAIT) == "a"
    line = proxy.tunnel_line("/plain/x")
    assert "messages_in" not in line
    assert "messages_out" not in line


# --- limits, just under and just over ----------------------------------------------------------


def test_limits_just_under_pass(proxy: Proxy) -> None:
    path = "/limits/under"
    with connect(proxy.url(path), compression=None, max_size=None) as ws:
        ws.send(b"f" * 600)  # one frame of max_frame_bytes
        assert ws.recv(timeout=WAIT) == b"f" * 600
        ws.send([b"m" * 500, b"m" * 500])  # a message of max_message_bytes in two frames
        assert ws.recv(timeout=WAIT) == b"m" * 1000
    assert proxy.tunnel_line(path)["messages_in"] == 2


@pytest.mark.parametrize(
    ("message", "rule"),
    [
        pytest.param(b"f" * 601, "max_frame_bytes", id="a frame one over max_frame_bytes"),
        pytest.param([b"m" * 500, b"m" * 501], "max_message_bytes",
                     id="a message one over max_message_bytes"),
    ],
)  # fmt: skip
def test_client_over_a_limit_gets_1009_and_upstream_1001(
    proxy: Proxy, message: bytes | list[bytes], rule: str
) -> None:
    path = f"/limits/over-{rule}"
    closes = proxy.metric("upgradeproxy_websocket_closes_total", route="*/limits", code="1009")
    with connect(proxy.url(path), compression=None, max_size=None) as ws:
        ws.send("before")
        assert ws.recv(timeout=WAIT) == "before"
        with contextlib.suppress(ConnectionClosed):  # the Close may come before the last frame
            ws.send(message)
        assert policy_close(ws) == 1009
    assert proxy.upstream.close_of(path)[0] == 1001
    line = proxy.tunnel_line(path)
    assert line["first_close"] == "policy"
    assert rule in line["error"]
    assert (line["messages_in"], line["messages_out"]) == (1, 1)
    after = proxy.metric("upgradeproxy_websocket_closes_total", route="*/limits", code="1009")
    assert after - closes == 1


def test_upstream_over_a_limit_gets_1009_and_client_1001(proxy: Proxy) -> None:
    """Limits hold for the server's messages too; the Close to the server is masked (checked
    by `websockets` on the upstream, which fails a connection on an unmasked client frame)."""
    path = "/limits/server-over"
    with connect(proxy.url(path), compression=None, max_size=None) as ws:
        ws.send("big:600")
        assert ws.recv(timeout=WAIT) == "x" * 600
        ws.send("big:601")
        assert policy_close(ws) == 1001
    assert proxy.upstream.close_of(path)[0] == 1009
    line = proxy.tunnel_line(path)
    assert (line["first_close"], line["messages_out"]) == ("policy", 1)
    assert "max_frame_bytes" in line["error"]


def test_compressed_messages_are_measured_as_sent(proxy: Proxy) -> None:
    """permessage-deflate: a message is measured compressed, as framed on the wire, so a
    message that compresses under the limit passes whatever its size once inflated."""
    path = "/limits/compressed"
    with connect(proxy.url(path), compression="deflate", max_size=None) as ws:
        ws.send("a" * 100_000)  # deflates to a few hundred bytes
        assert ws.recv(timeout=WAIT) == "a" * 100_000
        ws.send(os.urandom(2000))  # random bytes do not deflate
        assert policy_close(ws) == 1009
    assert proxy.tunnel_line(path)["messages_in"] == 1


# --- messages per second ----------------------------------------------------------------------


def test_client_steady_under_its_rate_is_never_closed(proxy: Proxy) -> None:
    """20 messages/s allowed; 10/s for 3 s all pass (pings, which are not counted, besides)."""
    path = "/rate/steady"
    with connect(proxy.url(path), compression=None) as ws:
        for i in range(30):
            ws.send(str(i))
            ws.ping().wait(WAIT)
            assert ws.recv(timeout=WAIT) == str(i)
            time.sleep(0.1)  # the load's pace, not a wait for anything
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line.get("error")) == (30, None)


def test_client_burst_over_its_rate_gets_1008(proxy: Proxy) -> None:
    """A burst of the bucket's size passes; the message past it, and all after, never reach
    the upstream, which gets a Close 1001 right after the last message let through."""
    path = "/recorded-rate/burst"
    route = "*/recorded-rate"
    closes = proxy.metric("upgradeproxy_websocket_closes_total", route=route, code="1008")
    with connect(proxy.url(path), compression=None) as ws:
        with contextlib.suppress(ConnectionClosed):  # the Close may come before the last send
            for i in range(60):
                ws.send(str(i))
        assert policy_close(ws) == 1008
    got = proxy.recorder.frames_for(path)
    assert close_code(got[-1]) == 1001
    texts = [f.data.decode() for f in got[:-1]]
    assert texts == [str(i) for i in range(len(texts))]  # in order, none skipped
    assert 20 <= len(texts) <= 22  # the bucket's 20, and what refilled during the burst
    line = proxy.tunnel_line(path)
    assert line["messages_in"] == len(texts)
    assert "messages_per_second" in line["error"]
    after = proxy.metric("upgradeproxy_websocket_closes_total", route=route, code="1008")
    assert after - closes == 1


# --- broken peers, on raw sockets ------------------------------------------------------------

GOOD_UP = frame(TEXT, b"hello") + frame(PING, b"p")
GOOD_DOWN = frame(TEXT, b"welcome", mask=False)


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        pytest.param(frame(TEXT, b"no mask", mask=False), "masking", id="unmasked client frame"),
        pytest.param(frame(0x3, b"?"), "opcode", id="reserved opcode"),
        pytest.param(frame(CONT, b"orphan"), "continuation", id="continuation without a start"),
        pytest.param(frame(TEXT, b"z", rsv=0x40), "rsv", id="RSV1 without permessage-deflate"),
        pytest.param(frame(BINARY, b"x" * 1001), "max_message_bytes", id="too big"),
    ],
)
def test_broken_client_frames_close_both_sides_on_frame_boundaries(
    proxy: Proxy, bad: bytes, rule: str
) -> None:
    """The frames before the offending one arrive whole; none of its bytes do; the upstream
    then gets a masked Close 1001 and the client a Close 1002 or 1009."""
    path = f"/raw/client-{rule}"
    sock, conn = proxy.raw_pair(path)
    with sock:
        conn.send(GOOD_DOWN)
        welcome = recv_exactly(sock, len(GOOD_DOWN))
        sock.sendall(GOOD_UP + bad + frame(TEXT, b"never"))
        upstream_got = frames_of(conn.read_until_close(), masked=True)
        client_got = frames_of(welcome + read_until_close(sock), masked=False)
    assert [f.data for f in upstream_got[:-1]] == [b"hello", b"p"]
    assert close_code(upstream_got[-1]) == 1001
    assert [f.data for f in client_got[:-1]] == [b"welcome"]
    code = 1009 if rule == "max_message_bytes" else 1002
    assert close_code(client_got[-1]) == code
    line = proxy.tunnel_line(path)
    assert (line["first_close"], line["messages_in"], line["messages_out"]) == ("policy", 1, 1)
    assert rule in line["error"]


def test_masked_server_frame_closes_the_server_with_1002(proxy: Proxy) -> None:
    path = "/raw/server-masked"
    sock, conn = proxy.raw_pair(path)
    with sock:
        sock.sendall(GOOD_UP)
        assert conn.read_exactly(len(GOOD_UP)) == GOOD_UP
        conn.send(GOOD_DOWN + frame(TEXT, b"masked"))
        client_got = frames_of(read_until_close(sock), masked=False)
        upstream_got = frames_of(GOOD_UP + conn.read_until_close(), masked=True)
    assert [f.data for f in client_got[:-1]] == [b"welcome"]
    assert close_code(client_got[-1]) == 1001
    assert [f.data for f in upstream_got[:-1]] == [b"hello", b"p"]
    assert close_code(upstream_got[-1]) == 1002  # masked: `masked=True` parsing checked it
    assert "masking" in proxy.tunnel_line(path)["error"]


def test_length_header_split_across_reads(proxy: Proxy) -> None:
    """A 64-bit length header arriving a byte at a time is read whole; its frame goes on."""
    path = "/free/split"
    sock, conn = proxy.raw_pair(path)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = frame(BINARY, b"s" * 70_000)  # 2 + 8 length bytes + 4 key bytes
    with sock:
        for i in range(14):  # header and masking key, one byte per segment
            sock.send(message[i : i + 1])
            time.sleep(0.02)  # lets each byte arrive on its own (pacing, not a wait)
        sock.sendall(message[14:])
        assert conn.read_exactly(len(message)) == message
        sock.sendall(frame(CLOSE, struct.pack("!H", 1000)))
        conn.send(frame(CLOSE, struct.pack("!H", 1000), mask=False))
        conn.close()  # the server closes the TCP connection first (RFC 6455 §7.1.1)
        assert [close_code(f) for f in frames_of(read_until_close(sock), masked=False)] == [1000]
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line.get("error")) == (1, None)


def test_offending_header_split_across_reads_is_never_forwarded(proxy: Proxy) -> None:
    path = "/raw/split-over"
    sock, conn = proxy.raw_pair(path)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bad = frame(BINARY, b"b" * 70_000)  # a 64-bit length over max_message_bytes
    with sock:
        sock.sendall(GOOD_UP)
        assert conn.read_exactly(len(GOOD_UP)) == GOOD_UP
        for i in range(14):
            sock.send(bad[i : i + 1])
            time.sleep(0.02)
        upstream_got = frames_of(conn.read_until_close(), masked=True)
        client_got = frames_of(read_until_close(sock), masked=False)
    assert [close_code(f) for f in upstream_got] == [1001]
    assert [close_code(f) for f in client_got] == [1009]


def test_close_waits_for_the_frame_under_way_to_the_offender(proxy: Proxy) -> None:
    """The client breaks a rule while a server frame is half-way to it: the rest of that frame
    reaches the client, then the Close; nothing the server sends after it does."""
    path = "/raw/mid-frame"
    sock, conn = proxy.raw_pair(path)
    long_frame = frame(BINARY, b"L" * 800, mask=False)
    with sock:
        conn.send(long_frame[:300])
        got = bytearray()
        while len(got) < 300:
            got += sock.recv(65536)
        sock.sendall(GOOD_UP + frame(TEXT, b"bad", mask=False))
        assert conn.read_exactly(len(GOOD_UP)) == GOOD_UP
        conn.send(long_frame[300:] + frame(TEXT, b"after", mask=False))
        client_got = frames_of(bytes(got) + read_until_close(sock), masked=False)
        upstream_got = frames_of(conn.read_until_close(), masked=True)
    assert client_got[0].data == b"L" * 800
    assert close_code(client_got[-1]) == 1002
    assert b"after" not in [f.data for f in client_got]
    assert [close_code(f) for f in upstream_got] == [1001]


def test_no_second_close_after_the_peer_sent_one(proxy: Proxy) -> None:
    """A client that already sent its Close gets the proxy's; the server, which got the
    client's, gets none of the proxy's: one Close frame each way, at most."""
    path = "/raw/after-close"
    sock, conn = proxy.raw_pair(path)
    with sock:
        sock.sendall(frame(CLOSE, struct.pack("!H", 1000)) + frame(TEXT, b"late", mask=False))
        upstream_got = frames_of(conn.read_until_close(), masked=True)
        client_got = frames_of(read_until_close(sock), masked=False)
    assert [close_code(f) for f in upstream_got] == [1000]
    assert [close_code(f) for f in client_got] == [1002]


def test_check_reports_non_positive_limits(tmp_path: Path) -> None:
    # Hand-written: the line numbers in the problems are under test.
    config = tmp_path / "bad.yaml"
    config.write_text(
        "listen:\n  - address: 127.0.0.1:8080\nupstreams:\n  a:\n    servers: [127.0.0.1:9]\n"
        "routes:\n  - upstream: a\n    websocket:\n      max_message_bytes: 0\n"
        "      max_frame_bytes: -1\n      messages_per_secnd: 5\n"
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert f"{config}:9: routes[0].websocket.max_message_bytes: expected a positive" in out
    assert f"{config}:10: routes[0].websocket.max_frame_bytes: expected a positive" in out
    assert "did you mean 'messages_per_second'?" in out


def test_tls_listener_reads_frames_too(tmp_path: Path, ca: Any, run_proxy: Any) -> None:
    """Over TLS the relay copies every byte through Python instead of splicing; the same
    counts and the same closes."""
    files = write_pair(ca.issue_cert("localhost"), tmp_path, "proxy")
    upstream = Upstream()
    port = free_port()
    text = config_yaml(
        {"echo": upstream.server.port},
        [route("echo", websocket={"max_frame_bytes": 100})],
        listen=listener(port, tls=tls_keys(files)),
    )
    try:
        proc = run_proxy(text)
        ctx = client_context(ca)
        url = f"wss://localhost:{port}/tls"
        with connect(url, ssl=ctx, compression=None) as ws:
            ws.send("over TLS")
            assert ws.recv(timeout=WAIT) == "over TLS"
            ws.send(b"x" * 101)
            assert policy_close(ws) == 1009
        assert upstream.close_of("/tls")[0] == 1001
        line = proc.wait_record(lambda r: r.get("msg") == "tunnel")[0]
        assert (line["messages_in"], line["messages_out"], line["first_close"]) == (1, 1, "policy")
    finally:
        upstream.server.close()


def test_an_idle_framed_tunnel_parks_like_a_spliced_one_and_is_still_read(proxy: Proxy) -> None:
    """Idle past the park delay (0.5-1 s), a tunnel of a route with the block parks as a
    spliced one does, and its frames are still read: the message after the pause is counted."""
    path = "/checks/idle"
    parked = proxy.metric("upgradeproxy_tunnels_parked")
    with (
        connect(proxy.url(path), compression=None) as ws,
        connect(proxy.url("/plain/idle"), compression=None) as plain,
    ):
        for peer in (ws, plain):
            peer.send("before")
            assert peer.recv(timeout=WAIT) == "before"
        assert eventually(lambda: proxy.metric("upgradeproxy_tunnels_parked") == parked + 2)
        ws.send("after")
        assert ws.recv(timeout=WAIT) == "after"
    assert proxy.tunnel_line(path)["messages_in"] == 2
