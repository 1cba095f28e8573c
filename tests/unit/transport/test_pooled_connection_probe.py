"""`looks_closed`: the check of an idle pooled upstream connection before it is reused."""

from __future__ import annotations

import os
import resource
import socket

import pytest
import trio

from upgradeproxy.transport.streams import looks_closed


def _high_fd_pair(fd: int) -> tuple[trio.SocketStream, socket.socket]:
    """A connected pair whose proxy side sits on descriptor `fd` (select() cannot take >= 1024)."""
    ours, theirs = socket.socketpair()
    os.dup2(ours.fileno(), fd)
    ours.close()
    high = socket.socket(fileno=fd)
    high.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(high)), theirs


@pytest.mark.parametrize("fd", [None, 1500], ids=["low-descriptor", "descriptor-1500"])
@pytest.mark.parametrize(
    ("peer_does", "closed"),
    [("nothing", False), ("sends", True), ("closes", True)],
    ids=["idle", "talks-out-of-turn", "closed"],
)
async def test_an_idle_connection_is_closed_only_when_readable(
    fd: int | None, peer_does: str, closed: bool
) -> None:
    if fd is not None and resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= fd:
        pytest.skip("the descriptor limit is below the test's descriptor")
    if fd is None:
        a, theirs = socket.socketpair()
        a.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    else:
        stream, theirs = _high_fd_pair(fd)
    try:
        if peer_does == "sends":
            theirs.sendall(b"x")
        elif peer_does == "closes":
            theirs.close()
        assert looks_closed(stream) is closed
        assert looks_closed(stream) is closed  # a peek: nothing was consumed
    finally:
        stream.socket.close()
        theirs.close()
