"""The `discover` block of an upstream (interface.md rule 16), checked with its file and line.

`check` reports: `servers` and `discover` together (or neither), an A/AAAA name without
`port`, an `interval` under a second, an `on_removal` other than keep or drain, a name that is
not a DNS name, and a resolver that is not an IP address (a resolver's own name would need a
resolver).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from yaml.nodes import Node

from upgradeproxy.config import values
from upgradeproxy.config.model import Address, Discover, OnRemoval

if TYPE_CHECKING:
    from upgradeproxy.config.checker import Checker

STR, INT, FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float"))
DISCOVER_KEYS: Final = ("name", "port", "interval", "resolvers", "on_removal")
ON_REMOVAL: Final[Mapping[str, OnRemoval]] = {"keep": "keep", "drain": "drain"}
MIN_INTERVAL: Final = 1.0
DEFAULT_INTERVAL: Final = 5.0
DNS_PORT: Final = 53
NAME_HINT: Final = "a DNS name like 'chat-ws.default.svc.cluster.local' or '_ws._tcp.chat'"
RESOLVER_HINT: Final = "an IP address with a port, like '10.96.0.10:53' or '[fd00::a]:53'"
# RFC 1035 labels, plus '_' (RFC 2782 SRV names, and names Kubernetes gives services).
_LABEL: Final = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def dns_name(value: object) -> str:
    """A lower-case DNS name (a trailing dot kept: it means "no search domains")."""
    text = str(value).strip().lower()
    if _is_ip(text.strip("[]")):
        raise ValueError(f"expected {NAME_HINT}, found the address {text!r} (use servers)")
    if not _NAME.fullmatch(text) or len(text.rstrip(".")) > 253:
        raise ValueError(f"expected {NAME_HINT}, found {values.show(value)}")
    return text


def resolver(value: object) -> Address:
    """`IP:port` or a bare IP (port 53); names are refused."""
    text = str(value).strip()
    if _is_ip(text):
        return Address(str(ipaddress.ip_address(text)), DNS_PORT)
    try:
        address = values.upstream_address(text)
    except ValueError:
        raise ValueError(f"expected {RESOLVER_HINT}, found {values.show(value)}") from None
    if not _is_ip(address.host):
        raise ValueError(f"expected {RESOLVER_HINT}, found the name {address.host!r}")
    return address


def interval(value: object) -> float:
    seconds = values.parse_duration(value)
    if seconds < MIN_INTERVAL:
        raise ValueError(f"expected at least {MIN_INTERVAL:g}s, found {values.show(value)}")
    return seconds


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def port(value: object) -> int:
    if isinstance(value, int) and 1 <= value <= 65535:
        return value
    raise ValueError(f"expected a port from 1 to 65535, found {values.show(value)}")


def discover(c: Checker, node: Node, field: str) -> Discover | None:
    """The `discover` block, or None after reporting every problem in it."""
    what = f"a mapping with 'name' and some of: {', '.join(DISCOVER_KEYS[1:])}"
    found = c.mapping(node, field, DISCOVER_KEYS, ("name",), what)
    if found is None:
        return None
    mark = len(c.problems)
    name = c.scalar(found.get("name"), f"{field}.name", NAME_HINT, (STR,), dns_name)
    number = c.scalar(found.get("port"), f"{field}.port", "a port number", (INT,), port)
    every = c.scalar(
        found.get("interval"), f"{field}.interval", values.DURATION_HINT, (INT, FLOAT, STR),
        interval,
    )  # fmt: skip
    on_removal = c.scalar(
        found.get("on_removal"), f"{field}.on_removal", "keep or drain", (STR,),
        values.choice(ON_REMOVAL),
    )  # fmt: skip
    resolvers = _resolvers(c, found.get("resolvers"), f"{field}.resolvers")
    if name is not None and not name.startswith("_") and number is None and "port" not in found:
        why = "required for an A/AAAA name (only an SRV name, starting with '_', carries ports)"
        c.report(node, f"{field}.port", why)
    elif name is not None and name.startswith("_") and number is not None:
        c.warn(found["port"], f"{field}.port", "ignored: an SRV name's records carry the ports")
    if name is None or len(c.problems) > mark:
        return None
    return Discover(
        name=name,
        port=0 if name.startswith("_") else number or 0,
        interval=DEFAULT_INTERVAL if every is None else every,
        resolvers=resolvers,
        on_removal=on_removal or "keep",
    )


def _resolvers(c: Checker, node: Node | None, field: str) -> tuple[Address, ...]:
    items = c.sequence(node, field, "a list of resolvers like ['10.96.0.10:53']")
    if items == []:
        c.report(node, field, "expected at least one resolver (leave it out for the system's)")
    found: list[Address] = []
    for i, item in enumerate(items or ()):
        address = c.scalar(item, f"{field}[{i}]", RESOLVER_HINT, (STR,), resolver)
        if address is not None and address in found:
            c.report(item, f"{field}[{i}]", f"repeats {address}")
        elif address is not None:
            found.append(address)
    return tuple(found)
