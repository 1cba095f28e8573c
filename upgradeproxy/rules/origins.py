"""Rule 12: which `Origin` a route's `allowed_origins` lets upgrade (cross-site WebSocket
hijacking is stopped only by this check; browsers always send `Origin` on a WebSocket).

Pure: the request's Origin header values and the route's canonical entries in, a refusal
reason or None out. Both sides are compared in RFC 6454 serialisation (lower case, the
scheme's default port left out), so `https://a.com` and `https://A.com:443` are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from upgradeproxy.config.edge import parse_origin, serialise_origin


def origin_problem(values: Sequence[bytes], allowed: Sequence[str]) -> str | None:
    """Why an upgrade with these `Origin` header values is refused, or None to let it through.

    No header: not a browser, let through. Several headers, `null` (an opaque origin:
    sandboxed frames, file: pages) or anything that is not a serialised origin: refused.
    """
    if not values:
        return None
    if len(values) > 1:
        return "several Origin headers"
    text = values[0].decode("latin-1").strip()
    shown = text[:100]
    if text.lower() == "null":
        return "Origin null is never allowed"
    try:
        scheme, host, port = parse_origin(text)
    except ValueError as exc:
        return f"malformed Origin {shown!r}: {exc}"
    if not any(_matches(entry, scheme, host, port) for entry in allowed):
        return f"Origin {serialise_origin(scheme, host, port)[:200]} is not allowed"
    return None


def _matches(entry: str, scheme: str, host: str, port: int | None) -> bool:
    """Whether a canonical entry (`scheme://host[:port]` or `scheme://*.suffix[:port]`) fits."""
    e_scheme, e_host, e_port = parse_origin(entry, wildcard=True)
    if (e_scheme, e_port) != (scheme, port):
        return False
    if e_host.startswith("*."):
        # One or more labels, as route hosts match: `*.example.com` is not `example.com`.
        return host.endswith(e_host[1:]) and len(host) > len(e_host) - 1
    return host == e_host
