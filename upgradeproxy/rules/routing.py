"""Route selection: first match in file order, by host and path prefix. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from upgradeproxy.config.model import Route
from upgradeproxy.rules.headers import get_all


def normalize_host(host: bytes | str | None) -> str | None:
    """Lower-cased host without port or trailing dot; `[::1]:80` -> `::1`; None if absent."""
    if host is None:
        return None
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else None
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".") or None


def host_matches(pattern: str | None, host: str | None) -> bool:
    """`None` matches any host; `*.example.com` matches one or more labels before the suffix."""
    if pattern is None:
        return True
    if host is None:
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Plain string prefix, as nginx's `location /prefix` without modifiers."""
    return path.startswith(prefix)


@dataclass(frozen=True, slots=True)
class Router:
    routes: Sequence[Route]

    def match(self, host: str | None, path: str) -> Route | None:
        """The first route whose host and path prefix both match, or None (404)."""
        for route in self.routes:
            if host_matches(route.host, host) and path_matches(route.path_prefix, path):
                return route
        return None


class Target(NamedTuple):
    """A request target taken apart; `absolute` when the authority came from the target."""

    authority: bytes | None
    path: str  # for routing: no query
    target: bytes  # origin-form, to send upstream
    absolute: bool = False


def split_target(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Target:
    """The authority, routing path and origin-form target of a request.

    Raises ValueError for targets and Host fields RFC 9112 §3.2 says to answer with 400.
    """
    hosts = get_all(headers, b"host")
    if len(hosts) > 1:
        raise ValueError("more than one Host header")
    authority = hosts[0].strip() if hosts else None
    absolute = target[:8].lower().startswith((b"http://", b"https://"))
    if absolute:
        # Absolute form: the authority in the target wins over Host (RFC 9112 §3.2.2).
        rest = target[target.index(b"//") + 2 :]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut], rest[cut:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    elif target == b"*":
        if method != b"OPTIONS":
            raise ValueError("asterisk-form target is only for OPTIONS")
        return Target(_checked_authority(authority), "*", target)
    elif not target.startswith(b"/"):
        raise ValueError("request target must be origin-form or absolute-form")
    path = target.split(b"?", 1)[0].decode("latin-1")
    return Target(_checked_authority(authority), path, target, absolute)


_AUTHORITY_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def _checked_authority(authority: bytes | None) -> bytes | None:
    if authority is not None and not _AUTHORITY_RE.fullmatch(authority):
        raise ValueError("invalid Host")
    return authority
