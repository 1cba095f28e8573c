"""`check` problems and defaults for the edge settings (origins, lifetime, per-IP limit,
drain_tunnels, PROXY protocol to servers)."""

from __future__ import annotations

import pytest

from upgradeproxy.config.loader import ConfigError, parse_config

BASE = """
listen: [{address: "127.0.0.1:0"}]
upstreams:
  app:
    servers: ["127.0.0.1:9000"]
%(upstream)s
routes:
  - upstream: app
%(route)s
%(top)s
"""


def text(upstream: str = "", route: str = "", top: str = "") -> str:
    return BASE % {"upstream": upstream, "route": route, "top": top}


def problems(**parts: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text(**parts), "edge.yaml")
    return [str(p) for p in info.value.problems]


def test_defaults_keep_todays_behaviour():
    config = parse_config(text())
    assert config.routes[0].allowed_origins is None
    assert config.timeouts.tunnel_max_lifetime == 0
    assert config.limits.max_connections_per_ip == 0
    assert config.drain_tunnels == "wait"
    assert config.upstreams["app"].proxy_protocol == 0


def test_edge_settings_are_read():
    config = parse_config(
        text(
            upstream="    proxy_protocol: v2",
            route='    allowed_origins: ["https://Chat.example.com:443", "https://*.example.com"]',
            top="timeouts: {tunnel_max_lifetime: 1h}\nlimits: {max_connections_per_ip: 20}\n"
            "drain_tunnels: spread",
        )
    )
    assert config.routes[0].allowed_origins == ("https://chat.example.com", "https://*.example.com")
    assert config.timeouts.tunnel_max_lifetime == 3600
    assert config.limits.max_connections_per_ip == 20
    assert config.drain_tunnels == "spread"
    assert config.upstreams["app"].proxy_protocol == 2


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"route": '    allowed_origins: ["https://chat.example.com/ws"]'},
            "edge.yaml:9: routes[0].allowed_origins[0]: expected an origin",
        ),
        (
            {"route": '    allowed_origins: ["chat.example.com"]'},
            "edge.yaml:9: routes[0].allowed_origins[0]: expected an origin",
        ),
        (
            {"route": '    allowed_origins: ["https://a.com?x=1"]'},
            "edge.yaml:9: routes[0].allowed_origins[0]: expected an origin",
        ),
        (
            {"route": "    allowed_origins: https://a.com"},
            "routes[0].allowed_origins: expected a list",
        ),
        (
            {"top": "timeouts: {tunnel_max_lifetime: 0.5}"},
            "timeouts.tunnel_max_lifetime: expected 0",
        ),
        ({"top": "timeouts: {tunnel_max_lifetime: 500ms}"}, "timeouts.tunnel_max_lifetime"),
        ({"top": "timeouts: {tunnel_max_lifetime: -5}"}, "timeouts.tunnel_max_lifetime"),
        (
            {"top": "limits: {max_connections_per_ip: -1}"},
            "limits.max_connections_per_ip: expected",
        ),
        ({"top": "limits: {max_connections_per_ip: 1.5}"}, "limits.max_connections_per_ip"),
        ({"top": "drain_tunnels: spreed"}, "drain_tunnels: unknown value 'spreed' (did you mean"),
        ({"upstream": "    proxy_protocol: v3"}, "upstreams.app.proxy_protocol: unknown value"),
        (
            {"upstream": "    proxy_protocol: true"},
            "upstreams.app.proxy_protocol: expected v1 or v2",
        ),
    ],
)
def test_bad_edge_values_are_check_problems_with_a_line(parts, expected):
    found = problems(**parts)
    assert any(expected in p for p in found), found
    assert all(p.startswith("edge.yaml:") for p in found), found


def test_zero_lifetime_and_limit_mean_none():
    config = parse_config(
        text(top="timeouts: {tunnel_max_lifetime: 0}\nlimits: {max_connections_per_ip: 0}")
    )
    assert (config.timeouts.tunnel_max_lifetime, config.limits.max_connections_per_ip) == (0, 0)
