"""Keep-alive HTTP clients for the drain tests: each sends GETs back to back on one connection
and, like urllib3 or a browser, opens a new one when a response says `Connection: close`.

Every request is classified: answered, or lost -- and a lost one on a connection that had
already been answered (a keep-alive reuse) is told apart from a new connection that never got
an answer (refused, or reset in a closing listener's queue).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from tests.support.clients import LOOPBACK, read_response
from tests.support.waiting import WAIT


@dataclass
class Lost:
    """A request that got no response."""

    client: int
    reused: bool  # the connection had carried an answered request before
    at: float  # time.monotonic() when it was lost
    error: str


@dataclass
class Tally:
    answered: int = 0
    closes: list[int] = field(default_factory=list)  # per client: responses with Connection: close
    lost: list[Lost] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # answered, but not with 200 "ok"


class KeepAliveClients:
    """`n` threads, each a keep-alive client of `port` sending `GET path` until `stop()`,
    `limit` requests each, or a refused connection (the proxy is gone).

    Odd-numbered clients think for `pace` seconds after each response (a page polling an API),
    so their connections spend most of the time idle between requests; even-numbered ones send
    back to back.
    """

    def __init__(
        self, port: int, n: int = 8, *, pace: float = 0.02, path: str = "/web", limit: int = 20_000
    ) -> None:
        self.port, self.path, self.limit, self.pace = port, path, limit, pace
        self.tally = Tally(closes=[0] * n)
        self.refused = [False] * n
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def answered(self) -> int:
        with self._lock:
            return self.tally.answered

    def stop(self) -> Tally:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self._threads)
        return self.tally

    def _run(self, index: int) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode()
        deadline = time.monotonic() + 4 * WAIT
        pace = self.pace if index % 2 else 0.0
        sent = 0
        while not self._stop.is_set() and time.monotonic() < deadline and sent < self.limit:
            try:
                sock = socket.create_connection((LOOPBACK, self.port), timeout=WAIT)
            except ConnectionRefusedError:
                self.refused[index] = True
                return  # nothing listens any more: the drain is over
            with sock:
                reused = False
                while not self._stop.is_set() and sent < self.limit:
                    sent += 1
                    try:
                        sock.sendall(request)
                        status, headers, body, rest = read_response(sock)
                    except (OSError, EOFError) as exc:
                        self._lose(Lost(index, reused, time.monotonic(), repr(exc)))
                        break
                    self._answer(index, status, body, headers.get(b"connection") == b"close")
                    if rest:
                        self._wrong(f"bytes after a response: {bytes(rest)[:60]!r}")
                    if headers.get(b"connection") == b"close":
                        break
                    reused = True
                    if pace:  # think time, not synchronisation: the connection idles meanwhile
                        self._stop.wait(pace)

    def _answer(self, index: int, status: int, body: bytes, close: bool) -> None:
        with self._lock:
            self.tally.answered += 1
            self.tally.closes[index] += close
            if (status, body) != (200, b"ok"):
                self.tally.wrong.append(f"{status} {body[:60]!r}")

    def _lose(self, lost: Lost) -> None:
        with self._lock:
            self.tally.lost.append(lost)

    def _wrong(self, what: str) -> None:
        with self._lock:
            self.tally.wrong.append(what)
