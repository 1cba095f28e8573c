"""The request plan: from a parsed request head to what goes upstream, or the error that answers.

Pure, like Go's `ProxyRequest{In, Out}` with `Rewrite`: the exchange reads a head with h11,
hands it here as plain data, and either sends the `Plan` it gets or answers the `ProxyError`.
Every decision about a request (validation, route, upgrade offer, forwarding headers, body
framing) is made here once; the I/O code never re-reads a header to decide something.

Two steps, so the access log can name what was known when a later check failed:
`locate` (request line, Host, route) and `plan` (everything sent upstream).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from upgradeproxy.config.model import Config, Route, Upstream
from upgradeproxy.errors import BadRequest, MethodNotAllowed, NoRoute, OriginRefused
from upgradeproxy.pool import sticky
from upgradeproxy.rules import headers as hdr
from upgradeproxy.rules.forwarding import Hop, is_trusted, upstream_request_headers
from upgradeproxy.rules.origins import origin_problem
from upgradeproxy.rules.routing import Router, normalize_host, split_target

BodyFraming = Literal["none", "length", "chunked"]
_SUPPORTED_VERSIONS: Final = (b"1.0", b"1.1", b"2")  # b"2": an HTTP/2 stream (rules.http2)
_REQUEST_LINE: Final = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^\s]+) HTTP/[0-9]\.[0-9]\r?\n")
REQUEST_ID: Final = b"X-Request-ID"
CLIENT_CERT: Final = b"X-Client-Cert-Subject"
# Set by the proxy only: a client's own would let it claim any certificate or id.
_OURS: Final = frozenset({b"x-client-cert-subject", b"x-request-id"})


@dataclass(frozen=True, slots=True)
class Head:
    """A request head as h11 parsed it (names in their arrival case)."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Origin:
    """Who sent the request, as the listener learned it."""

    ip: str  # from the socket, or from a PROXY header
    proto: bytes  # b"http" or b"https"
    client_cert: str | None = None  # the verified TLS client certificate's subject


