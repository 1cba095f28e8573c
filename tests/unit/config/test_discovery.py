"""`check` on `upstreams.NAME.discover` (interface.md rule 16): every problem with its file,
line and field, a "did you mean" where a value is close, and the defaults of a good block."""

from __future__ import annotations

import pytest

from upgradeproxy.config.loader import ConfigError, parse_config
from upgradeproxy.config.model import Address, Discover


def config(upstream: str) -> str:
    body = "\n".join("    " + line for line in upstream.strip().splitlines())
    return f"""listen: [{{address: "127.0.0.1:0"}}]
upstreams:
  chat:
{body}
routes: [{{upstream: chat}}]
"""


def problems(upstream: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(upstream), "pool.yaml")
    return [str(p) for p in info.value.problems]


def discovered(upstream: str) -> Discover:
    found = parse_config(config(upstream), "pool.yaml").upstreams["chat"]
    assert found.servers == ()
    assert found.discover is not None
    return found.discover


PROBLEMS = [
    pytest.param(
        'servers: ["127.0.0.1:9000"]\ndiscover: {name: chat.test, port: 9000}',
        "pool.yaml:5: upstreams.chat.discover: use either servers or discover, not both",
        id="servers-and-discover",
    ),
    pytest.param(
        "balance: least_conn",
        "pool.yaml:4: upstreams.chat.servers: required but missing (or discover, to find the "
        "servers in DNS)",
        id="neither",
    ),
    pytest.param(
        "discover: {name: chat-ws.default.svc.cluster.local}",
        "pool.yaml:4: upstreams.chat.discover.port: required for an A/AAAA name (only an SRV "
        "name, starting with '_', carries ports)",
        id="a-name-without-port",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, interval: 0.5}",
        "pool.yaml:4: upstreams.chat.discover.interval: expected at least 1s, found the number 0.5",
        id="interval-under-1s",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, interval: 900ms}",
        "pool.yaml:4: upstreams.chat.discover.interval: expected at least 1s, found the string "
        "'900ms'",
        id="interval-900ms",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, on_removal: drian}",
        "pool.yaml:4: upstreams.chat.discover.on_removal: unknown value 'drian' (did you mean "
        "'drain'?)",
        id="on-removal-typo",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, on_removal: close}",
        "pool.yaml:4: upstreams.chat.discover.on_removal: unknown value 'close' (expected one of: "
        "keep, drain)",
        id="on-removal-other",
    ),
    pytest.param(
        "discover:\n  name: chat.test\n  port: 9000\n  intervall: 5s",
        "pool.yaml:7: upstreams.chat.discover.intervall: unknown key 'intervall' (did you mean "
        "'interval'?)",
        id="unknown-key",
    ),
    pytest.param(
        "discover: {port: 9000}",
        "pool.yaml:4: upstreams.chat.discover.name: required but missing",
        id="no-name",
    ),
    pytest.param(
        "discover: {name: 'chat test', port: 9000}",
        "pool.yaml:4: upstreams.chat.discover.name: expected a DNS name like "
        "'chat-ws.default.svc.cluster.local' or '_ws._tcp.chat', found the string 'chat test'",
        id="bad-name",
    ),
    pytest.param(
        "discover: {name: 10.0.0.1, port: 9000}",
        "pool.yaml:4: upstreams.chat.discover.name: expected a DNS name like "
        "'chat-ws.default.svc.cluster.local' or '_ws._tcp.chat', found the address '10.0.0.1' "
        "(use servers)",
        id="address-as-name",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 70000}",
        "pool.yaml:4: upstreams.chat.discover.port: expected a port from 1 to 65535, found the "
        "number 70000",
        id="bad-port",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, resolvers: ['kube-dns:53']}",
        "pool.yaml:4: upstreams.chat.discover.resolvers[0]: expected an IP address with a port, "
        "like '10.96.0.10:53' or '[fd00::a]:53', found the name 'kube-dns'",
        id="resolver-name",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, resolvers: []}",
        "pool.yaml:4: upstreams.chat.discover.resolvers: expected at least one resolver (leave "
        "it out for the system's)",
        id="no-resolvers",
    ),
    pytest.param(
        "discover: {name: chat.test, port: 9000, resolvers: ['10.0.0.1:53', '10.0.0.1']}",
        "pool.yaml:4: upstreams.chat.discover.resolvers[1]: repeats 10.0.0.1:53",
        id="resolver-twice",
    ),
    pytest.param(
        "discover: chat.test",
        "pool.yaml:4: upstreams.chat.discover: expected a mapping with 'name' and some of: port, "
        "interval, resolvers, on_removal, found the string 'chat.test'",
        id="not-a-mapping",
    ),
]


@pytest.mark.parametrize(("upstream", "expected"), PROBLEMS)
def test_check_reports(upstream: str, expected: str) -> None:
    assert expected in problems(upstream)


def test_every_problem_is_reported_in_one_run() -> None:
    found = problems("discover: {name: chat.test, interval: 0.1, on_removal: x}")
    assert [p.split(": ")[1] for p in found] == [
        "upstreams.chat.discover.interval",
        "upstreams.chat.discover.on_removal",
        "upstreams.chat.discover.port",
    ]


GOOD = [
    pytest.param(
        "discover: {name: Chat.Test, port: 9000}",
        Discover("chat.test", 9000, 5.0, (), "keep"),
        id="defaults",
    ),
    pytest.param(
        "discover: {name: _ws._tcp.chat.test., interval: 1s, on_removal: drain}",
        Discover("_ws._tcp.chat.test.", 0, 1.0, (), "drain"),
        id="srv-absolute",
    ),
    pytest.param(
        "discover:\n  name: chat\n  port: 9000\n  resolvers: ['10.96.0.10:53', '10.96.0.11', "
        "'[fd00::a]:5353']",
        Discover(
            "chat",
            9000,
            5.0,
            (Address("10.96.0.10", 53), Address("10.96.0.11", 53), Address("fd00::a", 5353)),
        ),
        id="resolvers",
    ),
]


@pytest.mark.parametrize(("upstream", "expected"), GOOD)
def test_a_good_block_loads(upstream: str, expected: Discover) -> None:
    assert discovered(upstream) == expected


def test_a_port_with_an_srv_name_is_a_warning_not_a_problem() -> None:
    loaded = parse_config(config("discover: {name: _ws._tcp.chat, port: 9000}"), "pool.yaml")
    assert loaded.warnings == (
        "pool.yaml:4: upstreams.chat.discover.port: warning: ignored: an SRV name's records "
        "carry the ports",
    )
    discover = loaded.upstreams["chat"].discover
    assert discover is not None
    assert discover.port == 0


def test_pool_keys_apply_to_a_discovered_upstream() -> None:
    loaded = parse_config(
        config(
            "discover: {name: chat.test, port: 9000}\nbalance: hash\nhash_key: client_ip\n"
            "sticky_cookie: upx\nmax_tunnels: 10\nslow_start: 30s\nhealth_check: {path: /h}"
        ),
        "pool.yaml",
    )
    upstream = loaded.upstreams["chat"]
    assert (upstream.balance, upstream.sticky_cookie, upstream.max_tunnels) == ("hash", "upx", 10)
    assert upstream.slow_start == 30.0
    assert upstream.health_check is not None
