"""How a parked tunnel of a WebSocket-aware route ends: as a plain parked one does (idle from
its last byte, drain, SIGUSR2 retirement), with its frame state, counts and log line intact,
and its frames still checked while it waits for the end (rules 5, 13, 18, Operations)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.support.clients import closed_by_peer, read_until_close, recv_exactly
from tests.support.parked_websocket import Parked, parked_proxy
from tests.support.peers import RawConn
from tests.support.ws_frames import BINARY, TEXT, close_code, frame, frames_of


def exchange(proxy: Parked, sock: socket.socket, path: str, text: bytes) -> None:
    """One message each way through the tunnel of `sock` (the raw upstream answers it)."""
    conn = proxy.raw.conns[-1]
    up = frame(TEXT, text)
    sock.sendall(up)
    assert conn.read_exactly(len(up)) == up
    down = frame(TEXT, text, mask=False)
    conn.send(down)
    assert recv_exactly(sock, len(down)) == down


def client_closes(sock: socket.socket) -> list[int]:
    """The codes of the frames the client gets until the proxy closes: Close frames only."""
    return [close_code(f) for f in frames_of(read_until_close(sock), masked=False)]


def upstream_closes(conn: RawConn) -> list[int]:
    """The same for the upstream, whose frames from the proxy are masked."""
    return [close_code(f) for f in frames_of(conn.read_until_close(), masked=True)]


def test_tunnel_idle_closes_a_parked_websocket_tunnel_from_its_last_byte(tmp_path: Path) -> None:
    """tunnel_idle counts from the tunnel's last byte, not from when it parked or its first
    message: a message after a parked spell moves the end; the line has both messages."""
    with parked_proxy(tmp_path, timeouts={"tunnel_idle": 1}) as proxy:
        path = "/limits/idle"
        sock, conn = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"first")
            assert proxy.parked(1)
            time.sleep(0.6)  # the condition under test: parked for most of tunnel_idle
            last = frame(TEXT, b"last")
            sock.sendall(last)
            assert conn.read_exactly(len(last)) == last
            sent_last = time.monotonic()
            assert proxy.parked(1)
            assert closed_by_peer(sock)
            assert time.monotonic() - sent_last >= 1.0
        line = proxy.tunnel_line(path)
        assert (line["first_close"], line["messages_in"], line["messages_out"]) == ("idle", 2, 1)
        assert "error" not in line
        assert proxy.parked(0)


def test_drain_wait_keeps_a_parked_websocket_tunnel_reading_frames(tmp_path: Path) -> None:
    """drain_tunnels: wait: a parked tunnel stays open through the drain, relays and counts
    messages, and still closes a broken frame with its Close codes; then the process exits 0."""
    with parked_proxy(tmp_path, timeouts={"drain": 30}) as proxy:
        path = "/limits/drain"
        sock, conn = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"before the drain")
            assert proxy.parked(1)
            proxy.proc.signal(signal.SIGTERM)
            proxy.proc.wait_log("draining", signal="SIGTERM")
            assert proxy.parked(1)
            exchange(proxy, sock, path, b"while draining")
            assert proxy.parked(1)
            assert proxy.proc.alive()
            sock.sendall(frame(BINARY, b"x" * 601))  # over max_frame_bytes
            assert client_closes(sock) == [1009]
            assert upstream_closes(conn) == [1001]
        assert proxy.proc.wait_exit() == 0
        line = proxy.tunnel_line(path)
        assert (line["first_close"], line["messages_in"], line["messages_out"]) == ("policy", 2, 2)


def test_the_drain_deadline_cuts_a_parked_websocket_tunnel(tmp_path: Path) -> None:
    with parked_proxy(tmp_path, timeouts={"drain": 0.5}) as proxy:
        path = "/limits/drain-deadline"
        sock, _ = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"one")
            assert proxy.parked(1)
            proxy.proc.signal(signal.SIGTERM)
            assert closed_by_peer(sock)
        assert proxy.proc.wait_exit() == 0
        line = proxy.tunnel_line(path)
        assert (line["first_close"], line["messages_in"], line["messages_out"]) == (
            "cancelled", 1, 1,
        )  # fmt: skip


def test_drain_spread_closes_a_parked_websocket_tunnel(tmp_path: Path) -> None:
    with parked_proxy(tmp_path, drain_tunnels="spread", timeouts={"drain": 1}) as proxy:
        path = "/limits/spread"
        sock, _ = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"one")
            assert proxy.parked(1)
            proxy.proc.signal(signal.SIGTERM)
            assert closed_by_peer(sock)
        assert proxy.proc.wait_exit() == 0
        assert proxy.tunnel_line(path)["first_close"] == "drain"


def test_sigusr2_leaves_a_parked_websocket_tunnel_with_the_old_process(tmp_path: Path) -> None:
    """The old process keeps its parked tunnel, which still relays, counts and checks frames
    (a broken one gets its Close codes there), and exits once it has closed."""
    with parked_proxy(tmp_path, timeouts={"upgrade_grace": 600}) as proxy:
        path = "/limits/sigusr2"
        sock, conn = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"before")
            assert proxy.parked(1)
            proxy.proc.signal(signal.SIGUSR2)
            new = proxy.proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
            try:
                exchange(proxy, sock, path, b"old process, parked tunnel")
                assert proxy.proc.alive()
                sock.sendall(frame(TEXT, b"unmasked", mask=False))
                assert client_closes(sock) == [1002]
                assert upstream_closes(conn) == [1001]
                assert proxy.proc.wait_exit() == 0
            finally:
                os.kill(new, signal.SIGTERM)
        line = proxy.tunnel_line(path)
        assert (line["first_close"], line["messages_in"], line["messages_out"]) == ("policy", 2, 2)
        assert "masking" in line["error"]


def test_upgrade_grace_cuts_a_parked_websocket_tunnel(tmp_path: Path) -> None:
    with parked_proxy(tmp_path, timeouts={"upgrade_grace": 0.5}) as proxy:
        path = "/limits/grace"
        sock, _ = proxy.raw_pair(path)
        with sock:
            exchange(proxy, sock, path, b"one")
            assert proxy.parked(1)
            proxy.proc.signal(signal.SIGUSR2)
            new = proxy.proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
            try:
                assert closed_by_peer(sock)
                assert proxy.proc.wait_exit() == 0
            finally:
                os.kill(new, signal.SIGTERM)
        line = proxy.tunnel_line(path)
        assert (line["first_close"], line["messages_in"]) == ("cancelled", 1)
