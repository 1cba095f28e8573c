"""Bench clients: raw sockets, prebuilt bytes, no WebSocket library on the measured path.

Throughput, round trips and idle tunnels run inside the orchestrator (bench.py), which is
otherwise idle. The handshake load runs as separate processes:

    python tests/bench/loadgen.py handshakes --port 8080 --conns 32 --seconds 10

which print one JSON line: {"ok": N, "errors": N, "seconds": S}.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

import wire  # a sibling module: a script's own directory is sys.path[0]

LOOPBACK: Final = "127.0.0.1"
BULK: Final = 1 << 20
SOURCE_FILE_SIZE: Final = 8 << 20
IO_TIMEOUT: Final = 30.0  # no single socket operation of the bench may hang longer
RTT_PAYLOAD: Final = bytes(range(32))


class BenchError(Exception):
    """A target answered something other than what the bench expects."""


def _connect(port: int) -> socket.socket:
    """A blocking, Nagle-free socket whose reads and writes time out in the kernel.

    Kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) rather than Python's: a Python timeout makes
    the fd non-blocking and adds a poll() before every call, which would cost the round-trip
    client a syscall per message and break blocking sendfile/splice.
    """
    sock = socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT)
    sock.settimeout(None)
    limit = struct.pack("ll", int(IO_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head through the blank line, bytes after it) of a response."""
    buf = b""
    while (end := buf.find(wire.HEAD_END)) < 0:
        data = sock.recv(65536)
        if not data:
            raise BenchError(f"connection closed before a full response head: {buf[:200]!r}")
        buf += data
        if len(buf) > wire.MAX_HEAD and buf.find(wire.HEAD_END, 0, wire.MAX_HEAD) < 0:
            raise BenchError("response head too large")
    return buf[: end + 4], buf[end + 4 :]


def open_tunnel(port: int, path: str) -> tuple[socket.socket, bytes]:
    """Connect, upgrade on `path`, check the 101; (socket, bytes that followed the head)."""
    sock = _connect(port)
    try:
        sock.sendall(wire.handshake_request(path))
        head, rest = _read_head(sock)
        if not wire.head_ok(head):
            raise BenchError(f"not a valid 101 for {path}: {head[:300]!r}")
    except BaseException:
        sock.close()
        raise
    return sock, rest


# --- 1. tunnel throughput --------------------------------------------------------------


