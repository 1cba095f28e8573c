"""The validated configuration as frozen plain data.

Nothing here does I/O: `loader.py` turns YAML into these objects, and everything else reads
them. A `Config` is immutable so a reload can swap it atomically under running connections.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final, Literal

Balance = Literal["round_robin", "least_conn"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_UPGRADE: Final = ("websocket",)


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; `host` holds an IPv6 literal without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerTls:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class Listener:
    address: Address
    tls: ListenerTls | None = None
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class Admin:
    address: Address


@dataclass(frozen=True, slots=True)
class Server:
    """One upstream server; `weight` only matters to the balancer."""

    address: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    verify: bool = True
    ca: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    servers: tuple[Server, ...]
    balance: Balance = "round_robin"
    tls: UpstreamTls | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A routing rule; `host` is lower-case, `upgrade` holds lower-case protocol tokens."""

    upstream: str
    host: str | None = None
    path_prefix: str = "/"
    upgrade: tuple[str, ...] = DEFAULT_UPGRADE
    upgrade_tokens: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Encoded once here, not on every request.
        object.__setattr__(self, "upgrade_tokens", tuple(t.encode() for t in self.upgrade))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """All in seconds."""

    connect: float = 5.0
    request_header: float = 10.0
    upstream_response: float = 60.0
    idle: float = 75.0
    tunnel_idle: float = 3600.0
    drain: float = 30.0
    drain_delay: float = 0.0  # listeners keep accepting this long after /readyz turns 503
    upgrade_grace: float = 3600.0  # an old generation's connections get this long after SIGUSR2


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_header_bytes: int = 16384
    max_connections: int = 10000


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...]
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    admin: Admin | None = None
    workers: int = 1
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    source: str = "<memory>"
