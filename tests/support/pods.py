"""Pods behind a headless Service, on loopback: named backends on 127.0.0.2, 127.0.0.3, ...
all on one port, and a config for a proxy that discovers them from a `DnsServer`.

A pod is a `Backend` (plain requests answered with its name, WebSocket upgrades accepted with
its name behind the 101 and then echoed, a switchable /healthz) bound to its own loopback
address; its name is that address.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Mapping
from typing import Any

from tests.support.configs import config_yaml
from tests.support.dns_server import DnsServer
from tests.support.peers import Backend, RawUpstream

NAME = "chat.test"


class Pod(Backend):
    """A named backend on its own loopback address; `name` is that address."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        super().__init__(lambda handler: RawUpstream(handler, host, port), host)

    def close(self) -> None:
        self.up.close()


def make_pods(n: int, first: int = 2, port: int | None = None) -> list[Pod]:
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
    *,
    name: str = NAME,
    interval: str = "1s",
    discover: Mapping[str, Any] | None = None,
    listen: int = 0,
    admin: int = 0,
    timeouts: Mapping[str, Any] | None = None,
    top: Mapping[str, Any] | None = None,
    **keys: Any,
) -> str:
    """A proxy in front of upstream `app`, discovered as `name` (on `port`, if not from SRV)
    from `dns`, with an admin listener; `keys` are more keys of the upstream, `discover` of
    its discover block, `top` more top-level keys (workers=, ...)."""
    found: dict[str, Any] = {"name": name, "interval": interval, "resolvers": [dns.address]}
    if port:
        found["port"] = port
    app = {"discover": {**found, **(discover or {})}, **keys}
    return config_yaml(
        {"app": app}, listen=listen, admin=admin,
        timeouts=dict(timeouts or {"connect": 1, "drain": 2}), **(top or {}),
    )  # fmt: skip
