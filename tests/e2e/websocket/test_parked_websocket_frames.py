"""Rule 18 on parked tunnels: a WebSocket-aware route's tunnel parks when idle like any other,
and keeps its frame state exactly through the parked spell: message counts, the place in a
frame and in a fragmented message, the rate bucket (refilled by time while parked), and every
check, closed with the same Close frames on frame boundaries as a running tunnel.

Each test parks the tunnel (checked on `upgradeproxy_tunnels_parked`) before the bytes under
test reach it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.support.clients import read_until_close, recv_exactly
from tests.support.parked_websocket import EARLY_DOWN, Parked, parked_proxy
from tests.support.waiting import WAIT
from tests.support.ws_frames import BINARY, CONT, PING, TEXT, close_code, frame, frames_of

GOOD_UP = frame(TEXT, b"hello") + frame(PING, b"p")
GOOD_DOWN = frame(TEXT, b"welcome", mask=False)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Parked]:
    with parked_proxy(tmp_path) as running:
        yield running


def test_messages_after_a_parked_spell_pass_and_are_counted(proxy: Parked) -> None:
    """Messages to a parked tunnel (text, binary, fragmented, a payload long enough to be
    spliced) arrive unchanged; the tunnel parks again after each quiet spell; its log line and
    the route's metric count every message each way."""
    path = "/echo/chat"
    big = os.urandom(300_000)
    with connect(proxy.url(path), compression=None, max_size=None) as ws:
        ws.send("before")
        assert ws.recv(timeout=WAIT) == "before"
        assert proxy.parked(1)
        ws.send("after a parked spell")
        assert ws.recv(timeout=WAIT) == "after a parked spell"
        ws.send(["frag", "ment", "ed"])
        assert ws.recv(timeout=WAIT) == "fragmented"
        assert proxy.parked(1)
        ws.send(big)
        assert ws.recv(timeout=WAIT) == big
        ws.ping(b"not a message").wait(WAIT)
        assert proxy.parked(1)
        ws.send(b"\x00\xff")
        assert ws.recv(timeout=WAIT) == b"\x00\xff"
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line["messages_out"]) == (5, 5)
    assert line["first_close"] in ("client", "upstream")
    assert "error" not in line
    for direction in ("up", "down"):
        counted = proxy.metric(
            "upgradeproxy_websocket_messages_total", route="*/echo", direction=direction
        )
        assert counted == 5
    assert proxy.parked(0)
    assert proxy.metric("upgradeproxy_tunnels_active") == 0


def test_bytes_that_came_with_the_handshake_are_read_as_frames_too(proxy: Parked) -> None:
    """A frame the client sent behind its request head, and one the server sent behind its
    101, pass their gates and are counted; the parked tunnel then still refuses a bad one."""
    path = "/limits/early"
    early_up = frame(TEXT, b"sent with the request")
    sock, conn = proxy.raw_pair(path, early=early_up)
    with sock:
        assert recv_exactly(sock, len(EARLY_DOWN), bytearray(proxy.rest)) == EARLY_DOWN
        assert conn.read_exactly(len(early_up)) == early_up
        assert proxy.parked(1)
        sock.sendall(frame(BINARY, b"x" * 601))
        assert [close_code(f) for f in frames_of(read_until_close(sock), masked=False)] == [1009]
        assert [close_code(f) for f in frames_of(conn.read_until_close(), masked=True)] == [1001]
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line["messages_out"], line["first_close"]) == (1, 1, "policy")


def test_a_frame_and_a_header_split_by_parked_spells_are_read_whole(proxy: Parked) -> None:
    """The tunnel parks half-way through a frame's payload, and again after the first byte of
    the next frame's header: each frame still reaches the upstream whole and is counted once,
    and the bytes after them are still read as frames (an unmasked one is refused)."""
    path = "/limits/split"
    sock, conn = proxy.raw_pair(path)
    first, second = frame(BINARY, b"a" * 500), frame(TEXT, b"second")
    with sock:
        sock.sendall(first[:200])
        assert conn.read_exactly(200) == first[:200]
        assert proxy.parked(1)  # mid-payload
        sock.sendall(first[200:] + second[:1])
        assert conn.read_exactly(len(first) - 200) == first[200:]
        assert proxy.parked(1)  # one byte of a header held
        sock.sendall(second[1:])
        assert conn.read_exactly(len(second)) == second
        assert proxy.parked(1)
        sock.sendall(frame(TEXT, b"unmasked", mask=False))
        client_got = frames_of(read_until_close(sock), masked=False)
        upstream_got = frames_of(conn.read_until_close(), masked=True)
    assert [close_code(f) for f in client_got] == [1002]
    assert [close_code(f) for f in upstream_got] == [1001]
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line["first_close"]) == (2, "policy")
    assert "masking" in line["error"]


