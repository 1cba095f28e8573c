"""The validated configuration as frozen plain data.

Nothing here does I/O: `loader.py` turns YAML into these objects, and everything else reads
them. A `Config` is immutable so a reload can swap it atomically under running connections.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final, Literal

Balance = Literal["round_robin", "least_conn", "hash"]
HashKeyKind = Literal["client_ip", "header", "cookie", "query"]
DrainTunnels = Literal["wait", "spread"]
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
ClientAuth = Literal["request", "require"]
OnRemoval = Literal["keep", "drain"]
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
class TlsCertificate:
    """One certificate of a listener; `names` (lower-case, `*.` wildcards) select it by SNI."""

    cert: str
    key: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """`cert`/`key` are the default pair; `certificates` lists every pair, the default first."""

    cert: str
    key: str
    min_version: TlsVersion = "TLSv1.2"
    ciphers: str | None = None  # OpenSSL cipher string (TLS 1.2 and below)
    certificates: tuple[TlsCertificate, ...] = ()
    client_ca: str | None = None
    client_auth: ClientAuth | None = None  # set whenever client_ca is


@dataclass(frozen=True, slots=True)
class Listener:
    address: Address
    tls: ListenerTls | None = None
    proxy_protocol: bool = False
    http2: bool = False  # rule 17: HTTP/2 by ALPN on TLS, by prior knowledge in cleartext


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
    cert: str | None = None  # a client certificate presented to the upstream (with `key`)
    key: str | None = None


@dataclass(frozen=True, slots=True)
class HashKey:
    """What `balance: hash` hashes: the client address, or a header, cookie or query value."""

    kind: HashKeyKind
    name: str = ""  # a header name lower-cased; cookie and query names as written

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active checks of every server of an upstream; durations in seconds."""

    path: str = "/"
    upgrade: str | None = None  # "websocket": a real handshake, healthy only on a verified 101
    interval: float = 5.0
    timeout: float = 2.0
    healthy_after: int = 2
    unhealthy_after: int = 3


@dataclass(frozen=True, slots=True)
class Discover:
    """Servers found in DNS (rule 16): what `name` resolves to, looked up every `interval`.

    A name starting with "_" is an SRV name (its records carry ports and weights); any other
    is looked up as A and AAAA records, each address a server on `port`.
    """

    name: str  # lower-case; a trailing "." makes it absolute (no search domains)
    port: int = 0  # 0 for an SRV name
    interval: float = 5.0
    resolvers: tuple[Address, ...] = ()  # empty: the system's (/etc/resolv.conf)
    on_removal: OnRemoval = "keep"

    @property
    def srv(self) -> bool:
        return self.name.startswith("_")

    @property
    def source(self) -> tuple[str, int, tuple[Address, ...]]:
        """What decides the set of servers: a reload that keeps it keeps the set."""
        return (self.name, self.port, self.resolvers)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    servers: tuple[Server, ...]  # empty with `discover`: the servers come from DNS
    balance: Balance = "round_robin"
    tls: UpstreamTls | None = None
    proxy_protocol: int = 0  # 0: none; 1 or 2: send a PROXY header of that version (rule 15)
    hash_key: HashKey | None = None
    sticky_cookie: str | None = None
    max_tunnels: int = 0  # per server; 0: no cap
    slow_start: float = 0.0  # seconds; 0: a server takes its full weight at once
    health_check: HealthCheck | None = None
    discover: Discover | None = None


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    """A route's `websocket` block (rule 18): its tunnels' frames are read; 0 means no limit."""

    max_message_bytes: int = 0
    max_frame_bytes: int = 0
    messages_per_second: int = 0  # client to server, per tunnel; also the burst size


@dataclass(frozen=True, slots=True)
class Route:
    """A routing rule; `host` is lower-case, `upgrade` holds lower-case protocol tokens."""

    upstream: str
    host: str | None = None
    path_prefix: str = "/"
    upgrade: tuple[str, ...] = DEFAULT_UPGRADE
    upgrade_tokens: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    # Canonical origins (config/edge.py); None: no Origin check (rule 12).
    allowed_origins: tuple[str, ...] | None = None
    websocket: WebSocketLimits | None = None  # None: the tunnel splices bytes unread

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
    tunnel_max_lifetime: float = 0.0  # 0: none; else closed this long after the 101 (+0-10%)
    drain_delay: float = 0.0  # listeners keep accepting this long after /readyz turns 503
    upgrade_grace: float = 3600.0  # an old generation's connections get this long after SIGUSR2
    # From a drain's (or retirement's) start, an idle keep-alive connection stays open this
    # long for a request already on its way; 0: closed at once unless a byte of one arrived.
    keepalive_drain: float = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_header_bytes: int = 16384
    max_connections: int = 10000
    max_connections_per_ip: int = 0  # 0: no limit; per worker, by client address (rule 14)
    http2_max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS (rule 17)


@dataclass(frozen=True, slots=True)
class AccessLog:
    query: bool = False  # off: WebSocket URLs often carry tokens in the query


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
    drain_tunnels: DrainTunnels = "wait"  # or "spread": close tunnels evenly over the drain
    access_log: AccessLog = field(default_factory=AccessLog)
    request_id: bool = True  # pass a trusted X-Request-ID through, else set a fresh one
    warnings: tuple[str, ...] = ()  # `file:line: field: why` lines that do not stop a start
