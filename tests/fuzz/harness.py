"""The fuzz harness: bytes from a client into `serve_client`, checked against the invariant.

One input is served twice: once in one write with the client half-closing after it, once
in two writes with the client then going quiet (so the timeouts must end it). The client is
an in-memory stream; the upstream is a recording in-memory peer that `connect` is pointed
at; a virtual clock (trio.testing.MockClock, autojump) makes every timeout instant.

The invariant, on every input:
- `serve_client` returns; nothing escapes it (an exception here is a crash);
- it ends within the virtual time its timeouts allow (else: a hang);
- every byte that reached the upstream parses with the strict parser in `strict.py`;
- a request the proxy answered with a 4xx/5xx did not reach the upstream;
- the client's output is a sequence of well-formed responses and the connection is closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import trio.testing

from tests.fuzz.strict import Rejected, Request, parse_requests
from tests.support.configs import config_yaml, route
from tests.support.wire import ws_accept
from upgradeproxy.config.loader import parse_config
from upgradeproxy.connection import exchange, forward
from upgradeproxy.connection.context import Peer, Runtime, Shared

CONFIG = config_yaml(
    {"app": 9, "ws": 10},
    [route("app", host="api.example", path_prefix="/only"),
     route("ws", path_prefix="/ws", upgrade=["websocket", "h2c"]), route("app")],
    timeouts={"connect": "1s", "request_header": "5s", "upstream_response": "3s", "idle": "7s",
              "tunnel_idle": "11s"},
    limits={"max_request_header_bytes": 4096},
)  # fmt: skip
RUNTIME = Runtime.build(parse_config(CONFIG, "fuzz.yaml"))
REQUEST_HEADER = RUNTIME.config.timeouts.request_header
# Nothing an input does may keep a connection past this much virtual time: a few pipelined
# exchanges, each within its timeouts, then a tunnel's idle timeout.
HANG_AFTER = 120.0
# Empty, so the client-side check parses the relayed answer to a HEAD like any other.
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class InvariantBroken(AssertionError):
    """The proxy did something the contract forbids with this input."""


@dataclass
class Outcome:
    client_out: bytes = b""
    upstream_in: list[bytes] = field(default_factory=list)  # per upstream connection
    finished_at: float = 0.0


async def _fake_upstream(stream: trio.testing.MemoryStream | Any, record: bytearray) -> None:
    """Answer each request head with 200 (or 101 to a WebSocket offer), record every byte."""
    answered = 0
    switched = False
    try:
        while data := await stream.receive_some(65536):
            record += data
            if switched:
                await stream.send_all(data)  # an echo tunnel
                continue
            heads = bytes(record).count(b"\r\n\r\n")
            while answered < heads:
                answered += 1
                key = _ws_key(bytes(record).split(b"\r\n\r\n")[answered - 1])
                if key is not None:
                    accept = ws_accept(key)
                    await stream.send_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                    )
                    switched = True
                    break
                await stream.send_all(_OK)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _ws_key(head: bytes) -> bytes | None:
    """The Sec-WebSocket-Key of a head whose Upgrade field offers websocket, else None."""
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
    named = {name.strip().lower(): value.strip() for name, value in fields}
    if b"websocket" not in named.get(b"upgrade", b"").lower():
        return None
    return named.get(b"sec-websocket-key")


async def _serve(data: bytes, eof: bool) -> Outcome:
    out = Outcome()
    client, proxy_side = trio.testing.memory_stream_pair()
    shared = Shared()
    records: list[bytearray] = []

    async with trio.open_nursery() as nursery:

        async def connect(*_args: Any) -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            records.append(bytearray())
            nursery.start_soon(_fake_upstream, theirs, records[-1])
            return ours

        async def read_client() -> None:
            buf = bytearray()
            try:
                while chunk := await client.receive_some(65536):
                    buf += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            out.client_out = bytes(buf)

        async def write_client() -> None:
            try:
                if eof:
                    await client.send_all(data)
                else:
                    # In two reads, so heads and chunk lines are also parsed across a split.
                    await client.send_all(data[: len(data) // 2])
                    await trio.testing.wait_all_tasks_blocked()  # the proxy has read it all
                    await client.send_all(data[len(data) // 2 :])
                if eof:
                    await client.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        with _patched_connect(connect):
            nursery.start_soon(read_client)
            nursery.start_soon(write_client)
            with trio.move_on_after(HANG_AFTER) as scope:
                await exchange.serve_client(proxy_side, Peer("192.0.2.7", False), RUNTIME, shared)
            if scope.cancelled_caught:
                raise InvariantBroken(f"serve_client still running after {HANG_AFTER}s")
            out.finished_at = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()  # the reader has seen the close
            nursery.cancel_scope.cancel()
    out.upstream_in = [bytes(r) for r in records]
    return out


@contextmanager
def _patched_connect(fn: Any) -> Iterator[None]:
    """Upstream connections come from `fn`: forward.py is where the exchange connects."""
    original = forward.connect
    forward.connect = fn  # type: ignore[assignment]
    try:
        yield
    finally:
        forward.connect = original  # type: ignore[assignment]


# A request h11 lets be answered by anything, a 101 included.
_ANY_ANSWER = [("Host", "x"), ("Connection", "upgrade"), ("Upgrade", "websocket")]


def _responses(data: bytes) -> list[int]:
    """The statuses of the responses the client received; raises if they do not parse."""
    conn = h11.Connection(h11.CLIENT)
    statuses: list[int] = []
    # A client that sent one request per response: h11 needs to believe it sent them.
    conn.send(h11.Request(method="GET", target="/", headers=_ANY_ANSWER))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    in_response = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if not in_response and not conn.trailing_data[0]:
                return statuses  # closed between responses
            raise InvariantBroken(f"the client got a malformed response: {exc}") from exc
        if isinstance(event, h11.InformationalResponse | h11.Response):
            statuses.append(event.status_code)
            in_response = event.status_code >= 200
            if event.status_code == 101:
                return statuses  # tunnel bytes follow
        elif isinstance(event, h11.EndOfMessage):
            in_response = False
            if conn.their_state is h11.DONE and conn.our_state is h11.DONE:
                if not conn.trailing_data[0]:
                    return statuses  # the connection closed after a complete response
                conn.start_next_cycle()
                conn.send(h11.Request(method="GET", target="/", headers=_ANY_ANSWER))
                conn.send(h11.EndOfMessage())
        elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            return statuses


def check(data: bytes) -> None:
    """Serve `data` both ways and check the invariant; raises InvariantBroken or crashes."""
    for eof in (True, False):
        outcome = trio.run(_serve, data, eof, clock=trio.testing.MockClock(autojump_threshold=0))
        _judge(data, eof, outcome)


def _judge(data: bytes, eof: bool, out: Outcome) -> None:
    forwarded: list[Request] = []
    for conn_bytes in out.upstream_in:
        try:
            forwarded += parse_requests(conn_bytes)
        except Rejected as exc:
            raise InvariantBroken(f"forwarded bytes a strict parser rejects: {exc}") from exc
    statuses = _responses(out.client_out)
    if statuses[-1:] == [101]:
        return  # tunnel bytes follow the 101; the strict parse above covered the request
    answered = [s for s in statuses if s < 400]
    # The fake upstream answers every request head at once and the proxy relays that answer,
    # so each forwarded request shows up as a non-error status, except a last one whose body
    # the client broke off (the proxy may then answer with its own error instead). A request
    # the proxy rejected with a 4xx/5xx and still forwarded would break this count.
    cut_short = bool(forwarded) and not forwarded[-1].complete
    if len(forwarded) != len(answered) and not (cut_short and len(forwarded) == len(answered) + 1):
        raise InvariantBroken(
            f"{len(forwarded)} requests reached the upstream, {len(answered)} answered from it"
            f" (statuses {statuses})"
        )
    silent = not eof and not out.upstream_in and not statuses and data
    if silent and out.finished_at > REQUEST_HEADER + 1.5:
        # Nothing was sent upstream or answered: the head timeout is the only way out.
        raise InvariantBroken(f"a silent client held on for {out.finished_at:.1f}s")


def one_input(data: bytes) -> None:
    """The atheris entry point: `InvariantBroken` and any other exception are findings."""
    check(data)