@pytest.mark.parametrize(
    ("before", "bad", "code", "rule"),
    [
        pytest.param(b"", frame(BINARY, b"f" * 601), 1009, "max_frame_bytes",
                     id="a frame over max_frame_bytes"),
        pytest.param(frame(BINARY, b"m" * 500, fin=False), frame(CONT, b"m" * 501), 1009,
                     "max_message_bytes", id="a message over max_message_bytes begun before"),
        pytest.param(b"", frame(TEXT, b"no mask", mask=False), 1002, "masking",
                     id="an unmasked client frame"),
    ],
)  # fmt: skip
def test_a_client_breaking_a_rule_on_a_parked_tunnel_gets_the_close_on_a_frame_boundary(
    proxy: Parked, before: bytes, bad: bytes, code: int, rule: str
) -> None:
    """The frames before the offending one arrive whole, none of its bytes do; the client gets
    the rule's Close, the upstream a masked Close 1001; first_close policy, error names it."""
    path = f"/limits/client-{rule}"
    sock, conn = proxy.raw_pair(path)
    with sock:
        conn.send(GOOD_DOWN)
        welcome = recv_exactly(sock, len(GOOD_DOWN))
        sock.sendall(GOOD_UP + before)
        assert conn.read_exactly(len(GOOD_UP + before)) == GOOD_UP + before
        assert proxy.parked(1)
        sock.sendall(bad + frame(TEXT, b"never"))
        upstream_got = frames_of(GOOD_UP + before + conn.read_until_close(), masked=True)
        client_got = frames_of(welcome + read_until_close(sock), masked=False)
    expected_up = [b"hello", b"p"] + ([b"m" * 500] if before else [])
    assert [f.data for f in upstream_got[:-1]] == expected_up
    assert close_code(upstream_got[-1]) == 1001
    assert [f.data for f in client_got[:-1]] == [b"welcome"]
    assert close_code(client_got[-1]) == code
    line = proxy.tunnel_line(path)
    assert (line["first_close"], line["messages_in"], line["messages_out"]) == ("policy", 1, 1)
    assert rule in line["error"]
    closes = proxy.metric("upgradeproxy_websocket_closes_total", route="*/limits", code=str(code))
    assert closes == 1
    assert proxy.parked(0)


def test_a_server_breaking_a_rule_on_a_parked_tunnel_gets_1002_and_the_client_1001(
    proxy: Parked,
) -> None:
    path = "/limits/server-masked"
    sock, conn = proxy.raw_pair(path)
    with sock:
        sock.sendall(GOOD_UP)
        assert conn.read_exactly(len(GOOD_UP)) == GOOD_UP
        assert proxy.parked(1)
        conn.send(GOOD_DOWN + frame(TEXT, b"masked") + GOOD_DOWN)
        client_got = frames_of(read_until_close(sock), masked=False)
        upstream_got = frames_of(conn.read_until_close(), masked=True)
    assert [f.data for f in client_got[:-1]] == [b"welcome"]
    assert close_code(client_got[-1]) == 1001
    assert [close_code(f) for f in upstream_got] == [1002]  # masked: `masked=True` checked it
    line = proxy.tunnel_line(path)
    assert (line["first_close"], line["messages_out"]) == ("policy", 1)
    assert "masking" in line["error"]


def test_the_rate_bucket_refills_while_the_tunnel_is_parked(proxy: Parked) -> None:
    """messages_per_second: 5. A burst of 5 empties the bucket; after a parked spell longer
    than a full refill, a burst of 5 passes again and the 6th is refused with 1008: the
    bucket refilled by time while parked, and not past its size."""
    path = "/rate/burst"
    sock, conn = proxy.raw_pair(path)
    burst = [frame(TEXT, str(i).encode()) for i in range(5)]
    with sock:
        sock.sendall(b"".join(burst))
        assert conn.read_exactly(len(b"".join(burst))) == b"".join(burst)
        emptied = time.monotonic()
        assert proxy.parked(1)
        # The condition under test: parked for longer than the 1 s a full refill takes.
        time.sleep(max(0.0, emptied + 1.5 - time.monotonic()))
        assert proxy.metric("upgradeproxy_tunnels_parked") == 1
        again = [frame(TEXT, str(i).encode()) for i in range(5, 11)]
        with contextlib.suppress(OSError):
            sock.sendall(b"".join(again))  # one write: no token refills during it
        upstream_got = frames_of(conn.read_until_close(), masked=True)
        client_got = frames_of(read_until_close(sock), masked=False)
    assert [f.data.decode() for f in upstream_got[:-1]] == [str(i) for i in range(5, 10)]
    assert close_code(upstream_got[-1]) == 1001
    assert [close_code(f) for f in client_got] == [1008]
    line = proxy.tunnel_line(path)
    assert (line["messages_in"], line["first_close"]) == (10, "policy")
    assert "messages_per_second" in line["error"]
