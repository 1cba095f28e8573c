"""The pool keys of an upstream (interface.md rules 9-11): hash_key, sticky_cookie,
max_tunnels, slow_start and health_check, each checked with its file and line.

Kept apart from `loader.py` so the loader calls one function for all of them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from yaml.nodes import Node

from upgradeproxy.config import values
from upgradeproxy.config.model import Balance, HashKey, HashKeyKind, HealthCheck, Upstream

if TYPE_CHECKING:
    from upgradeproxy.config.loader import _Checker

POOL_KEYS: Final = ("hash_key", "sticky_cookie", "max_tunnels", "slow_start", "health_check")
_STR, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float"))
_HEALTH_KEYS: Final = (
    "path", "upgrade", "interval", "timeout", "healthy_after", "unhealthy_after",
)  # fmt: skip
_KINDS: Final[dict[str, HashKeyKind]] = {
    "header": "header", "cookie": "cookie", "query": "query",
}  # fmt: skip
HASH_KEY_HINT: Final = "client_ip, header:NAME, cookie:NAME or query:NAME"
# RFC 6265 §4.1.1 cookie-name is an RFC 2616 token; header names are RFC 9110 tokens too.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUERY_NAME: Final = re.compile(r"[^\s&=#]+")


def hash_key(value: object) -> HashKey:
    """`client_ip`, `header:NAME`, `cookie:NAME` or `query:NAME`; raises ValueError otherwise."""
    text = str(value)
    if text == "client_ip":
        return HashKey("client_ip")
    kind, sep, name = text.partition(":")
    if not sep or kind not in _KINDS:
        raise ValueError(f"expected {HASH_KEY_HINT}, found {values.show(value)}")
    if not (_QUERY_NAME if kind == "query" else _TOKEN).fullmatch(name):
        raise ValueError(f"expected a {kind} name after '{kind}:', found {values.show(value)}")
    return HashKey(_KINDS[kind], name.lower() if kind == "header" else name)


def cookie_name(value: object) -> str:
    if _TOKEN.fullmatch(text := str(value)):
        return text
    found = values.show(value)
    raise ValueError(f"expected a cookie name (letters, digits, '-', '_'), found {found}")


def _websocket(value: object) -> str:
    if str(value).lower() == "websocket":
        return "websocket"
    raise ValueError(f"expected 'websocket' (the only upgrade checked), found {values.show(value)}")


def pool_settings(
    c: _Checker, found: dict[str, Node], field: str, base: Upstream, balance: Balance | None
) -> Upstream:
    """`base` with the pool keys present in `found`; reports every bad value."""
    key_node = found.get("hash_key")
    key = c.scalar(key_node, f"{field}.hash_key", HASH_KEY_HINT, (_STR,), hash_key)
    if balance == "hash" and key_node is None:
        c.report(found.get("balance"), f"{field}.balance", "balance: hash needs a hash_key")
    elif key_node is not None and balance != "hash":
        why = f"hash_key only applies to balance: hash (balance is {balance or 'round_robin'})"
        c.report(key_node, f"{field}.hash_key", why)
    sticky = c.scalar(
        found.get("sticky_cookie"), f"{field}.sticky_cookie", "a cookie name", (_STR,), cookie_name
    )
    cap = c.positive_int(found.get("max_tunnels"), f"{field}.max_tunnels")
    ramp = c.scalar(
        found.get("slow_start"), f"{field}.slow_start", values.DURATION_HINT,
        (_INT, _FLOAT, _STR), values.parse_duration,
    )  # fmt: skip
    return replace(
        base,
        hash_key=key if balance == "hash" else None,
        sticky_cookie=sticky,
        max_tunnels=cap or 0,
        slow_start=ramp or 0.0,
        health_check=_health_check(c, found.get("health_check"), f"{field}.health_check"),
    )


def _health_check(c: _Checker, node: Node | None, field: str) -> HealthCheck | None:
    if node is None:
        return None
    what = f"a mapping with some of: {', '.join(_HEALTH_KEYS)}"
    found = c.mapping(node, field, _HEALTH_KEYS, what=what)
    if found is None:
        return None
    mark = len(c.problems)
    path = c.scalar(found.get("path"), f"{field}.path", values.PATH_HINT, (_STR,), values.path)
    upgrade = c.scalar(found.get("upgrade"), f"{field}.upgrade", "websocket", (_STR,), _websocket)
    interval = c.timeout(found.get("interval"), f"{field}.interval")
    timeout = c.timeout(found.get("timeout"), f"{field}.timeout")
    up = c.positive_int(found.get("healthy_after"), f"{field}.healthy_after")
    down = c.positive_int(found.get("unhealthy_after"), f"{field}.unhealthy_after")
    if len(c.problems) > mark:
        return None
    default = HealthCheck()
    return HealthCheck(
        path=path or default.path,
        upgrade=upgrade,
        interval=interval or default.interval,
        timeout=timeout or default.timeout,
        healthy_after=up or default.healthy_after,
        unhealthy_after=down or default.unhealthy_after,
    )
