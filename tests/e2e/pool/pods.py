"""Pods behind a headless Service, on loopback: named backends on 127.0.0.2, 127.0.0.3, ...
all on one port, a DNS server that names them, and a config for a proxy that discovers them.

A pod is a `pool_peers.Backend` (plain requests answered with its name, WebSocket upgrades
accepted with its name behind the 101 and then echoed, a switchable /healthz) bound to its
own loopback address.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable

from tests.conftest import RawConn, RawUpstream
from tests.dns_server import DnsServer
from tests.e2e.pool_peers import Backend

NAME = "chat.test"


class BoundUpstream(RawUpstream):
    """A `RawUpstream` listening on a given address (RawUpstream binds 127.0.0.1:0)."""

    def __init__(self, handler: Callable[[RawConn], None], host: str, port: int) -> None:
        self.listener = socket.create_server((host, port))
        self.port = port
        self.conns: list[RawConn] = []
        self.handler = handler
        self._accepted = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()


class Pod(Backend):
    """A named backend on its own loopback address; `name` is that address."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        super().__init__(lambda handler: BoundUpstream(handler, host, port), host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self.up.close()


def make(n: int, first: int = 2, port: int | None = None) -> list[Pod]:
    """`n` pods on 127.0.0.FIRST.. (one port for all)."""
    hosts = [f"127.0.0.{first + i}" for i in range(n)]
    port = port or common_port(hosts)
    return [Pod(host, port) for host in hosts]


def common_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, port))
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError("no port free on every pod address")


def discover_yaml(
    dns: DnsServer,
    port: int = 0,
    keys: str = "",
    *,
    name: str = NAME,
    interval: str = "1s",
    discover: str = "",
    top: str = "",
) -> str:
    """A proxy in front of upstream `app`, discovered as `name` from `dns`, with an admin
    listener; `keys` are more keys of the upstream, `discover` of its discover block, `top`
    more top-level keys (a `timeouts:` there replaces the default one)."""
    upstream = "\n".join("    " + line for line in keys.strip().splitlines())
    port_line = f"\n      port: {port}" if port else ""
    extra = "".join(f"\n      {line}" for line in discover.strip().splitlines())
    timeouts = "" if "timeouts:" in top else "\ntimeouts: {connect: 1, drain: 2}"
    return f"""
listen:
  - address: "127.0.0.1:0"
admin:
  address: "127.0.0.1:0"
upstreams:
  app:
    discover:
      name: "{name}"{port_line}
      interval: "{interval}"
      resolvers: ["{dns.address}"]{extra}
{upstream}
routes:
  - upstream: app{timeouts}
{top}
"""