@dataclass(frozen=True, slots=True)
class Located:
    """A head whose request line and Host are valid and which a route matched."""

    route: Route
    authority: bytes | None  # Host, or the absolute-form target's authority (it wins)
    path: str  # for routing and the log: no query
    target: bytes  # origin-form, to send upstream
    absolute: bool

    @property
    def route_label(self) -> str:
        """The route's name in metrics and logs: its host (or `*`) and path prefix."""
        return route_label(self.route)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the exchange sends upstream and what the answer must prove."""

    located: Located
    upstream: Upstream
    headers: list[tuple[bytes, bytes]]  # ready to send, Host included when one is known
    offer: tuple[bytes, ...]  # protocols offered upstream; () for a plain request
    ws_key: bytes | None  # the Sec-WebSocket-Key a 101 must answer
    body: BodyFraming
    needs_host: bool  # HTTP/1.0 with no Host: the exchange adds the server's address
    request_id: bytes | None = None  # sent upstream and on the response; None: turned off
    balance_key: bytes | None = None  # what `balance: hash` hashes; None: round robin
    pin: str | None = None  # the sticky cookie's value the client sent, if any

    @property
    def route(self) -> Route:
        return self.located.route

    @property
    def has_body(self) -> bool:
        return self.body != "none"


def route_label(route: Route) -> str:
    return f"{route.host or '*'}{route.path_prefix}"


def log_fields(head: Head) -> tuple[str, str, str]:
    """(method, host, path) for the access log, known as soon as the request line parsed."""
    host = b",".join(hdr.get_all(head.headers, b"host")).decode("latin-1")
    path = head.target.split(b"?", 1)[0].decode("latin-1")
    return head.method.decode("latin-1"), host, path


def locate(head: Head, router: Router) -> Located:
    """Check the request line and Host, then route; raises the ProxyError that answers."""
    if head.http_version not in _SUPPORTED_VERSIONS:
        raise BadRequest(f"unsupported HTTP version {head.http_version.decode('latin-1')}")
    if head.method == b"CONNECT":
        raise MethodNotAllowed("CONNECT is not supported")
    if problem := hdr.framing_problem(head.headers, head.http_version):
        raise BadRequest(problem)
    try:
        target = split_target(head.method, head.target, head.headers)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    route = router.match(normalize_host(target.authority), target.path)
    if route is None:
        host = (target.authority or b"").decode("latin-1")
        raise NoRoute(f"no route for {host}{target.path}")
    return Located(route, target.authority, target.path, target.target, target.absolute)


def request_line(buf: bytes) -> tuple[str, str]:
    """(method, path) of a head h11 rejected, for the log; ("", "") if its first line is bad."""
    found = _REQUEST_LINE.match(buf)
    if found is None:
        return "", ""
    return found[1].decode("latin-1"), found[2].split(b"?", 1)[0].decode("latin-1")


def log_extras(head: Head, config: Config) -> tuple[str | None, str]:
    """(query or None when not logged, user agent) for the access log."""
    query = head.target.partition(b"?")[2].decode("latin-1") if config.access_log.query else None
    agent = hdr.get_all(head.headers, b"user-agent")
    return query, (agent[0].decode("latin-1") if agent else "")


def request_id(
    headers: Sequence[tuple[bytes, bytes]], origin: Origin, config: Config,
    new: Callable[[], bytes],
) -> bytes | None:  # fmt: skip
    """The request's id: a trusted peer's X-Request-ID as is, else a fresh one from `new`."""
    if not config.request_id:
        return None
    found = hdr.get_all(headers, b"x-request-id")
    if found and found[0] and is_trusted(origin.ip, config.trusted_proxies):
        return found[0]
    return new()


def with_request_id(
    headers: list[tuple[bytes, bytes]], rid: bytes | None
) -> list[tuple[bytes, bytes]]:
    """Response `headers` carrying the request's id (an upstream's own is replaced)."""
    if rid is None:
        return headers
    return [*(h for h in headers if h[0].lower() != b"x-request-id"), (REQUEST_ID, rid)]


def plan(
    head: Head, located: Located, origin: Origin, config: Config, rid: bytes | None = None
) -> Plan:
    """The request to send upstream for a located head; raises BadRequest for a bad handshake.

    `rid` is the `request_id` decided for it (None when turned off).
    """
    route = located.route
    try:
        offer, ws_key = hdr.upgrade_offer(
            head.method, head.http_version, head.headers, route.upgrade_tokens
        )
    except ValueError as exc:
        raise BadRequest(f"malformed WebSocket handshake: {exc}") from None
    if offer and route.allowed_origins is not None:
        # Rule 12: only what would go upstream as an upgrade; a stripped offer is plain HTTP.
        problem = origin_problem(hdr.get_all(head.headers, b"origin"), route.allowed_origins)
        if problem is not None:
            raise OriginRefused(f"{problem} on route {route_label(route)}")
    framing, body = body_framing(head.headers)
    hop = Hop(
        client_ip=origin.ip,
        proto=origin.proto,
        host=located.authority,
        trusted=is_trusted(origin.ip, config.trusted_proxies),
        http_version=head.http_version,
    )
    raw = head.headers
    if located.absolute:
        # RFC 9112 §3.2.2: the target's authority replaces Host, as routing used it.
        raw = [(n, v) for n, v in raw if n.lower() != b"host"]
    if rid is not None or origin.client_cert is not None or _has_ours(raw):
        raw = [(n, v) for n, v in raw if n.lower() not in _OURS or (rid is None and
               n.lower() == b"x-request-id")]  # fmt: skip
    headers = upstream_request_headers(raw, hop, offer, framing)
    if located.absolute and located.authority is not None:
        headers.insert(0, (b"Host", located.authority))
    if rid is not None:
        headers.append((REQUEST_ID, rid))
    if origin.client_cert is not None:
        headers.append((CLIENT_CERT, origin.client_cert.encode()))
    upstream = config.upstreams[route.upstream]
    key, pin, headers = sticky_inputs(upstream, head, origin, headers)
    return Plan(
        located=located,
        upstream=upstream,
        headers=headers,
        offer=tuple(offer),
        ws_key=ws_key,
        body=body,
        needs_host=located.authority is None,
        request_id=rid,
        balance_key=key,
        pin=pin,
    )


def _has_ours(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(n.lower() == b"x-client-cert-subject" for n, _ in headers)


def sticky_inputs(
    upstream: Upstream, head: Head, origin: Origin, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes | None, str | None, list[tuple[bytes, bytes]]]:
    """(hash key, sticky cookie value, headers without that cookie) for rule 9."""
    key = None
    if upstream.hash_key is not None:
        key = sticky.balance_key(upstream.hash_key, head.headers, head.target, origin.ip)
    pin = None
    if upstream.sticky_cookie is not None:
        name = upstream.sticky_cookie.encode()
        value = sticky.cookie(head.headers, name)
        pin = None if value is None else value.decode("latin-1")
        headers = sticky.without_cookie(headers, name)
    return key, pin, headers


def body_framing(
    headers: Sequence[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], BodyFraming]:
    """The framing header to send upstream and the body's framing (h11 validated it)."""
    if hdr.get_all(headers, b"transfer-encoding"):
        return [(b"Transfer-Encoding", b"chunked")], "chunked"
    lengths = hdr.get_all(headers, b"content-length")
    if lengths:
        # Canonical digits: "0002" is valid, but an upstream that caps the digit count
        # (a 64-bit parser) must not read a different length than h11 did.
        length = int(lengths[0].split(b",")[0])
        return [(b"Content-Length", b"%d" % length)], "length" if length > 0 else "none"
    return [], "none"
