"""Turn YAML into a validated `Config`, reporting every problem at once.

Validation walks the composed YAML node tree rather than constructed Python objects, so each
problem can name the line of the offending key or value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from functools import partial
from typing import TypeVar

from yaml.nodes import MappingNode, Node

from upgradeproxy.config import discovery, edge, operations, values
from upgradeproxy.config import tls as _tls
from upgradeproxy.config.checker import (
    FLOAT,
    INT,
    STR,
    Checker,
    ConfigError,
    ConfigProblem,
)
from upgradeproxy.config.model import (
    DEFAULT_UPGRADE,
    Admin,
    Balance,
    Config,
    DrainTunnels,
    IPNetwork,
    Limits,
    Listener,
    Route,
    Server,
    Timeouts,
    Upstream,
)
from upgradeproxy.config.pool import POOL_KEYS, pool_settings
from upgradeproxy.config.websocket import websocket_limits

__all__ = ["ConfigError", "ConfigProblem", "load_config", "parse_config"]

T = TypeVar("T")

_TOP_KEYS = (
    "listen", "admin", "workers", "upstreams", "routes", "timeouts", "limits", "trusted_proxies",
    "drain_tunnels",
    *operations.TOP_KEYS,
)  # fmt: skip
_BALANCES: Mapping[str, Balance] = {
    "round_robin": "round_robin", "least_conn": "least_conn", "hash": "hash",
}  # fmt: skip


def load_config(path: str) -> Config:
    """Read and validate the file at `path`; relative TLS files resolve against its directory."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        why = f"cannot read the config file: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem(path, None, "", why)]) from exc
    except UnicodeDecodeError as exc:
        why = f"the config file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([ConfigProblem(path, None, "", why)]) from exc
    return parse_config(text, path, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config(text: str, source: str = "<string>", *, base_dir: str | None = None) -> Config:
    """Validate YAML `text`; relative TLS files resolve against `base_dir` (default: the cwd)."""
    checker = Checker(source, os.getcwd() if base_dir is None else base_dir)
    root = checker.compose(text)
    config = None if root is None else _build(checker, root)
    if checker.problems or config is None:
        found = checker.problems + checker.warnings
        raise ConfigError(sorted(found, key=lambda p: p.line or 0))
    return config


def _build(c: Checker, root: Node) -> Config | None:
    what = "a mapping of settings like 'listen:', 'upstreams:' and 'routes:'"
    top = c.mapping(root, "", _TOP_KEYS, ("listen", "upstreams", "routes"), what)
    if top is None:
        return None
    listeners = _listeners(c, top.get("listen"))
    upstreams, names = _upstreams(c, top.get("upstreams"))
    what = "a list of CIDRs like '10.0.0.0/8' or IP addresses"
    read = partial(c.scalar, what=values.NETWORK_HINT, tags=(STR,), convert=values.network)
    trusted: list[tuple[int, Node, IPNetwork]] = _items(
        c, top.get("trusted_proxies"), "trusted_proxies", what, read
    )
    access_log, request_id = operations.settings(c, top)
    return Config(
        listeners=listeners,
        upstreams=upstreams,
        routes=_routes(c, top.get("routes"), names),
        admin=_admin(c, top.get("admin"), listeners),
        workers=c.scalar(
            top.get("workers"),
            "workers",
            f"a whole number from 1 to {values.MAX_WORKERS}",
            (INT,),
            values.workers,
        )
        or 1,
        timeouts=Timeouts(
            **_section(c, top.get("timeouts"), "timeouts", Timeouts, partial(_timeout, c))
        ),
        limits=Limits(**_section(c, top.get("limits"), "limits", Limits, partial(_limit, c))),
        trusted_proxies=tuple(network for _, _, network in trusted),
        source=c.source,
        drain_tunnels=_drain_tunnels(c, top.get("drain_tunnels")),
        access_log=access_log,
        request_id=request_id,
        warnings=tuple(str(w) for w in c.warnings),
    )


def _section(
    c: Checker, node: Node | None, field: str, cls: type, read: Callable[[Node, str], T | None]
) -> dict[str, T]:
    """Keyword arguments for a flat dataclass section whose keys are all optional."""
    names = [f.name for f in fields(cls)]
    found = c.mapping(node, field, names, what=f"a mapping with some of: {', '.join(names)}")
    parsed = {key: read(value, f"{field}.{key}") for key, value in (found or {}).items()}
    return {key: value for key, value in parsed.items() if value is not None}


def _items(
    c: Checker,
    node: Node | None,
    field: str,
    what: str,
    read: Callable[[Node, str], T | None],
    noun: str = "",
) -> list[tuple[int, Node, T]]:
    """The good items of a list as (index, node, value); an empty list is an error if `noun`."""
    items = c.sequence(node, field, what)
    if items == [] and noun:
        c.report(node, field, f"expected at least one {noun}, found an empty list")
    read_items = ((i, item, read(item, f"{field}[{i}]")) for i, item in enumerate(items or ()))
    return [(i, item, value) for i, item, value in read_items if value is not None]


def _no_duplicates(
    c: Checker, items: list[tuple[int, Node, T]], key: Callable[[T], object], path: str, why: str
) -> None:
    """Report items whose key (unless None) repeats an earlier one's; see `_listeners`."""
    seen: dict[object, int] = {}
    for i, node, value in items:
        first = seen.setdefault(name := key(value), i)
        if name is not None and first != i:
            c.report(node, path.format(i=i), why.format(i=i, first=first))


def _listeners(c: Checker, node: Node | None) -> tuple[Listener, ...]:
    what = "a list of listeners like '- address: 127.0.0.1:8080'"
    items = _items(c, node, "listen", what, partial(_listener, c), "listener")
    # Port 0 binds a fresh ephemeral port each time, so it never collides.
    _no_duplicates(
        c, items, lambda listener: listener.address if listener.address.port else None,
        "listen[{i}].address", "same address as listen[{first}]",
    )  # fmt: skip
    return tuple(listener for _, _, listener in items)


def _listener(c: Checker, node: Node, field: str) -> Listener | None:
    mark = len(c.problems)
    found = c.mapping(node, field, ("address", "tls", "proxy_protocol", "http2"), ("address",))
    if found is None:
        return None
    address = c.address(found.get("address"), f"{field}.address", listener=True)
    if address is not None:
        c.listener_addresses.append(address)
    tls = _tls.listener_tls(c, found.get("tls"), f"{field}.tls")
    proxy_protocol = c.boolean(found.get("proxy_protocol"), f"{field}.proxy_protocol", False)
    http2 = c.boolean(found.get("http2"), f"{field}.http2", False)
    if address is None or len(c.problems) > mark:
        return None
    return Listener(address, tls, proxy_protocol, http2)


def _admin(c: Checker, node: Node | None, listeners: Sequence[Listener]) -> Admin | None:
    found = c.mapping(node, "admin", ("address",), ("address",)) or {}
    address = c.address(found.get("address"), "admin.address", listener=True)
    if address is None:
        return None
    # Listeners with other problems count too: every problem is reported in one run.
    if address.port and address in {*c.listener_addresses, *(lsn.address for lsn in listeners)}:
        c.report(found["address"], "admin.address", f"{address} is also a listener's address")
    return Admin(address)


def _upstreams(c: Checker, node: Node | None) -> tuple[dict[str, Upstream], list[str] | None]:
    """The good upstreams, and every declared name (None when there are none to check against)."""
    pairs = c.entries(node, "upstreams", "a mapping of upstream names to their settings")
    if isinstance(node, MappingNode) and not pairs:
        c.report(node, "upstreams", "expected at least one upstream, found an empty mapping")
    upstreams: dict[str, Upstream] = {}
    for name, key_node, value in pairs:
        if not name:
            c.report(key_node, "upstreams", "an upstream name cannot be empty")
        elif (upstream := _upstream(c, name, value, f"upstreams.{name}")) is not None:
            upstreams[name] = upstream
    return upstreams, [name for name, _, _ in pairs] or None


def _upstream(c: Checker, name: str, node: Node, field: str) -> Upstream | None:
    keys = ("servers", "discover", "balance", "tls", "proxy_protocol", *POOL_KEYS)
    found = c.mapping(node, field, keys)
    if found is None:
        return None
    found_by = None
    if (discover_node := found.get("discover")) is not None:
        found_by = discovery.discover(c, discover_node, f"{field}.discover")
        if "servers" in found:
            why = "use either servers or discover, not both"
            c.report(discover_node, f"{field}.discover", why)
    elif "servers" not in found:
        why = "required but missing (or discover, to find the servers in DNS)"
        c.report(node, f"{field}.servers", why)
    what = "a list of 'host:port' strings or {address:, weight:} items"
    servers = _items(
        c, found.get("servers"), f"{field}.servers", what, partial(_server, c), "server"
    )
    balance = c.scalar(
        found.get("balance"), f"{field}.balance", "round_robin, least_conn or hash", (STR,),
        values.choice(_BALANCES),
    )  # fmt: skip
    tls = _tls.upstream_tls(c, found.get("tls"), f"{field}.tls")
    # The balancer and the pool key servers by address: a repeat would be one server twice.
    _no_duplicates(
        c, servers, lambda server: server.address,
        f"{field}.servers[{{i}}]", "same address as servers[{first}] (use weight instead)",
    )  # fmt: skip
    proxy_protocol = c.scalar(
        found.get("proxy_protocol"), f"{field}.proxy_protocol", "v1 or v2", (STR,),
        values.choice(edge.PROXY_VERSIONS),
    )  # fmt: skip
    base = Upstream(
        name, tuple(s for _, _, s in servers), balance or "round_robin", tls, proxy_protocol or 0,
        discover=found_by,
    )  # fmt: skip
    upstream = pool_settings(c, found, field, base, balance)
    return upstream if servers or found_by else None


def _server(c: Checker, node: Node, field: str) -> Server | None:
    if not isinstance(node, MappingNode):
        address = c.address(node, field)
        return None if address is None else Server(address)
    found = c.mapping(node, field, ("address", "weight"), ("address",)) or {}
    address = c.address(found.get("address"), f"{field}.address")
    weight = c.positive_int(found.get("weight"), f"{field}.weight") or 1
    return None if address is None else Server(address, weight)


def _routes(c: Checker, node: Node | None, names: list[str] | None) -> tuple[Route, ...]:
    what = "a list of routes like '- upstream: NAME'"
    items = _items(c, node, "routes", what, partial(_route, c, names=names), "route")
    # First match wins, so a later route with the same host and prefix can never be chosen.
    _no_duplicates(
        c, items, lambda route: (route.host, route.path_prefix),
        "routes[{i}]", "never matches: routes[{first}] has the same host and path_prefix",
    )  # fmt: skip
    return tuple(route for _, _, route in items)


def _route(c: Checker, node: Node, field: str, names: list[str] | None) -> Route | None:
    mark = len(c.problems)
    keys = ("host", "path_prefix", "upstream", "upgrade", "allowed_origins", "websocket")
    found = c.mapping(node, field, keys, ("upstream",))
    if found is None:
        return None
    upstream = c.text(found.get("upstream"), f"{field}.upstream", "the name of an upstream")
    if upstream is not None and names is not None and upstream not in names:
        why = f"no upstream named {upstream!r}{values.suggest(upstream, names)}"
        c.report(found["upstream"], f"{field}.upstream", why)
    host = c.scalar(
        found.get("host"),
        f"{field}.host",
        values.WILDCARD_HINT,
        (STR,),
        partial(values.host, wildcard=True),
    )
    prefix = c.scalar(
        found.get("path_prefix"), f"{field}.path_prefix", values.PATH_HINT, (STR,), values.path
    )
    upgrade = _upgrade(c, found.get("upgrade"), f"{field}.upgrade")
    origins = _origins(c, found.get("allowed_origins"), f"{field}.allowed_origins")
    websocket = websocket_limits(c, found.get("websocket"), f"{field}.websocket")
    if upstream is None or len(c.problems) > mark:
        return None
    return Route(
        upstream, host, prefix or "/", upgrade, allowed_origins=origins, websocket=websocket
    )


def _upgrade(c: Checker, node: Node | None, field: str) -> tuple[str, ...]:
    if node is None:
        return DEFAULT_UPGRADE
    what = "a list of protocols like ['websocket'] ([] for none)"
    read = partial(c.scalar, what=values.PROTOCOL_HINT, tags=(STR,), convert=values.protocol)
    items = _items(c, node, field, what, read)
    _no_duplicates(c, items, lambda token: token, field + "[{i}]", "repeats " + field + "[{first}]")
    return tuple(token for _, _, token in items)


# --- edge settings (config/edge.py holds the value checks) ---------------------------------


def _origins(c: Checker, node: Node | None, field: str) -> tuple[str, ...] | None:
    if node is None:
        return None
    what = "a list of origins like ['https://chat.example.com']"
    read = partial(c.scalar, what=edge.ORIGIN_HINT, tags=(STR,), convert=edge.origin_entry)
    return tuple(origin for _, _, origin in _items(c, node, field, what, read))


def _drain_tunnels(c: Checker, node: Node | None) -> DrainTunnels:
    pick = values.choice(edge.DRAIN_TUNNELS)
    return c.scalar(node, "drain_tunnels", "wait or spread", (STR,), pick) or "wait"


def _timeout(c: Checker, node: Node, field: str) -> float | None:
    if field != "timeouts.tunnel_max_lifetime":
        return c.duration(node, field)

    def lifetime(value: object) -> float:
        return edge.tunnel_lifetime(values.parse_duration(value))

    return c.scalar(node, field, values.DURATION_HINT, (INT, FLOAT, STR), lifetime)


def _limit(c: Checker, node: Node, field: str) -> int | None:
    if field != "limits.max_connections_per_ip":
        return c.positive_int(node, field)
    return c.scalar(node, field, "a whole number, 0 or more", (INT,), edge.non_negative)
