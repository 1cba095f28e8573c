"""HTTP/2 rows of the bench (rule 17; `--tests h2`), beside HAProxy, which speaks h2 with
prior knowledge and RFC 8441 too (its bench frontend as it is: HAProxy detects the preface itself).

- requests: h2load (Debian's nghttp2-client) over cleartext prior knowledge, `/http`;
- WebSocket over HTTP/2: a client on the `h2` library opening extended CONNECT streams on
  one connection (handshakes/s, the bench upstream's `/hs`), and one stream moving bytes
  to `/sink` (tunnel MB/s over one HTTP/2 connection).

The upgradeproxy under test is an instance of its own with `http2: true`, so the HTTP/1.1
rows keep measuring a listener without it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.settings
import targets
import wire
from procs import Managed, Processes, wait_for_port

H2LOAD: Final = "h2load"
SINK_CHUNK: Final = 1 << 20  # bytes the sink client offers per send loop


def upgradeproxy_h2_conf(port: int, ws_port: int, http_port: int) -> str:
    """The bench's upgradeproxy config with `http2: true` on its listener."""
    return targets.upgradeproxy_conf(port, ws_port, http_port, 1, http2=True)


def start_upgradeproxy_h2(
    procs: Processes, tmp: Path, port: int, ws_port: int, http_port: int
) -> Managed:
    path = tmp / "upgradeproxy-h2.yaml"
    path.write_text(upgradeproxy_h2_conf(port, ws_port, http_port))
    argv = [sys.executable, "-m", "upgradeproxy", "run", "--config", str(path)]
    argv += ["--log-format", "json", "--no-access-log"]
    proc = procs.start("upgradeproxy-h2", argv, tmp / "upgradeproxy-h2.log", cwd=targets.REPO)
    wait_for_port(port, proc)
    return proc


def h2load(port: int, seconds: float, conns: int, streams: int) -> tuple[float, int, str]:
    """(requests/s, requests done, problems) of `h2load` against `/http` with prior knowledge."""
    argv = [H2LOAD, f"-c{conns}", f"-m{streams}", f"-D{seconds:g}",
            f"http://127.0.0.1:{port}{wire.PATH_HTTP}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed: {out.stderr or out.stdout}")
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out.stdout)  # fmt: skip
    if rate is None or done is None:
        raise RuntimeError(f"unexpected h2load output: {out.stdout}")
    problems = "" if done[3] == done[4] == "0" else f"{done[3]} failed, {done[4]} errored"
    return float(rate[1]), int(done[1]), problems


class _Client:
    """A blocking HTTP/2 client on the `h2` library: the least a bench client can do."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 24)
        self.flush()
        while not self.conn.remote_settings.enable_connect_protocol:
            self.read()

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def read(self) -> list[h2.events.Event]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return events

    def connect(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [
            (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
            (b":authority", wire.HOST), (b":path", path.encode()),
            (b"sec-websocket-version", b"13"),
        ])  # fmt: skip
        return sid

    def close(self) -> None:
        self.sock.close()


def handshakes(port: int, seconds: float, concurrency: int) -> int:
    """Extended CONNECT handshakes completed (200, then END_STREAM both ways) in `seconds`,
    `concurrency` streams at a time on one connection."""
    client = _Client(port)
    done = 0
    try:
        for _ in range(concurrency):
            client.connect(wire.PATH_HANDSHAKE)
        client.flush()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for event in client.read():
                if isinstance(event, h2.events.ResponseReceived):
                    if dict(event.headers).get(b":status") != b"200":
                        raise RuntimeError(f"extended CONNECT answered {event.headers}")
                    client.conn.end_stream(event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    done += 1
                    client.connect(wire.PATH_HANDSHAKE)
                elif isinstance(event, h2.events.StreamReset):
                    raise RuntimeError(f"stream reset: {event}")
            client.flush()
    finally:
        client.close()
    return done


def upload(port: int, size: int, clock: Callable[[str], None]) -> float:
    """Seconds to move `size` bytes client -> upstream over one extended CONNECT stream;
    `clock("start")`/`clock("stop")` bracket the timed part (loadgen's convention)."""
    client = _Client(port)
    try:
        sid = client.connect(f"{wire.PATH_SINK}?n={size}")
        client.flush()
        while not any(isinstance(e, h2.events.ResponseReceived) for e in client.read()):
            pass
        clock("start")
        started = time.perf_counter()
        chunk = b"\0" * SINK_CHUNK
        left = size
        answer = b""
        while left:
            window = min(client.conn.local_flow_control_window(sid), left)
            sent = 0
            while sent < window:
                n = min(window - sent, client.conn.max_outbound_frame_size)
                client.conn.send_data(sid, chunk[:n])
                sent += n
            left -= sent
            client.flush()
            if left:
                for event in client.read():
                    if isinstance(event, h2.events.DataReceived):
                        answer += event.data
        while len(answer) < 8:
            for event in client.read():
                if isinstance(event, h2.events.DataReceived):
                    answer += event.data
        seconds = time.perf_counter() - started
        clock("stop")
        if int.from_bytes(answer[:8], "big") != size:
            raise RuntimeError(f"the sink counted {answer[:8]!r}, not {size}")
        return seconds
    finally:
        client.close()
