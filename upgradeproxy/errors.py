"""Errors that end an exchange with a short HTTP response.

Each carries the status the client gets, a `kind` (the `upstream_errors_total{kind}` label
when the upstream is to blame) and whether the client connection must close afterwards.
"""

from __future__ import annotations

from typing import Literal

# The `kind` label values: fixed here so metric labels cannot drift between call sites.
ErrorKind = Literal[
    "internal",
    "bad_request",
    "request_timeout",
    "no_route",
    "method_not_allowed",
    "connect",  # refused or unreachable
    "connect_timeout",
    "reset",  # closed or reset before or during the response
    "protocol",  # a response h11 could not parse
    "bad_switch",  # a 101 that does not answer the offer
    "timeout",  # no response within upstream_response
    "unavailable",  # every server of the upstream down or full: 503, no connect attempt
    "origin",  # an upgrade from an Origin the route does not allow: 403
    "limited",  # a client address over limits.max_connections_per_ip: 429
]


class ClientGone(Exception):
    """The client closed or reset; nothing more can be said to it."""


class ProxyError(Exception):
    """Base: the exchange fails with `status`; `close` ends the client connection."""

    status: int = 500
    kind: ErrorKind = "internal"
    close: bool = False
    upstream_side: bool = False
    # Connect failures are counted per server tried, where they happen; the error that ends
    # the exchange after them must not be counted again.
    counted: bool = False

    def __init__(
        self, detail: str = "", *, status: int | None = None, kind: ErrorKind | None = None
    ) -> None:
        super().__init__(detail or self.__class__.__name__)
        self.detail = detail
        # Per-instance refinements: h11's status hint (431, 501), the exact upstream failure.
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind


class BadRequest(ProxyError):
    status = 400
    kind = "bad_request"
    close = True


class RequestTimeout(ProxyError):
    status = 408
    kind = "request_timeout"
    close = True


class NoRoute(ProxyError):
    status = 404
    kind = "no_route"


class MethodNotAllowed(ProxyError):
    status = 405
    kind = "method_not_allowed"
    close = True


class UpstreamUnavailable(ProxyError):
    """Refused, reset or closed before a response head arrived."""

    status = 502
    kind = "connect"
    upstream_side = True


class BadSwitch(ProxyError):
    """A 101 that does not answer what was offered."""

    status = 502
    kind = "bad_switch"
    close = True
    upstream_side = True


class UpstreamTimeout(ProxyError):
    status = 504
    kind = "timeout"
    upstream_side = True


class NoServerAvailable(ProxyError):
    """Every server of the upstream is down or full: answered at once, with Retry-After."""

    status = 503
    kind = "unavailable"
    upstream_side = True

    def __init__(self, detail: str = "", *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class OriginRefused(ProxyError):
    """An upgrade whose Origin matches none of the route's `allowed_origins`."""

    status = 403
    kind = "origin"


class TooManyConnections(ProxyError):
    """The client address holds `limits.max_connections_per_ip` connections already."""

    status = 429
    kind = "limited"
    close = True


REASONS: dict[int, bytes] = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError behind a failed start (trio wraps it in groups), if that is all it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None
