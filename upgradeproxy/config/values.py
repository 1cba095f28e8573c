"""Parsers for single config values: durations, addresses, hosts, paths, tokens, networks.

Pure functions: each returns the value or raises ValueError with a message that says what was
expected and what was found, for `loader.py` to attach a file, line and field to.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from upgradeproxy.config.model import Address, IPNetwork

T = TypeVar("T")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"  # RFC 9110 tchar, matched after lower-casing
_PROTOCOL = re.compile(rf"{_TOKEN}(?:/{_TOKEN})?")
_PATH = re.compile(r"/[^\x00-\x20\x7f?#]*")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = "a duration in seconds (5, 2.5) or a string like '250ms', '5s', '1m', '1h30m'"
ADDRESS_HINT = "host:port like '127.0.0.1:8080', '[::1]:8080' or 'localhost:80'"
HOST_HINT = "a hostname like 'chat.example.com'"
WILDCARD_HINT = f"{HOST_HINT} or a wildcard like '*.example.com'"
PROTOCOL_HINT = "a protocol token like 'websocket', 'h2c' or 'SPDY/3.1'"
NETWORK_HINT = "a CIDR like '10.0.0.0/8' or an IP address"
PATH_HINT = "a path starting with '/' (no spaces, '?' or '#')"


def parse_duration(value: object) -> float:
    """Seconds from a number, a numeric string or one like '250ms', '5s', '1h30m'; >= 0.

    Units are case-sensitive, as nginx's are: there `5M` means five months, so an upper-case
    unit is a problem with a hint rather than a guess.
    """
    seconds = _duration_seconds(value)
    if seconds is None or not seconds < math.inf:  # NaN fails this too.
        raise ValueError(f"expected {DURATION_HINT}, found {show(value)}{_unit_hint(value)}")
    if seconds < 0:
        raise ValueError(f"expected a duration of zero or more, found {show(value)}")
    return seconds


def _duration_seconds(value: object) -> float | None:
    """The signed seconds `value` spells, or None when it spells no duration."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.removeprefix("-")
    if _NUMBER.fullmatch(text):  # "5" means seconds, as the number 5 does
        return sign * float(text)
    if _DURATION.fullmatch(text):
        return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    return None


def _unit_hint(value: object) -> str:
    if isinstance(value, str) and _DURATION.fullmatch(lower := value.strip().lower()):
        return f" (units are case-sensitive: did you mean {lower!r}?)"
    return ""


def parse_address(value: str) -> Address:
    """An `Address` from 'host:port' or '[v6]:port'; port 0 is allowed (ephemeral)."""
    try:
        return _address(value)
    except ValueError as exc:
        raise ValueError(f"expected {ADDRESS_HINT}, found {show(value)} ({exc})") from None


def _address(value: object) -> Address:
    if not isinstance(value, str):
        raise ValueError("not a string")
    host, sep, port = value.rpartition(":")
    if not sep or value.endswith("]"):
        raise ValueError("no port")
    if host.startswith("[") and host.endswith("]"):
        host = _ip_literal(host[1:-1], 6)
    elif ":" in host or "[" in host:
        raise ValueError("an IPv6 address needs brackets, like '[::1]:8080'")
    elif re.fullmatch(r"[0-9.]+", host):
        host = _ip_literal(host, 4)
    elif not host:
        raise ValueError("no host; use 0.0.0.0 or [::] for every interface")
    elif not _HOSTNAME.fullmatch(host := host.lower()):
        raise ValueError(f"{host!r} is not a valid host name")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return Address(host, int(port))


def _ip_literal(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")
    return str(ip)


def suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(options)})" if options else ""


def show(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return f"the string {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"


MAX_WORKERS = 256  # far past any useful count of processes; catches a stray extra digit


def workers(value: object) -> int:
    if isinstance(value, int) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, found {show(value)}")


def positive(value: object) -> int:
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(f"expected a positive whole number, found {show(value)}")


def timeout(value: object) -> float:
    """A duration that must be positive; zero and negatives get one message."""
    seconds = _duration_seconds(value)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, found {show(value)}")
    return parse_duration(value)


def upstream_address(text: str) -> Address:
    address = parse_address(text)
    if address.port == 0:  # Only a listener can ask the kernel to pick a port.
        raise ValueError(f"expected a port from 1 to 65535, found {show(text)} (port 0)")
    return address


def choice(options: Mapping[str, T]) -> Callable[[object], T]:
    def pick(value: object) -> T:
        if str(value) in options:
            return options[str(value)]
        raise ValueError(f"unknown value {value!r}{suggest(str(value), list(options))}")

    return pick


def host(value: object, *, wildcard: bool = False) -> str:
    host = str(value).lower()
    bare = host[2:] if wildcard and host.startswith("*.") else host
    if _HOSTNAME.fullmatch(bare) and len(bare) <= 253:
        return host
    hint = ""
    if re.search(r":[0-9]*$", host):
        hint = " (leave out the port)"
    elif "*" in host:
        hint = " (a wildcard must be the whole leftmost label; omit 'host' to match any host)"
    raise ValueError(
        f"expected {WILDCARD_HINT if wildcard else HOST_HINT}, found {show(value)}{hint}"
    )


def path(value: object) -> str:
    if _PATH.fullmatch(str(value)):
        return str(value)
    raise ValueError(f"expected {PATH_HINT}, found {show(value)}")


def protocol(value: object) -> str:
    if _PROTOCOL.fullmatch(token := str(value).lower()):
        return token
    raise ValueError(f"expected {PROTOCOL_HINT}, found {show(value)}")


def network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"expected {NETWORK_HINT}, found {show(value)}") from None


# Durations where 0 means "none" (no delay, no grace); every other timeout must be above 0.
ZERO_ALLOWED = frozenset(
    {"timeouts.drain_delay", "timeouts.upgrade_grace", "timeouts.keepalive_drain"}
)
