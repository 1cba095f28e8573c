"""`upgradeproxy demo`: the selftest, and the demo process as a user (or a browser) sees it.

The demo runs as a real subprocess (`python -m upgradeproxy demo --port 0`); tests read the
URL from its banner and talk to it over loopback, as the README tells users to.
"""

from __future__ import annotations

import io
import json
import re
import socket
import urllib.request
from functools import partial
from typing import Any

import pytest
import trio
from websockets.sync.client import connect

from tests.support.clients import read_until_close
from tests.support.processes import DemoProcess, run_cli
from upgradeproxy.demo import main as demo_module
from upgradeproxy.demo.main import selftest
from upgradeproxy.demo.selftest import SelftestFailed, round_trip


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()


def headers_seen(report: dict[str, Any]) -> dict[str, str]:
    """The upstream's handshake report as lower-cased name -> value."""
    assert report["type"] == "handshake"
    return {name.lower(): value for name, value in report["headers"]}


def test_selftest_prints_both_heads_and_the_echo() -> None:
    """`demo --selftest` does a real round trip, prints the handshake and the echo, exits 0."""
    result = run_cli("demo", "--selftest", "--log-format", "json", timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "GET /ws HTTP/1.1" in out
    assert "Sec-WebSocket-Version: 13" in out
    assert "HTTP/1.1 101 Switching Protocols" in out
    assert "Sec-WebSocket-Accept" in out
    assert "<<< echoed  'hello upgradeproxy'" in out
    assert out.rstrip().endswith("selftest ok")
    tunnels = [json.loads(line) for line in result.stderr.splitlines() if '"tunnel"' in line]
    assert [t["path"] for t in tunnels] == ["/ws"]


def test_page_is_served_through_the_proxy(demo: DemoProcess) -> None:
    """The printed URL serves the page, through the proxy (it adds `Via`)."""
    status, headers, body = http_get(demo.url)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "upgradeproxy" in headers.get("via", "")
    page = body.decode()
    for element in ('id="status"', 'id="msg"', 'id="send"', 'id="log"', 'id="headers"'):
        assert element in page
    assert "new WebSocket(" in page


def test_banner_prints_the_config_it_runs(demo: DemoProcess) -> None:
    """The YAML in the banner is a valid config naming the real upstream."""
    from upgradeproxy.config.loader import parse_config

    text = demo.banner.split("The config it runs:", 1)[1].split("Access log", 1)[0]
    config = parse_config(text, "banner")
    servers = {str(s.address) for u in config.upstreams.values() for s in u.servers}
    assert f"127.0.0.1:{demo.upstream_port}" in servers
    assert [route.path_prefix for route in config.routes] == ["/metrics", "/"]


def test_websocket_reports_the_handshake_then_echoes(demo: DemoProcess) -> None:
    """`/ws` first reports the head the upstream got: hop-by-hop rebuilt, Sec-WebSocket-* kept."""
    with connect(demo.ws_url, open_timeout=5) as ws:
        seen = headers_seen(json.loads(ws.recv(timeout=5)))
        assert seen["upgrade"] == "websocket"
        assert seen["connection"].lower() == "upgrade"
        assert seen["sec-websocket-key"] == ws.request.headers["Sec-WebSocket-Key"]
        assert seen["sec-websocket-version"] == "13"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-host"] == f"127.0.0.1:{demo.port}"
        assert "upgradeproxy" in seen["via"]
        ws.send("hi there")
        assert json.loads(ws.recv(timeout=5)) == {"type": "echo", "text": "hi there"}
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"


def test_second_socket_gets_chat_lines(demo: DemoProcess) -> None:
    """A text message is echoed to its sender and shared with the other open sockets."""
    with connect(demo.ws_url) as alice, connect(demo.ws_url) as bob:
        for ws in (alice, bob):
            assert json.loads(ws.recv(timeout=5))["type"] == "handshake"
        alice.send("hello bob")
        assert json.loads(alice.recv(timeout=5))["type"] == "echo"
        chat = json.loads(bob.recv(timeout=5))
        assert chat["type"] == "chat"
        assert chat["text"] == "hello bob"


def test_metrics_through_the_proxy_count_tunnel_bytes(demo: DemoProcess) -> None:
    """The page's `/metrics` is the admin listener, reached through the proxy itself."""
    with connect(demo.ws_url) as ws:
        ws.recv(timeout=5)
        ws.send("count me")
        ws.recv(timeout=5)
        _, _, body = http_get(demo.url + "metrics")
    counted = tunnel_bytes(body.decode())
    assert counted["up"] > 0, body
    assert counted["down"] > 0, body


def test_bad_input_closes_one_connection_not_the_upstream(demo: DemoProcess) -> None:
    """Garbage HTTP and a broken frame end those connections; the demo keeps serving."""
    with socket.create_connection(("127.0.0.1", demo.upstream_port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert read_until_close(sock).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", demo.upstream_port), timeout=5) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(b"\x8f\x80\x00\x00\x00\x00")  # reserved opcode 0xF: a protocol error
        data = read_until_close(sock)
        assert data.startswith(b"HTTP/1.1 101 ")
        assert b"\x88" in data  # a close frame before the connection ends
    status, _, _ = http_get(demo.url)
    assert status == 200


def test_plain_get_on_ws_path_is_400(demo: DemoProcess) -> None:
    """`/ws` without a WebSocket handshake is a client error, not a crash."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        http_get(demo.url + "ws")
    assert caught.value.code == 400


def test_sigint_drains_logs_the_tunnel_and_exits_0(demo: DemoProcess) -> None:
    """Ctrl-C with a tunnel open: the tunnel is closed within the drain grace and logged."""
    with connect(demo.ws_url) as ws:
        ws.recv(timeout=5)
        ws.send("bye")
        ws.recv(timeout=5)
        assert demo.interrupt() == 0
    records = demo.log_records()
    assert any(r.get("msg") == "draining" for r in records)
    [tunnel] = demo.tunnel_records()
    assert tunnel["status"] == 101
    assert tunnel["protocol"] == "websocket"
    assert tunnel["bytes_in"] > 0
    assert tunnel["bytes_out"] > 0


def test_busy_port_exits_1_with_the_reason() -> None:
    """A port already taken is reported on stderr, not as a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--port", str(port), "--log-format", "json", timeout=30)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


# --- the selftest's failure reasons, in process -------------------------------------------

BAD_ACCEPT_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCB0b2tlbg==\r\n\r\n"
)


async def fake_upstream(answer: bytes, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reads one request head, writes `answer` (nothing if empty), then holds the connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[:2])

    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        if answer:
            await stream.send_all(answer)
        await trio.sleep_forever()

    await trio.serve_listeners(handler, listeners)


async def test_selftest_checks_the_accept_token() -> None:
    """RFC 6455 §4.1: a 101 whose Sec-WebSocket-Accept does not match the key fails."""
    async with trio.open_nursery() as nursery:
        address = await nursery.start(fake_upstream, BAD_ACCEPT_101)
        with pytest.raises(SelftestFailed, match="bad Sec-WebSocket-Accept"):
            await round_trip(address, io.StringIO())
        nursery.cancel_scope.cancel()


async def test_selftest_reports_the_proxy_refusing_a_bad_switch(monkeypatch) -> None:
    """The proxy turns the upstream's bad 101 into a 502; the selftest exits 1 and says so."""
    monkeypatch.setattr(demo_module, "serve_upstream", partial(fake_upstream, BAD_ACCEPT_101))
    out = io.StringIO()
    assert await selftest(out) == 1
    assert "selftest FAILED: expected 101 Switching Protocols, got 502" in out.getvalue()


async def test_selftest_gives_up_after_its_deadline(monkeypatch) -> None:
    """An upstream that never answers fails the selftest at its deadline, not never."""
    monkeypatch.setattr(demo_module, "serve_upstream", partial(fake_upstream, b""))
    monkeypatch.setattr(demo_module, "SELFTEST_TIMEOUT", 0.5)
    out = io.StringIO()
    assert await selftest(out) == 1
    assert "selftest FAILED: no answer within 0.5 s" in out.getvalue()


def tunnel_bytes(metrics: str) -> dict[str, int]:
    """`upgradeproxy_tunnel_bytes_total` by direction, from Prometheus text."""
    found = re.findall(
        r'^upgradeproxy_tunnel_bytes_total\{direction="(\w+)"\} (\S+)$', metrics, re.M
    )
    return {direction: int(float(value)) for direction, value in found}


def test_default_port_taken_falls_back_to_a_free_one() -> None:
    """The first command a new user runs must work: with 8080 taken and no --port, the demo
    serves on another port and says so (an explicit busy --port is an error, tested above)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 8080))
        holder.listen(1)
    except OSError:
        pass  # something else holds 8080 already: the same situation
    demo = DemoProcess(port=None)
    try:
        assert demo.port != 8080
        with connect(demo.ws_url, open_timeout=10) as ws:
            assert json.loads(ws.recv())["type"] == "handshake"
        assert "port 8080 is taken" in demo.text()
    finally:
        demo.close()
        holder.close()
