"""The soak: a real `upgradeproxy run` under mixed traffic and chaos, then a verdict table.

    python -m tests.soak.soak --seconds 30      (tests/soak/run.sh wraps this)
    python -m tests.soak.soak --seconds 600 --workers 2 --upgrade-every 60 --http-clients 8

Traffic: long and short WebSocket tunnels whose every byte is checked, HTTP GETs and POSTs
with bodies on keep-alive connections (half of the clients back to back, half with a short
think time; each checks a pooled connection before reusing it, as urllib3 and browsers do).
Chaos: client resets, upstream resets, stalled readers, slowloris, garbage, an upstream
restart halfway, a SIGHUP every 10 s, and with `--upgrade-every` a SIGUSR2 (a new generation
on the same sockets) that often; at the end every old generation must have exited. Exit 0
and a `PASS` line only if every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import select
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

from tests.soak.upstream import Upstream, pattern, reset
from tests.soak.verdict import Ending, Tally, verdict
from tests.support import procfs
from tests.support.clients import LOOPBACK, free_port
from tests.support.configs import config_yaml, route
from tests.support.processes import ROOT, ProxyProcess
from tests.support.waiting import eventually, steady

MB = 1 << 20
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
REQUEST_HEADER = 3.0
OP_TIMEOUT = 15.0  # any single client step slower than this is a hang, hence an error
_PARTIAL_POST = b"POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000


@dataclass(frozen=True)
class Options:
    seconds: float = 30.0
    seed: int = 0
    workers: int = 1
    upgrade_every: float = 0.0  # seconds between SIGUSR2s; 0: none
    http_clients: int = 4


class Soak:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.seconds = options.seconds
        self.rng = random.Random(options.seed)
        self.t = Tally()
        self.ids = itertools.count()
        self.a = Upstream("a")
        self.b = Upstream("b")
        self.port = free_port()
        self.proxy: ProxyProcess | None = None
        self.stop_at = 0.0
        self.restart_window = (float("inf"), float("inf"))
        self.rss: list[int] = []

    # --- plumbing ---------------------------------------------------------------------

    def victim(self, tid: str) -> bool:
        return tid in self.a.victims or tid in self.b.victims

    def in_restart(self) -> bool:
        start, end = self.restart_window
        return start <= trio.current_time() <= end + 2.0

    def error(self, what: str, exc: BaseException | str) -> None:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        self.t.unexpected.append(f"{what}: {exc!r}"[:300])

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(LOOPBACK, self.port)

    async def open_tunnel(self, kind: str, tid: str) -> tuple[trio.SocketStream, bytes]:
        """A switched tunnel to `/kind/tid`: the stream and bytes read past the 101 head."""
        stream = await self.connect()
        await stream.send_all(
            f"GET /{kind}/{tid} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n".encode()
            + b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )  # fmt: skip
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError(f"closed before a 101: {buf[:100]!r}")
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101 "):
            await stream.aclose()
            raise ConnectionError(f"no 101: {head[:60]!r}")
        return stream, rest

    # --- traffic ----------------------------------------------------------------------

    async def echo_check(
        self, stream: trio.SocketStream, rest: bytes, tid: str, until: float
    ) -> bool:
        """Send random bytes until `until`, then half-close; whether every byte came back."""
        sent = bytearray()
        got = bytearray(rest)

        async def receive() -> None:
            while data := await stream.receive_some(65536):
                got.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            while True:
                chunk = self.rng.randbytes(self.rng.randint(1, 32768))
                await stream.send_all(chunk)
                sent += chunk
                if trio.current_time() >= until:
                    break
                await trio.sleep(self.rng.random() * 0.05)
            await stream.send_eof()
        if bytes(got) != bytes(sent) and self.victim(f"ws-{tid}"):
            # An upstream reset may reach the client as a plain close (the proxy closes its
            # side once it has read everything): a short echo, not a loss.
            self.t.bump(self.t.expected, "tunnels cut by an upstream reset/restart")
        elif bytes(got) != bytes(sent):
            pairs = enumerate(zip(got, sent, strict=False))
            same = next((i for i, (x, y) in pairs if x != y), min(len(got), len(sent)))
            self.t.lost += max(len(sent), len(got)) - same  # everything after the first wrong byte
            self.error(f"tunnel {tid}", f"sent {len(sent)}, got {len(got)}, first diff at {same}")
        self.t.tunnel_bytes += len(sent)
        return bytes(got) == bytes(sent)

    async def tunnel_loop(self, kind: str, lifetime: tuple[float, float]) -> None:
        while trio.current_time() < self.stop_at:
            tid = f"{kind}{next(self.ids)}"
            until = min(self.stop_at, trio.current_time() + self.rng.uniform(*lifetime))
            try:
                with trio.fail_after(until - trio.current_time() + OP_TIMEOUT):
                    stream, rest = await self.open_tunnel("ws", tid)
                    async with stream:
                        whole = await self.echo_check(stream, rest, tid, until)
                if whole:
                    self.t.bump(self.t.tunnels, kind)
            except Exception as exc:  # every failure is classified, none is swallowed
                if self.victim(f"ws-{tid}"):
                    self.t.bump(self.t.expected, "tunnels cut by an upstream reset/restart")
                elif self.in_restart():
                    self.t.bump(self.t.expected, "tunnels refused during the upstream restart")
                else:
                    self.error(f"tunnel {tid}", exc)

    async def http_loop(self, think: float) -> None:
        """Requests on a keep-alive connection, `think` seconds at most between them."""
        stream: trio.SocketStream | None = None
        h = h11.Connection(h11.CLIENT)
        while trio.current_time() < self.stop_at:
            if stream is not None and dropped(stream):
                # As urllib3 does: a pooled connection that turned readable was closed by the
                # server (a drain's idle close): open a new one instead of sending on it.
                self.t.bump(self.t.chaos, "pooled connections found closed before reuse")
                await stream.aclose()
                stream = None
            try:
                with trio.fail_after(OP_TIMEOUT):
                    if stream is None:
                        stream, h = await self.connect(), h11.Connection(h11.CLIENT)
                    keep = await self.one_request(stream, h)
                if not keep:
                    await stream.aclose()
                    stream = None
                elif think:
                    await trio.sleep(self.rng.uniform(0, think))
            except Exception as exc:  # every failure is classified, none is swallowed
                if self.in_restart():
                    self.t.bump(self.t.expected, "HTTP errors during the upstream restart")
                else:
                    self.error("http", exc)
                if stream is not None:
                    await stream.aclose()
                stream = None
        if stream is not None:
            await stream.aclose()

    async def one_request(self, stream: trio.SocketStream, h: h11.Connection) -> bool:
        size = self.rng.choice([0, 1, 100, 4096, 65536, 300_000])
        if self.rng.random() < 0.5:
            expect, body = pattern(size), b""
            req = h11.Request(method="GET", target=f"/http/{size}", headers=[("Host", "soak")])
        else:
            expect = body = self.rng.randbytes(size)
            framing = ("Content-Length", str(size)) if self.rng.random() < 0.5 else (
                "Transfer-Encoding", "chunked")  # fmt: skip
            req = h11.Request(method="POST", target="/echo", headers=[("Host", "soak"), framing])
        out = h.send(req) + (h.send(h11.Data(data=body)) if body else b"")
        await stream.send_all(out + h.send(h11.EndOfMessage()))
        status, got = 0, bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise EOFError(f"connection closed mid-response ({event})")
        if status != 200:
            raise EOFError(f"status {status}: {bytes(got[:80])!r}")
        if bytes(got) != expect:
            self.t.wrong_bodies += 1
            self.error("http body", f"{req.method!r} {size} bytes: got {len(got)}")
        self.t.http_ok += 1
        self.t.http_bytes += len(got) + len(body)
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            return True
        return False

    # --- chaos ------------------------------------------------------------------------

    async def client_resets(self) -> None:
        while trio.current_time() < self.stop_at:
            await trio.sleep(0.4)
            with trio.move_on_after(OP_TIMEOUT):
                try:
                    if self.rng.random() < 0.5:
                        stream, _ = await self.open_tunnel("ws", f"rst{next(self.ids)}")
                        await stream.send_all(self.rng.randbytes(5000))
                    else:
                        stream = await self.connect()
                        await stream.send_all(_PARTIAL_POST)
                    await reset(stream)
                    self.t.bump(self.t.chaos, "client resets")
                except (OSError, EOFError, ConnectionError, trio.BrokenResourceError) as exc:
                    if not self.in_restart():
                        self.error("client reset setup", exc)

    async def upstream_resets(self) -> None:
        while trio.current_time() < self.stop_at:
            await trio.sleep(1.0)
            if await self.rng.choice([self.a, self.b]).reset_tunnel(self.rng):
                self.t.bump(self.t.chaos, "upstream resets")

    async def slowloris(self) -> None:
        head = b"GET /http/1 HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"y" * 40
        while trio.current_time() < self.stop_at:
            try:
                with trio.fail_after(REQUEST_HEADER + OP_TIMEOUT):
                    async with await self.connect() as stream:
                        reply = b""
                        for i in range(len(head)):
                            try:
                                await stream.send_all(head[i : i + 1])
                            except (trio.BrokenResourceError, OSError):
                                break  # the proxy closed: now read its answer
                            await trio.sleep(0.25)
                        while data := await stream.receive_some(65536):
                            reply += data
                if not reply.startswith(b"HTTP/1.1 408 "):
                    self.error("slowloris", f"expected a 408, got {reply[:60]!r}")
                self.t.bump(self.t.chaos, "slowloris clients cut by a 408")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.error("slowloris", exc)

    async def garbage(self) -> None:
        while trio.current_time() < self.stop_at:
            await trio.sleep(0.3)
            junk = self.rng.randbytes(self.rng.randint(1, 3000))
            try:
                with trio.fail_after(REQUEST_HEADER + OP_TIMEOUT):
                    async with await self.connect() as stream:
                        await stream.send_all(junk)
                        reply = b""
                        while data := await stream.receive_some(65536):
                            reply += data
                if reply and not reply.startswith(b"HTTP/1.1 4"):
                    self.error("garbage", f"answered {reply[:60]!r}")
                self.t.bump(self.t.chaos, "garbage connections")
            except (trio.BrokenResourceError, OSError):
                self.t.bump(self.t.chaos, "garbage connections")  # reset on unread junk: fine
            except trio.TooSlowError as exc:
                self.error("garbage", exc)

    async def stalled_readers(self, n: int = 3) -> None:
        streams = []
        assert self.proxy is not None
        # The processes serving at the start hold the floods (an upgrade leaves them there):
        # their RSS before the floods and while they last.
        self.rss.append(sum(self.rss_of(self.first)))
        try:
            for _ in range(n):
                stream, _ = await self.open_tunnel("flood", f"{next(self.ids)}")
                streams.append(stream)
            self.t.bump(self.t.chaos, "stalled readers", n)
            while trio.current_time() < self.stop_at:
                sizes = self.rss_of(self.first)
                if len(sizes) == len(self.first):  # all still there
                    self.rss.append(sum(sizes))
                await trio.sleep(1.0)
        finally:
            for stream in streams:
                await stream.aclose()

    async def sighups(self) -> None:
        while trio.current_time() + 10 < self.stop_at:
            await trio.sleep(10)
            assert self.proxy is not None
            self.proxy.reload()
            self.t.bump(self.t.chaos, "SIGHUP reloads")

    async def upgrades(self) -> None:
        """A SIGUSR2 every `--upgrade-every` seconds: a new generation takes the sockets over."""
        every = self.options.upgrade_every
        while trio.current_time() + every < self.stop_at:
            await trio.sleep(every)
            assert self.proxy is not None
            self.proxy.upgrade()
            self.t.bump(self.t.chaos, "SIGUSR2 upgrades")

    async def restart_halfway(self, nursery: trio.Nursery) -> None:
        await trio.sleep(self.seconds / 2)
        start = trio.current_time()
        self.restart_window = (start, start + 1.0)
        cut = await self.a.restart(nursery, down_for=1.0)
        self.restart_window = (start, trio.current_time())
        self.t.bump(self.t.chaos, "upstream restarts")
        self.t.bump(self.t.chaos, "connections cut by the restart", cut)

    # --- the run ----------------------------------------------------------------------

    def config(self) -> str:
        ports = [self.a.port, self.b.port]
        routes = [route("tunnels", path_prefix="/ws"), route("tunnels", path_prefix="/flood"),
                  route("web")]  # fmt: skip
        timeouts = {"connect": "2s", "request_header": f"{REQUEST_HEADER:g}s", "idle": "5s",
                    "upstream_response": "10s", "tunnel_idle": "60s", "drain": "5s"}  # fmt: skip
        return config_yaml({"tunnels": ports, "web": ports}, routes, listen=self.port,
                           workers=self.options.workers, timeouts=timeouts)  # fmt: skip

    async def main(self) -> int:
        with tempfile.TemporaryDirectory(prefix="upx-soak-") as tmp:
            return await self.run(Path(tmp) / "upgradeproxy.yaml")

    async def run(self, config: Path) -> int:
        async with trio.open_nursery() as servers:
            await self.a.start(servers)
            await self.b.start(servers)
            config.write_text(self.config())  # now that the upstreams have their ports
            self.proxy = ProxyProcess(config, "--no-access-log", cwd=ROOT)
            try:
                await self.all_workers_ready()
                processes = self.proxy.processes()
                # Where the stalled readers' tunnels live (the supervisor serves nothing).
                self.first = sorted(processes - {self.proxy.pid}) or [self.proxy.pid]
                baseline = await self.held_once_steady()
                started = time.monotonic()
                self.stop_at = trio.current_time() + self.seconds
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(self.tunnel_loop, "long", (self.seconds, self.seconds))
                    for _ in range(3):
                        nursery.start_soon(self.tunnel_loop, "short", (0.05, 1.0))
                    for i in range(self.options.http_clients):
                        nursery.start_soon(self.http_loop, 0.05 if i % 2 else 0.0)
                    for task in (self.client_resets, self.upstream_resets, self.garbage,
                                 self.stalled_readers, self.sighups):  # fmt: skip
                        nursery.start_soon(task)
                    if self.options.upgrade_every:
                        nursery.start_soon(self.upgrades)
                    for _ in range(2):
                        nursery.start_soon(self.slowloris)
                    nursery.start_soon(self.restart_halfway, servers)
                ran = time.monotonic() - started
                fresh = await self.fresh_exchange()
                settled = await self.settle(baseline, len(processes))
                for line in self.proxy.errors():
                    self.error("proxy log", line)
                rss_growth = (max(self.rss) - self.rss[0]) if self.rss else None
                end = Ending(ran, baseline, settled, fresh, self.proxy.serving(), rss_growth,
                             (len(processes), len(self.proxy.processes())))  # fmt: skip
                serving = self.proxy.processes() - {self.proxy.pid}
                if self.options.workers == 1:  # no supervisor: the first process, or its heir
                    serving = self.proxy.processes()
                rss_now = sum(self.rss_of(serving))
                return verdict(self.t, end, self.proxy.serving_pid, rss_now)
            finally:
                self.proxy.stop(grace=15)
                self.proxy.close()
                servers.cancel_scope.cancel()

    async def fresh_exchange(self) -> bool:
        """A new request and a new tunnel, after everything else has stopped."""
        try:
            with trio.fail_after(OP_TIMEOUT):
                async with await self.connect() as stream:
                    ok = await self.one_request(stream, h11.Connection(h11.CLIENT))
                stream, rest = await self.open_tunnel("ws", "fresh")
                async with stream:
                    before = len(self.t.unexpected)
                    await self.echo_check(stream, rest, "fresh", trio.current_time())
                    return ok and len(self.t.unexpected) == before
        except Exception as exc:
            self.error("fresh exchange", exc)
            return False

    def held(self) -> int:
        """Proxy descriptors (every process of it) minus the idle pooled upstream connections."""
        assert self.proxy is not None
        return self.proxy.all_descriptors() - len(self.a.conns) - len(self.b.conns)

    async def held_once_steady(self) -> int:
        """`held()` once it has not changed for half a second: the baseline, after the start
        and the warm-up (polled from a thread: the upstreams run in this event loop)."""
        return await trio.to_thread.run_sync(steady, self.held, 0.5, 30)

    async def settle(self, baseline: int, processes: int) -> int:
        """`held()` once back to `baseline` and once the generations an upgrade retired have
        exited (or after 15 s: the verdict then says by how much it is not)."""
        assert self.proxy is not None
        proxy = self.proxy

        def settled() -> bool:
            return self.held() <= baseline and len(proxy.processes()) <= processes

        await trio.to_thread.run_sync(eventually, settled, 15)
        return self.held()

    async def all_workers_ready(self) -> None:
        """Until the proxy accepts; with `workers: N`, until all N serve (the first one
        accepting is not enough), and each has served a request: a worker opens its metrics
        files on its first one."""
        assert self.proxy is not None
        await trio.to_thread.run_sync(self.proxy.ready, self.options.workers, 30)
        if self.options.workers == 1:
            return
        for _ in range(8 * self.options.workers):  # SO_REUSEPORT spreads them over all
            async with await self.connect() as stream:
                await self.one_request(stream, h11.Connection(h11.CLIENT))

    @staticmethod
    def rss_of(pids: set[int] | list[int]) -> list[int]:
        sizes = []
        for pid in pids:
            with contextlib.suppress(OSError, RuntimeError):  # exited meanwhile
                sizes.append(procfs.rss_bytes(pid))
        return sizes


def dropped(stream: trio.SocketStream) -> bool:
    """urllib3's `is_connection_dropped`: an idle connection that is readable (EOF, or bytes
    nobody asked for) is not to be reused."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "0")) or None)
    parser.add_argument("--workers", type=int, default=1, help="the proxy's `workers`")
    parser.add_argument(
        "--upgrade-every", type=float, default=0, metavar="SECONDS",
        help="send SIGUSR2 (a new generation) this often; 0: never",
    )  # fmt: skip
    parser.add_argument("--http-clients", type=int, default=4, help="keep-alive HTTP clients")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: seed {seed} (rerun with --seed {seed})")
    options = Options(args.seconds, seed, args.workers, args.upgrade_every, args.http_clients)
    sys.exit(trio.run(Soak(options).main))


if __name__ == "__main__":
    main()
