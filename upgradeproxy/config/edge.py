"""Value checks for the edge settings: origins, tunnel lifetime, per-client limits, PROXY out.

The origin syntax lives here rather than in rules/ because the loader (which may not import
rules) validates `allowed_origins` with it; rules/origins.py matches request headers with it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final

from upgradeproxy.config.model import DrainTunnels
from upgradeproxy.config.values import show

DRAIN_TUNNELS: Final[Mapping[str, DrainTunnels]] = {"wait": "wait", "spread": "spread"}
PROXY_VERSIONS: Final[Mapping[str, int]] = {"v1": 1, "v2": 2}
ORIGIN_HINT: Final = "an origin like 'https://chat.example.com' or 'https://*.example.com'"
MIN_TUNNEL_LIFETIME: Final = 1.0

# RFC 6454 §6.1 serialises an origin as scheme "://" host [":" port], the port only when it is
# not the scheme's default; browsers send exactly that, so both sides are compared that way.
DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")
_LABEL: Final = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


def parse_origin(text: str, *, wildcard: bool = False) -> tuple[str, str, int | None]:
    """(scheme, host, port or None for the default) of a serialised origin, lower-cased.

    With `wildcard`, a host `*.suffix` is allowed (kept as written). Raises ValueError with a
    reason for anything else: a path, a query, user info, no scheme, a bad host or port.
    """
    scheme, sep, rest = text.strip().lower().partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError("no scheme (expected scheme://host)")
    for char, what in (("/", "a path"), ("?", "a query"), ("#", "a fragment"), ("@", "user info")):
        if char in rest:
            raise ValueError(f"an origin has no {what}")
    host, port = _split_port(rest)
    bare = host[2:] if wildcard and host.startswith("*.") else host
    if not _valid_host(bare):
        raise ValueError(f"bad host {host!r}")
    if port == DEFAULT_PORTS.get(scheme):
        port = None
    if host.startswith("["):
        host = f"[{ipaddress.ip_address(host[1:-1])}]"  # one spelling per address
    return scheme, host.rstrip("."), port


def _split_port(rest: str) -> tuple[str, int | None]:
    if rest.startswith("["):  # an IPv6 literal: [::1] or [::1]:8080
        end = rest.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in host")
        host, after = rest[: end + 1], rest[end + 1 :]
        if not after:
            return host, None
        if not after.startswith(":"):
            raise ValueError(f"junk after host: {after!r}")
        return host, _port(after[1:])
    host, colon, port = rest.rpartition(":")
    return (host, _port(port)) if colon else (rest, None)


def _port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 0xFFFF:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    return bool(_HOSTNAME.fullmatch(host)) and len(host) <= 253


def serialise_origin(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def origin_entry(value: object) -> str:
    """An `allowed_origins` entry in canonical form (lower case, default port left out)."""
    try:
        return serialise_origin(*parse_origin(str(value), wildcard=True))
    except ValueError as exc:
        raise ValueError(f"expected {ORIGIN_HINT}, found {show(value)}: {exc}") from None


def tunnel_lifetime(seconds: float) -> float:
    """0 (no limit) or at least a second: shorter would turn every tunnel into a reconnect loop."""
    if seconds == 0 or seconds >= MIN_TUNNEL_LIFETIME:
        return seconds
    raise ValueError(
        f"expected 0 (no limit) or at least {MIN_TUNNEL_LIFETIME:g}s, found {show(seconds)}"
    )


def non_negative(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected a whole number, 0 or more (0: no limit), found {show(value)}")
