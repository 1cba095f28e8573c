"""Connecting to an upstream server over real loopback sockets.

A connect to an IP literal is started without a checkpoint and, when the kernel completed it
within connect(2) (loopback, a sidecar), returned without a wait; these are the behaviours
that shortcut must keep: refusals and timeouts as ConnectFailed, names still resolved, the
PROXY preamble first, TCP_NODELAY on the stream.
"""

from __future__ import annotations

import socket

import pytest
import trio

from tests.support.clients import free_port, recv_exactly
from tests.support.peers import blackhole
from upgradeproxy.config.model import Address, Server
from upgradeproxy.upstream.connections import ConnectFailed, connect


def _listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


async def _first_bytes(listener: socket.socket, n: int) -> bytes:
    """Accept one connection and return its first `n` bytes."""
    conn, _ = await trio.to_thread.run_sync(listener.accept)
    with conn:
        conn.settimeout(5)
        return await trio.to_thread.run_sync(recv_exactly, conn, n)


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
async def test_a_loopback_connect_gives_a_connected_nodelay_stream(family: int, host: str) -> None:
    try:
        listener = _listener(family, host)
    except OSError:
        pytest.skip(f"no {host} on this machine")
    with listener:
        port = listener.getsockname()[1]
        stream = await connect(Server(Address(host, port)), 5.0, None, None)
        assert isinstance(stream, trio.SocketStream)
        assert stream.socket.getpeername()[:2] == (host, port)
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def server() -> None:
                got.append(await _first_bytes(listener, 5))

            nursery.start_soon(server)
            await stream.send_all(b"hello")
        assert got == [b"hello"]
        await stream.aclose()


async def test_a_refused_connect_fails_at_once_and_is_not_a_timeout() -> None:
    server = Server(Address("127.0.0.1", free_port()))
    with pytest.raises(ConnectFailed) as caught:
        await connect(server, 5.0, None, None)
    assert not caught.value.timed_out
    assert "Connection refused" in str(caught.value)
    assert str(server.address) in str(caught.value)


async def test_a_server_that_never_accepts_times_out() -> None:
    hole, fillers = blackhole()
    try:
        server = Server(Address("127.0.0.1", hole.getsockname()[1]))
        with trio.fail_after(5):
            with pytest.raises(ConnectFailed) as caught:
                await connect(server, 0.2, None, None)
        assert caught.value.timed_out
        assert "timed out after 0.2s" in str(caught.value)
    finally:
        for s in (hole, *fillers):
            s.close()


async def test_a_name_is_resolved() -> None:
    with _listener() as listener:
        port = listener.getsockname()[1]
        try:
            stream = await connect(Server(Address("localhost", port)), 5.0, None, None)
        except ConnectFailed as exc:
            pytest.skip(f"localhost does not resolve to 127.0.0.1 here: {exc}")
        assert isinstance(stream, trio.SocketStream)
        await stream.aclose()


HEADER = b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n"


@pytest.mark.parametrize("as_function", [False, True])
async def test_the_preamble_is_the_first_thing_sent(as_function: bool) -> None:
    with _listener() as listener:
        port = listener.getsockname()[1]
        seen: list[int] = []

        def build(tcp: trio.SocketStream) -> bytes:
            seen.append(tcp.socket.getsockname()[1])  # built from the connected socket
            return HEADER

        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                got.append(await _first_bytes(listener, len(HEADER) + 3))

            nursery.start_soon(server)
            server_ = Server(Address("127.0.0.1", port))
            stream = await connect(server_, 5.0, None, None, build if as_function else HEADER)
            await stream.send_all(b"GET")
        assert got == [HEADER + b"GET"]
        assert isinstance(stream, trio.SocketStream)
        assert seen == ([stream.socket.getsockname()[1]] if as_function else [])
        await stream.aclose()