def _source_file() -> int:
    fd = os.memfd_create("bench-upload")
    chunk = bytes(range(256)) * 4096
    for _ in range(SOURCE_FILE_SIZE // len(chunk)):
        os.write(fd, chunk)
    return fd


def upload(
    port: int, nbytes: int, clock: Callable[[str], None], write: int = BULK, framed: int = 0
) -> float:
    """Send `nbytes` through a tunnel to /sink; seconds from first byte to the sink's count.

    `write`: bytes per sendfile call (1 MiB by default; smaller is like a client that writes
    one WebSocket message at a time). `framed`: send masked WebSocket frames of this payload
    size instead of raw bytes (`nbytes` rounded to whole frames), for a route that reads them.

    No half-close: nginx would take the client's FIN as the end of both directions.

    `clock("start")`/`clock("stop")` bracket the timed part so the caller can sample CPU
    over exactly that window.
    """
    if framed:
        src, unit = wire.framed_file(framed, masked=True)
        nbytes = max(1, nbytes // unit) * unit
        file_size = os.fstat(src).st_size
    else:
        src, file_size = _source_file(), SOURCE_FILE_SIZE
    sock, rest = open_tunnel(port, f"{wire.PATH_SINK}?n={nbytes}" + ("&f=1" if framed else ""))
    reply_size = len(wire.server_frame(bytes(8))) if framed else 8
    try:
        if rest:
            raise BenchError(f"unexpected bytes after the 101: {rest[:50]!r}")
        clock("start")
        started = time.perf_counter()
        sent = 0
        while sent < nbytes:
            offset = sent % file_size
            # sendfile: the payload goes page cache -> socket without a copy through Python.
            sent += os.sendfile(
                sock.fileno(), src, offset, min(write, nbytes - sent, file_size - offset)
            )
        reply = b""
        while len(reply) < reply_size:
            data = sock.recv(reply_size - len(reply))
            if not data:
                raise BenchError("sink closed before reporting its count")
            reply += data
        elapsed = time.perf_counter() - started
        clock("stop")
        (got,) = struct.unpack("!Q", reply[-8:])
        if got != nbytes:
            raise BenchError(f"sink received {got} bytes, sent {nbytes}")
        return elapsed
    finally:
        os.close(src)
        sock.close()


def download(
    port: int, nbytes: int, clock: Callable[[str], None], write: int = BULK, framed: int = 0
) -> float:
    """Receive `nbytes` through a tunnel from /source; seconds from the 101 to the last byte.

    `write`: bytes per sendfile call of the upstream. `framed`: the upstream sends WebSocket
    frames of this payload size instead of raw bytes (`nbytes` rounded to whole frames).
    """
    query = f"n={nbytes}&w={write}"
    if framed:
        unit = len(wire.server_frame(bytes(framed)))
        nbytes = max(1, nbytes // unit) * unit
        query = f"n={nbytes}&w={write}&f={framed}"
    clock("start")
    sock, rest = open_tunnel(port, f"{wire.PATH_SOURCE}?{query}")
    started = time.perf_counter()
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, BULK)
        got = len(rest)
        fd = sock.fileno()
        while got < nbytes:
            # splice socket -> pipe -> /dev/null: the payload is never copied into Python.
            n = os.splice(fd, pipe_w, min(BULK, nbytes - got))
            if n == 0:
                break
            got += n
            while n:
                n -= os.splice(pipe_r, devnull, n)
        elapsed = time.perf_counter() - started
        clock("stop")
        if got != nbytes:
            raise BenchError(f"received {got} bytes, source sent {nbytes}")
        return elapsed
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
        os.close(devnull)
        sock.close()


# --- 2. round trips ----------------------------------------------------------------------


def round_trips(port: int, count: int, warmup: int) -> list[int]:
    """`count` timed echo round trips (ns) of one 32-byte message, one in flight."""
    sock, rest = open_tunnel(port, wire.PATH_ECHO)
    try:
        if rest:
            raise BenchError(f"unexpected bytes after the 101: {rest[:50]!r}")
        frame = wire.client_frame(RTT_PAYLOAD)
        expected = wire.server_frame(RTT_PAYLOAD)
        size = len(expected)
        buf = bytearray(size)
        view = memoryview(buf)
        samples: list[int] = []
        clock = time.perf_counter_ns
        send, recv_into = sock.send, sock.recv_into
        for i in range(warmup + count):
            t0 = clock()
            send(frame)  # 38 bytes always fit an empty send buffer: one syscall
            got = 0
            while got < size:
                n = recv_into(view[got:])
                if not n:
                    raise BenchError("echo closed the tunnel")
                got += n
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
        if buf != expected:
            raise BenchError(f"echo answered {bytes(buf)!r}, expected {expected!r}")
        _close_ws(sock)
        return samples
    finally:
        sock.close()


def quiet_round_trips(port: int, tunnels: int, quiet: float) -> tuple[list[int], list[int]]:
    """Round trips (ns) of the first message on each of `tunnels` tunnels left quiet for
    `quiet` seconds or more, and of the message right after each: (first, next)."""
    socks = open_idle_tunnels(port, tunnels)
    frame = wire.client_frame(RTT_PAYLOAD)
    expected = wire.server_frame(RTT_PAYLOAD)
    clock = time.perf_counter_ns
    first: list[int] = []
    then: list[int] = []
    try:
        time.sleep(quiet)
        for sock in socks:
            for samples in (first, then):
                t0 = clock()
                sock.send(frame)
                reply = b""
                while len(reply) < len(expected):
                    data = sock.recv(len(expected) - len(reply))
                    if not data:
                        raise BenchError("echo closed a quiet tunnel")
                    reply += data
                samples.append(clock() - t0)
                if reply != expected:
                    raise BenchError(f"bad echo on a quiet tunnel: {reply!r}")
    finally:
        close_all(socks)
    return first, then


def _close_ws(sock: socket.socket) -> None:
    """Polite WebSocket close; errors here do not matter to the measurement."""
    with contextlib.suppress(OSError):
        sock.sendall(wire.client_frame(b"\x03\xe8", wire.OP_CLOSE))
        sock.shutdown(socket.SHUT_WR)


# --- 4. idle tunnels ---------------------------------------------------------------------


def open_idle_tunnels(port: int, count: int, batch: int = 200) -> list[socket.socket]:
    """`count` tunnels to /echo, each having carried one 32-byte echo, left open.

    Batched (connect all, then handshake all, then echo all) so 5,000 tunnels take seconds,
    while the number of half-open handshakes stays below any listen backlog.
    """
    frame = wire.client_frame(RTT_PAYLOAD)
    expected = wire.server_frame(RTT_PAYLOAD)
    request = wire.handshake_request(wire.PATH_ECHO)
    opened: list[socket.socket] = []
    try:
        while len(opened) < count:
            group = [_connect(port) for _ in range(min(batch, count - len(opened)))]
            opened.extend(group)
            for sock in group:
                sock.sendall(request)
            for sock in group:
                head, rest = _read_head(sock)
                if not wire.head_ok(head) or rest:
                    raise BenchError(f"bad 101 for an idle tunnel: {head[:200]!r}")
            for sock in group:
                sock.sendall(frame)
            for sock in group:
                reply = b""
                while len(reply) < len(expected):
                    data = sock.recv(len(expected) - len(reply))
                    if not data:
                        raise BenchError("echo closed an idle tunnel")
                    reply += data
                if reply != expected:
                    raise BenchError(f"bad echo on an idle tunnel: {reply!r}")
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


# --- 3. handshakes (a separate process) -------------------------------------------------


def handshakes(port: int, conns: int, seconds: float) -> dict[str, float]:
    """Keep `conns` connect/Upgrade/101/close cycles in flight for `seconds`.

    One epoll loop, non-blocking sockets; each cycle writes the prebuilt request, reads the
    head, checks Sec-WebSocket-Accept by comparing bytes, and closes.
    """
    request = wire.handshake_request(wire.PATH_HANDSHAKE)
    addr = (LOOPBACK, port)
    ep = select.epoll()
    live: dict[int, tuple[socket.socket, bytearray]] = {}
    connecting: set[int] = set()
    ok = errors = 0
    started = time.monotonic()
    deadline = started + seconds
    hard_stop = deadline + 10.0  # in-flight cycles get this long to finish, then we give up

    def start() -> None:
        nonlocal errors
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err == 0:  # loopback often connects at once: send now, skip a poll round
            sock.send(request)
            live[sock.fileno()] = (sock, bytearray())
            ep.register(sock.fileno(), select.EPOLLIN)
        elif err == errno.EINPROGRESS:
            live[sock.fileno()] = (sock, bytearray())
            connecting.add(sock.fileno())
            ep.register(sock.fileno(), select.EPOLLOUT)
        else:
            errors += 1
            sock.close()

    def finish(fd: int, sock: socket.socket, good: bool) -> None:
        nonlocal ok, errors
        ep.unregister(fd)
        del live[fd]
        connecting.discard(fd)
        sock.close()
        if good:
            ok += 1
        else:
            errors += 1
        if time.monotonic() < deadline:
            start()

    for _ in range(conns):
        start()
    while live and time.monotonic() < hard_stop:
        for fd, events in ep.poll(1.0):
            sock, buf = live[fd]
            if fd in connecting:  # the connect finished (or failed)
                if events & (select.EPOLLERR | select.EPOLLHUP):
                    finish(fd, sock, False)
                    continue
                connecting.discard(fd)
                try:
                    sock.send(request)
                except OSError:
                    finish(fd, sock, False)
                    continue
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                finish(fd, sock, False)
                continue
            if not data:
                finish(fd, sock, False)
                continue
            buf += data
            end = buf.find(wire.HEAD_END)
            if end >= 0:
                finish(fd, sock, wire.head_ok(bytes(buf[: end + 4])))
            elif len(buf) > wire.MAX_HEAD:
                finish(fd, sock, False)
    elapsed = time.monotonic() - started
    for sock, _ in live.values():
        sock.close()
    return {"ok": ok, "errors": errors + len(live), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description="bench load generator")
    sub = parser.add_subparsers(dest="command", required=True)
    hs = sub.add_parser("handshakes", help="connect/Upgrade/101/close in a loop")
    hs.add_argument("--port", type=int, required=True)
    hs.add_argument("--conns", type=int, default=32)
    hs.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(handshakes(args.port, args.conns, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
