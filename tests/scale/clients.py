"""One client process of the scale run: holds its share of WebSocket tunnels through the proxy
and does what the orchestrator (scale.py) asks on stdin, one JSON answer per line on stdout.

    open                  open --count tunnels, each from its own loopback source address
    echo SEED K           echo one frame on K tunnels picked with SEED (K = -1: on all)
    wake FRACTION         send one frame on that share of the tunnels at once; time the echoes
    closed TIMEOUT        wait until every tunnel is closed by the proxy (a drain)
    quit

Sources spread over 127.0.0.0/8 (127.<10+index>.x.y), so source ports never run out.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import sys
import time
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import wire

IO_TIMEOUT: Final = 30.0
BATCH: Final = 250
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PAYLOAD: Final = b"scale-run ping 0123456789abcdef"  # 31 bytes: one small frame


def source(index: int, n: int) -> str:
    """The n-th source address of client `index`: 127.<10+index>.<1..250>.<1..250>."""
    return f"127.{10 + index}.{(n // 250) % 250 + 1}.{n % 250 + 1}"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += data
    return buf


def read_head(sock: socket.socket) -> bytes:
    buf = b""
    while wire.HEAD_END not in buf:
        data = sock.recv(4096)
        if not data:
            raise EOFError("closed before a 101")
        buf += data
        if len(buf) > wire.MAX_HEAD:
            raise ValueError("head too large")
    head, _, rest = buf.partition(wire.HEAD_END)
    if rest:
        raise ValueError(f"bytes after the 101: {rest[:40]!r}")
    return head + wire.HEAD_END


class Clients:
    def __init__(self, port: int, count: int, index: int) -> None:
        self.port, self.count, self.index = port, count, index
        self.socks: list[socket.socket] = []
        self.frame = wire.client_frame(PAYLOAD)
        self.reply = wire.server_frame(PAYLOAD)

    def _connect(self, n: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source(self.index, n), 0))
        sock.settimeout(IO_TIMEOUT)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def open(self) -> dict[str, object]:
        """Connect, handshake and echo once on every tunnel, a batch at a time."""
        started = time.monotonic()
        request = wire.handshake_request(wire.PATH_ECHO)
        while len(self.socks) < self.count:
            group = [self._connect(len(self.socks) + i)
                     for i in range(min(BATCH, self.count - len(self.socks)))]  # fmt: skip
            self.socks.extend(group)
            for sock in group:
                sock.sendall(request)
            for sock in group:
                head = read_head(sock)
                if not wire.head_ok(head):
                    raise ValueError(f"not a 101: {head[:120]!r}")
            for sock in group:
                sock.sendall(self.frame)
            for sock in group:
                if recv_exactly(sock, len(self.reply)) != self.reply:
                    raise ValueError("bad first echo")
        return {"opened": len(self.socks), "seconds": time.monotonic() - started}

    def echo(self, seed: int, k: int) -> dict[str, object]:
        """Echo one frame on `k` tunnels picked with `seed` (all of them for k < 0)."""
        picked = (
            self.socks if k < 0 else random.Random(seed).sample(self.socks, min(k, len(self.socks)))
        )
        bad = 0
        for sock in picked:
            try:
                sock.sendall(self.frame)
            except OSError:
                bad += 1
        for sock in picked:
            try:
                if recv_exactly(sock, len(self.reply)) != self.reply:
                    bad += 1
            except (OSError, EOFError):
                bad += 1
        return {"checked": len(picked), "bad": bad}

    def wake(self, fraction: float) -> dict[str, object]:
        """One frame on that share of the tunnels, all sent before any echo is read."""
        picked = self.socks[: max(1, round(len(self.socks) * fraction))]
        started = time.monotonic()
        for sock in picked:
            sock.sendall(self.frame)
        bad = 0
        for sock in picked:
            try:
                if recv_exactly(sock, len(self.reply)) != self.reply:
                    bad += 1
            except (OSError, EOFError):
                bad += 1
        return {"woken": len(picked), "bad": bad, "seconds": time.monotonic() - started}

    def closed(self, timeout: float) -> dict[str, object]:
        """Wait until the proxy closes every tunnel; when the last one closed, from now."""
        started = time.monotonic()
        sel = selectors.DefaultSelector()
        for sock in self.socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        left, last, data_seen = len(self.socks), 0.0, 0
        deadline = started + timeout
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    data_seen += len(data)  # a Close frame from the upstream, say
                    continue
                sel.unregister(sock)
                sock.close()
                left -= 1
                last = time.monotonic() - started
        sel.close()
        return {"closed": len(self.socks) - left, "open": left, "seconds": last,
                "data": data_seen}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    clients = Clients(args.port, args.count, args.index)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        try:
            if words[0] == "open":
                answer = clients.open()
            elif words[0] == "echo":
                answer = clients.echo(int(words[1]), int(words[2]))
            elif words[0] == "wake":
                answer = clients.wake(float(words[1]))
            elif words[0] == "closed":
                answer = clients.closed(float(words[1]))
            else:
                answer = {"error": f"unknown command {words[0]!r}"}
        except (OSError, EOFError, ValueError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "opened": len(clients.socks)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
