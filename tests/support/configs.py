"""Proxy configs from Python data: every test that needs a config file builds it here.

    proxy_yaml(up.port)                                   # one upstream `app`, one route
    proxy_yaml(up.port, route={"path_prefix": "/ws"}, timeouts={"drain": 1})
    config_yaml({"web": web.port, "chat": chat.port},
                [route("web", path_prefix="/http"), route("chat")], listen=[port], admin=admin)

Ports become loopback addresses ("127.0.0.1:PORT"); everything else is written as given, so
a test states each key once, in the config's own words. Only tests whose point is the exact
YAML text (line numbers, syntax errors) write it by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.clients import LOOPBACK

Data = dict[str, Any]
Servers = int | str | Sequence[int | str]
Listen = int | Mapping[str, Any] | Sequence[int | Mapping[str, Any]]

FAST_DRAIN: Data = {"drain": 1}  # `timeouts=FAST_DRAIN`: a stray tunnel cannot slow teardown


def address(port: int | str = 0, host: str = LOOPBACK) -> str:
    """A port as a loopback address; an address (a string) as it is."""
    return port if isinstance(port, str) else f"{host}:{port}"


def listener(port: int | str = 0, **keys: Any) -> Data:
    """One `listen` entry: {address: 127.0.0.1:PORT, ...keys} (e.g. tls=, proxy_protocol=)."""
    return {"address": address(port), **keys}


def upstream(servers: Servers, **keys: Any) -> Data:
    """One upstream: its servers (ports, addresses, or {address:, weight:} mappings) and keys."""
    many = servers if isinstance(servers, Sequence) and not isinstance(servers, str) else [servers]
    return {"servers": [s if isinstance(s, Mapping) else address(s) for s in many], **keys}


def route(to: str = "app", **keys: Any) -> Data:
    """One route to upstream `to`, its match keys first (path_prefix=, host=, upgrade=, ...)."""
    return {**keys, "upstream": to}


def _listeners(listen: Listen) -> list[Any]:
    many = listen if isinstance(listen, Sequence) else [listen]
    return [dict(item) if isinstance(item, Mapping) else listener(item) for item in many]


def config_data(
    upstreams: Mapping[str, Servers | Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]] | None = None,
    *,
    listen: Listen = 0,
    admin: int | Mapping[str, Any] | None = None,
    **top: Any,
) -> Data:
    """The config as data. Each upstream is its servers or a mapping (see `upstream`);
    `routes` defaults to one route to the first upstream; `admin` is a port or a mapping;
    `top` are the other top-level keys (timeouts=, limits=, workers=, trusted_proxies=, ...)."""
    data: Data = {"listen": _listeners(listen)}
    if admin is not None:
        data["admin"] = dict(admin) if isinstance(admin, Mapping) else {"address": address(admin)}
    data["upstreams"] = {
        name: dict(u) if isinstance(u, Mapping) else upstream(u) for name, u in upstreams.items()
    }
    first = next(iter(upstreams))
    data["routes"] = [dict(r) for r in routes] if routes is not None else [route(first)]
    data.update(top)
    return data


def to_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)


def config_yaml(
    upstreams: Mapping[str, Servers | Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]] | None = None,
    **keys: Any,
) -> str:
    """`config_data` as YAML text."""
    return to_yaml(config_data(upstreams, routes, **keys))


def proxy_yaml(
    servers: Servers,
    *,
    route: Mapping[str, Any] | None = None,
    upstream: Mapping[str, Any] | None = None,
    **keys: Any,
) -> str:
    """One upstream `app` (`upstream` adds its keys) behind one route (`route` adds match
    keys); `keys` as for `config_data` (listen=, admin=, timeouts=, ...)."""
    app = _upstream(servers, **(upstream or {}))
    return config_yaml({"app": app}, [{**(route or {}), "upstream": "app"}], **keys)


_upstream = upstream  # `proxy_yaml`'s keyword of the same name hides it there


def h2_yaml(
    servers: Servers, *, tls: Mapping[str, Any] | None = None,
    route: Mapping[str, Any] | None = None, **keys: Any,
) -> str:  # fmt: skip
    """`proxy_yaml` on one listener with `http2: true` (and `tls`, when given)."""
    found = listener(http2=True, tls=dict(tls)) if tls else listener(http2=True)
    return proxy_yaml(servers, route=route, listen=found, **keys)


def write_file(path: Path, text: str) -> Path:
    """Replace `path` atomically, as a deploy tool would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
