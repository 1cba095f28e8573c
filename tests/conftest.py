"""Fixtures only: each starts something from tests/support and ends it at teardown.

End-to-end tests are plain synchronous functions: each peer runs its own event loop in a
thread (trio for an in-process proxy, asyncio for `websockets`), and tests talk to them over
real loopback sockets with blocking clients, exactly as an outside user would.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import pods as pod_peers
from tests.support.certs import tls_keys, write_pair
from tests.support.clients import Address, raw_client
from tests.support.dns_server import DnsServer
from tests.support.peers import Handler, RawUpstream, WsUpstream
from tests.support.pods import Pod
from tests.support.processes import PY_M, DemoProcess, Process, ProxyProcess
from tests.support.proxy_thread import ProxyThread


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], ProxyThread]]:
    """`make_proxy(yaml_text)` starts a proxy in a thread (listen on `127.0.0.1:0`)."""
    started: list[ProxyThread] = []

    def make(yaml_text: str) -> ProxyThread:
        proxy = ProxyThread.from_yaml(yaml_text)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def ws_upstream() -> Iterator[Callable[..., WsUpstream]]:
    """`ws_upstream(handler=None, plain=None, **serve_kwargs)`: an echo (or custom) websockets
    upstream; `plain` answers requests that are no upgrade."""
    made: list[WsUpstream] = []

    def make(handler: Callable[..., Any] | None = None, plain: str | None = None,
             **kwargs: Any) -> WsUpstream:  # fmt: skip
        up = WsUpstream(handler, plain, **kwargs)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    """`raw_upstream(handler=None)`: a raw-socket upstream recording exact bytes."""
    made: list[RawUpstream] = []

    def make(handler: Handler | None = None) -> RawUpstream:
        up = RawUpstream(handler)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


@pytest.fixture
def client() -> Iterator[Callable[[ProxyThread | Address], socket.socket]]:
    """`client(proxy)`: a raw client socket to `proxy` (or an address), closed at teardown."""
    socks: list[socket.socket] = []

    def make(proxy: ProxyThread | Address) -> socket.socket:
        sock = raw_client(proxy.address if isinstance(proxy, ProxyThread) else proxy)
        socks.append(sock)
        return sock

    yield make
    for sock in socks:
        sock.close()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """`caplog`, capturing the access log of in-process proxies (read it with access_records)."""
    caplog.set_level(logging.INFO, logger="upgradeproxy.access")
    return caplog


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority."""
    return trustme.CA()


@pytest.fixture
def listener_tls(ca: trustme.CA, tmp_path: Path) -> dict[str, object]:
    """A listener's `tls` keys: a certificate from `ca` for localhost and 127.0.0.1."""
    return tls_keys(write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "proxy"))


@pytest.fixture
def spawn() -> Iterator[Callable[..., Process]]:
    """`spawn(argv, env=None, tty=False, **kwargs)`: any command, killed (with its process
    group) at the end of the test."""
    started: list[Process] = []

    def make(argv: Sequence[str], env: dict[str, str] | None = None, tty: bool = False,
             **kwargs: Any) -> Process:  # fmt: skip
        proc = Process(argv, env=env, tty=tty, **kwargs)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.close()


@pytest.fixture
def run_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`run_proxy(config, *args, workers=1, ready=True, command=PY_M, **kwargs)`:
    `upgradeproxy run` on `config` (a path, or YAML text written to a file in tmp_path),
    ready once it listens (every worker ready), killed with its group at the end of the test."""
    started: list[ProxyProcess] = []

    def run(config: Path | str, *args: str, workers: int = 1, ready: bool = True,
            command: Sequence[str] = PY_M, **kwargs: Any) -> ProxyProcess:  # fmt: skip
        if isinstance(config, str):
            path = tmp_path / f"proxy-{len(started)}.yaml"
            path.write_text(config)
            config = path
        proc = ProxyProcess(config, *args, command=command, **kwargs)
        started.append(proc)
        if ready:
            proc.ready(workers)
        return proc

    yield run
    for proc in started:
        proc.close()


@pytest.fixture
def demo() -> Iterator[DemoProcess]:
    """`upgradeproxy demo --port 0`, ready once its banner is out; killed at the end."""
    process = DemoProcess()
    yield process
    process.close()


@pytest.fixture
def make_pods() -> Iterator[Callable[..., list[Pod]]]:
    """`make_pods(n, first=2, port=None)`: pods on 127.0.0.FIRST.. (one port for all)."""
    made: list[Pod] = []

    def make(n: int, first: int = 2, port: int | None = None) -> list[Pod]:
        pods = pod_peers.make_pods(n, first, port)
        made.extend(pods)
        return pods

    yield make
    for pod in made:
        pod.close()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    """A DNS server on loopback answering from a table the test edits."""
    server = DnsServer()
    yield server
    server.close()
