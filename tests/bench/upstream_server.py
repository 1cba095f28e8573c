"""The bench's WebSocket upstream: raw sockets and one epoll loop per process.

    python tests/bench/upstream_server.py --port 9000 --procs 2

It must never be the bottleneck, so it is the least a server can do: no HTTP library, no
frame library, a prebuilt 101 per key, bulk bytes moved with splice(2) into /dev/null and
sendfile(2) out of a memfd (the payload never enters Python). `--procs` processes each bind
the port with SO_REUSEPORT so the kernel spreads connections over them.

Paths (see wire.py): /echo (WebSocket echo), /hs (101, then wait for close), /sink?n=N
(101, swallow N bytes, answer the count; with &f=1, in a WebSocket frame), /source?n=N
(101, send N bytes, half-close; with &f=F, whole WebSocket frames of F-byte payloads).
The sink answers after N bytes rather than at EOF because nginx does not propagate a
half-close through an upgraded connection: the client's FIN makes it close both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
from collections.abc import Callable
from typing import Final

import wire  # a sibling module: a script's own directory is sys.path[0]

BULK: Final = 1 << 20  # bytes per splice/sendfile call
SOURCE_FILE_SIZE: Final = 8 << 20
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_READ: Final = select.EPOLLIN | select.EPOLLRDHUP
_WRITE: Final = select.EPOLLOUT

# Connection phases.
HEAD, ECHO, DRAIN, SINK, SOURCE = range(5)


class Conn:
    """One accepted connection and where it is in its short life."""

    __slots__ = (
        "buf", "count", "fd", "framed", "phase", "pipe", "sock", "source", "todo", "write",
    )  # fmt: skip

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.phase = HEAD
        self.count = 0  # SINK: bytes swallowed; SOURCE: bytes sent
        self.todo = 0  # SINK: bytes still expected; SOURCE: bytes still to send
        self.pipe: tuple[int, int] | None = None
        self.write = BULK  # SOURCE: bytes per sendfile call (/source?n=N&w=W)
        self.source = (-1, SOURCE_FILE_SIZE)  # SOURCE: (memfd, its size) to send from
        self.framed = False  # SINK: answer the count in a WebSocket frame (/sink?n=N&f=1)


class Server:
    """One process's accept + epoll loop."""

    def __init__(self, port: int, backlog: int) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.responses: dict[bytes, bytes] = {}  # key -> prebuilt 101
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        self.source_fd = _source_file()
        self.framed: dict[int, tuple[int, int]] = {}  # payload size -> (memfd of frames, size)
        self.handlers: dict[int, Callable[[Conn, int], None]] = {
            HEAD: self._on_head,
            ECHO: self._on_echo,
            DRAIN: self._on_drain,
            SINK: self._on_sink,
            SOURCE: self._on_source,
        }

    def serve_forever(self) -> None:
        listen_fd = self.listener.fileno()
        while True:
            for fd, events in self.ep.poll():
                if fd == listen_fd:
                    self._accept()
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                try:
                    self.handlers[conn.phase](conn, events)
                except OSError:
                    self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: retry on the next wakeup
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, _READ)

    def _close(self, conn: Conn) -> None:
        if self.conns.pop(conn.fd, None) is None:
            return
        with contextlib.suppress(OSError):
            self.ep.unregister(conn.fd)
        if conn.pipe is not None:
            os.close(conn.pipe[0])
            os.close(conn.pipe[1])
        conn.sock.close()

    # --- the request head ------------------------------------------------------------

    def _on_head(self, conn: Conn, events: int) -> None:
        data = conn.sock.recv(65536)
        if not data:
            self._close(conn)
            return
        conn.buf += data
        end = conn.buf.find(wire.HEAD_END)
        if end < 0:
            if len(conn.buf) > wire.MAX_HEAD:
                self._close(conn)
            return
        head = bytes(conn.buf[:end])
        rest = conn.buf[end + 4 :]
        conn.buf = bytearray()
        path, key = _parse_head(head)
        if key is None:
            conn.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self._close(conn)
            return
        response = self.responses.get(key)
        if response is None:
            response = self.responses[key] = wire.switching_response(key)
        conn.sock.sendall(response)
        route, _, query = path.partition("?")
        if route == wire.PATH_ECHO:
            conn.phase = ECHO
            if rest:
                conn.buf = rest
                self._echo_frames(conn)
        elif route == wire.PATH_SINK:
            conn.phase = SINK
            conn.count = len(rest)
            args = _query(query)
            conn.todo = args["n"] - len(rest)
            conn.framed = bool(args.get("f", 0))
            conn.pipe = _pipe()
        elif route == wire.PATH_SOURCE:
            conn.phase = SOURCE
            args = _query(query)
            conn.todo = args["n"]
            conn.write = args.get("w", BULK)
            conn.source = (self.source_fd, SOURCE_FILE_SIZE)
            if frame := args.get("f", 0):  # whole WebSocket frames, for a route that reads them
                if frame not in self.framed:
                    fd, _ = wire.framed_file(frame, masked=False)
                    self.framed[frame] = (fd, os.fstat(fd).st_size)
                conn.source = self.framed[frame]
            self.ep.modify(conn.fd, _WRITE)
        else:  # /hs and anything else: hold the tunnel open until the peer closes it
            conn.phase = DRAIN

    # --- after the 101 ---------------------------------------------------------------

    def _on_echo(self, conn: Conn, events: int) -> None:
        data = conn.sock.recv(65536)
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._echo_frames(conn)

    def _echo_frames(self, conn: Conn) -> None:
        out: list[bytes] = []
        closing = False
        while (frame := wire.parse_frame(conn.buf)) is not None:
            opcode, payload, used = frame
            del conn.buf[:used]
            if opcode == wire.OP_CLOSE:
                out.append(wire.server_frame(payload[:2], wire.OP_CLOSE))
                closing = True
                break
            if opcode == wire.OP_PING:
                out.append(wire.server_frame(payload, wire.OP_PONG))
            elif opcode != wire.OP_PONG:
                out.append(wire.server_frame(payload, opcode))
        if out:
            conn.sock.sendall(b"".join(out))
        if closing:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.phase = DRAIN

    def _on_drain(self, conn: Conn, events: int) -> None:
        # Discard whatever comes; the peer's close ends it.
        if not conn.sock.recv(65536):
            self._close(conn)

    def _on_sink(self, conn: Conn, events: int) -> None:
        assert conn.pipe is not None
        pipe_r, pipe_w = conn.pipe
        while conn.todo > 0:
            try:
                n = os.splice(conn.fd, pipe_w, min(BULK, conn.todo), flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            if n == 0:
                break  # EOF before N bytes: report the shortfall
            conn.count += n
            conn.todo -= n
            while n:  # /dev/null takes everything at once, but never assume
                n -= os.splice(pipe_r, self.devnull, n, flags=_SPLICE_FLAGS)
        # Report what arrived so the client can stop its clock and check it.
        count = struct.pack("!Q", conn.count)
        conn.sock.sendall(wire.server_frame(count) if conn.framed else count)
        conn.phase = DRAIN

    def _on_source(self, conn: Conn, events: int) -> None:
        fd, file_size = conn.source
        while conn.todo:
            offset = conn.count % file_size
            size = min(conn.write, conn.todo, file_size - offset)
            try:
                sent = os.sendfile(conn.fd, fd, offset, size)
            except BlockingIOError:
                return
            conn.count += sent
            conn.todo -= sent
        conn.sock.shutdown(socket.SHUT_WR)
        conn.phase = DRAIN
        self.ep.modify(conn.fd, _READ)


def _query(query: str) -> dict[str, int]:
    """`n=1024&w=4096` -> {"n": 1024, "w": 4096}."""
    return {k: int(v) for k, _, v in (p.partition("=") for p in query.split("&") if p)}


def _parse_head(head: bytes) -> tuple[str, bytes | None]:
    """(path, Sec-WebSocket-Key or None) of a request head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    path = parts[1].decode("latin-1") if len(parts) == 3 else "/"
    key = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    return path, key


def _pipe() -> tuple[int, int]:
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger pipe means fewer splice calls; best effort
        fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, BULK)
    return pipe_r, pipe_w


def _source_file() -> int:
    """A memfd full of bytes for sendfile: the page cache is the send buffer."""
    fd = os.memfd_create("bench-source")
    chunk = bytes(range(256)) * 4096  # 1 MiB of a recognisable pattern
    for _ in range(SOURCE_FILE_SIZE // len(chunk)):
        os.write(fd, chunk)
    return fd


def _worker(port: int, backlog: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    Server(port, backlog).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    children: list[int] = []
    for _ in range(max(1, args.procs)):
        pid = os.fork()
        if pid == 0:
            try:
                _worker(args.port, args.backlog)
            finally:
                os._exit(1)
        children.append(pid)

    # The parent only supervises: a TERM to it (or to the process group) ends everyone.
    def stop(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    os.wait()  # one worker died: take the others down too, so the bench notices
    stop(signal.SIGTERM, None)


if __name__ == "__main__":
    main()
