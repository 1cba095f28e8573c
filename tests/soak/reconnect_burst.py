"""How long the clients of idle keep-alive connections wait for an answer after an upgrade,
with the old generation's idle closes spread over a grace (as shipped) or all at once.

    python -m tests.soak.reconnect_burst --clients 500 --pairs 5

N clients each send one request, then idle. SIGUSR2: once `keepalive_drain` (1 s) has passed,
the retiring process closes their connections; each client, on EOF, reconnects (to the new
generation) and sends a request. Printed per run: how long the closes took from first to last,
and the time from a client's EOF to its answer (p50/p90/p99/max). "at once" runs the retiring
process with its random draw fixed at 0, so every idle close falls at the end of the grace.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.support.clients import LOOPBACK, free_port
from tests.support.configs import config_yaml, route
from tests.support.peers import RawUpstream, respond_ok_forever
from tests.support.processes import ProxyProcess

REQUEST = b"GET / HTTP/1.1\r\nHost: burst\r\n\r\n"
# The prefix before `python -m upgradeproxy run ...`: argv[4:] is `run ...`.
AT_ONCE = (
    sys.executable, "-c",
    "import random, runpy, sys; random.random = lambda: 0.0; "
    "sys.argv = ['upgradeproxy', *sys.argv[4:]]; "
    "runpy.run_module('upgradeproxy', run_name='__main__')",
)  # fmt: skip


async def answered(stream: trio.SocketStream) -> bool:
    """Send one request; whether its (two-byte) answer came."""
    await stream.send_all(REQUEST)
    buf = b""
    while not buf.endswith(b"\r\n\r\n") or len(buf) < 2:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buf += data
        if b"\r\n\r\n" in buf and len(buf.split(b"\r\n\r\n", 1)[1]) >= 2:
            return True
    return True


class Countdown:
    """An event set once `count()` has been called `n` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = trio.Event()

    def count(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


async def client(port: int, ready: Countdown, out: dict[str, list[float]]) -> None:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    assert await answered(stream)
    ready.count()
    data = await stream.receive_some(65536)  # idle until the retiring process closes it
    eof = time.monotonic()
    await stream.aclose()
    if data:
        out["errors"].append(eof)
        return
    async with await trio.open_tcp_stream(LOOPBACK, port) as fresh:
        if not await answered(fresh):
            out["errors"].append(eof)
            return
    out["eof"].append(eof)
    out["wait"].append(time.monotonic() - eof)


async def run(clients: int, at_once: bool) -> str:
    upstream = RawUpstream(respond_ok_forever)  # in threads: not in the clients' event loop
    try:
        port = free_port()
        text = config_yaml({"u": [upstream.port]}, [route("u")], listen=port,
                           timeouts={"keepalive_drain": "1s"})  # fmt: skip
        out: dict[str, list[float]] = {"eof": [], "wait": [], "errors": []}
        with tempfile.TemporaryDirectory(prefix="upx-burst-") as tmp:
            config = Path(tmp) / "upgradeproxy.yaml"
            config.write_text(text)
            proxy = ProxyProcess(config, prefix=AT_ONCE if at_once else ())
            try:
                await trio.to_thread.run_sync(proxy.ready)
                ready = Countdown(clients)
                async with trio.open_nursery() as nursery:
                    for _ in range(clients):
                        nursery.start_soon(client, port, ready, out)
                    await ready.done.wait()
                    proxy.upgrade()
            finally:
                proxy.stop()
                proxy.close()
    finally:
        upstream.close()
    waits = sorted(out["wait"])
    if not waits:
        return f"{'at once' if at_once else 'spread':>8}: no client reconnected"

    def ms(q: float) -> float:
        return waits[round(q * (len(waits) - 1))] * 1000

    span = (max(out["eof"]) - min(out["eof"])) * 1000
    return (
        f"{'at once' if at_once else 'spread':>8}: {len(waits)} reconnected, "
        f"{len(out['errors'])} errors, closes over {span:.0f} ms; answer after EOF "
        f"p50 {ms(0.5):.0f} p90 {ms(0.9):.0f} p99 {ms(0.99):.0f} max {ms(1):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[2])
    for _ in range(args.pairs):
        for at_once in (True, False):
            print(trio.run(run, args.clients, at_once), flush=True)


if __name__ == "__main__":
    main()
