"""Config loading: the example file, every kind of problem, durations and addresses."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import trustme

from tests.support.config_text import FILLER, complete, problems_of
from tests.support.processes import ROOT
from upgradeproxy.config.loader import ConfigError, ConfigProblem, load_config, parse_config
from upgradeproxy.config.model import (
    Address,
    Limits,
    Listener,
    ListenerTls,
    Route,
    Server,
    Timeouts,
    TlsCertificate,
    UpstreamTls,
)
from upgradeproxy.config.values import parse_address, parse_duration


def write_pems(directory: Path, cert: str = "cert.pem", key: str = "key.pem") -> None:
    """A real certificate and its key (check loads them as `run` would)."""
    issued = trustme.CA().issue_cert("proxy.example.com")
    issued.cert_chain_pems[0].write_to_path(str(directory / cert))
    issued.private_key_pem.write_to_path(str(directory / key))


EXAMPLE = ROOT / "config" / "upgradeproxy.yaml"

# --- the example file and valid configs ------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(str(EXAMPLE))
    assert config.source == str(EXAMPLE)
    assert config.listeners == (Listener(Address("127.0.0.1", 8080)),)
    assert config.admin is not None
    assert config.admin.address == Address("127.0.0.1", 9901)
    assert config.workers == 1
    assert set(config.upstreams) == {"chat", "games"}
    assert config.upstreams["chat"].balance == "round_robin"
    assert config.upstreams["chat"].tls is None
    games = config.upstreams["games"]
    assert games.balance == "least_conn"
    assert games.servers == (
        Server(Address("127.0.0.1", 9100), 3),
        Server(Address("localhost", 9101), 1),
    )
    assert games.tls == UpstreamTls(verify=True, ca=None, server_name="games.internal")
    assert any(route.host == "*.games.example.com" for route in config.routes)
    assert any(route.upgrade == () for route in config.routes)
    assert config.timeouts.request_header == 10.0
    assert config.timeouts.tunnel_idle == 3600.0
    assert len(config.trusted_proxies) == 3


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(complete(""))
    assert config.source == "<string>"
    assert config.admin is None
    assert config.workers == 1
    assert config.timeouts == Timeouts()
    assert config.limits == Limits()
    assert config.trusted_proxies == ()
    assert config.routes == (Route(upstream="chat", host=None, path_prefix="/"),)
    assert config.routes[0].upgrade == ("websocket",)
    assert config.upstreams["chat"].servers == (Server(Address("127.0.0.1", 9000), 1),)


def test_values_are_normalised() -> None:
    text = complete(
        "routes:\n"
        "  - host: Chat.Example.COM\n"
        "    upstream: chat\n"
        '    upgrade: ["WebSocket", "SPDY/3.1", "h2c"]\n'
        "  - host: '*.Example.com'\n"
        "    upstream: chat\n"
        "    upgrade: []\n"
        "timeouts: {connect: 2.5, idle: '250ms', drain: '1h30m'}\n"
        "trusted_proxies: ['10.1.2.3/8', '::1']\n"
    )
    config = parse_config(text)
    assert config.routes[0].host == "chat.example.com"
    assert config.routes[0].upgrade == ("websocket", "spdy/3.1", "h2c")
    assert config.routes[1].host == "*.example.com"
    assert config.routes[1].upgrade == ()
    assert (config.timeouts.connect, config.timeouts.idle, config.timeouts.drain) == (
        2.5,
        0.25,
        5400.0,
    )
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        pytest.param("false", None, id="false"),
        pytest.param("true", UpstreamTls(), id="true"),
        pytest.param("{verify: false}", UpstreamTls(verify=False), id="no-verify"),
        pytest.param(
            "{server_name: Backend.Internal}",
            UpstreamTls(server_name="backend.internal"),
            id="server-name",
        ),
    ],
)
def test_upstream_tls_forms(tls: str, expected: UpstreamTls | None) -> None:
    text = complete(f'upstreams:\n  chat:\n    servers: ["h:1"]\n    tls: {tls}\n')
    assert parse_config(text).upstreams["chat"].tls == expected


def test_port_zero_listeners_may_repeat() -> None:
    text = complete('listen:\n  - address: "127.0.0.1:0"\n  - address: "127.0.0.1:0"\n')
    assert len(parse_config(text).listeners) == 2


def test_listener_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    write_pems(tmp_path / "certs", "proxy.pem", "proxy-key.pem")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    path = tmp_path / "proxy.yaml"
    path.write_text(
        complete(
            "listen:\n"
            '  - address: "[::1]:8443"\n'
            "    tls: {cert: certs/proxy.pem, key: certs/proxy-key.pem}\n"
            "    proxy_protocol: true\n"
            "upstreams:\n"
            "  chat:\n"
            '    servers: ["127.0.0.1:9000"]\n'
            "    tls: {ca: ca.pem}\n"
        )
    )
    config = load_config(str(path))
    assert config.listeners[0] == Listener(
        Address("::1", 8443),
        ListenerTls(
            str(tmp_path / "certs" / "proxy.pem"),
            str(tmp_path / "certs" / "proxy-key.pem"),
            certificates=(
                TlsCertificate(
                    str(tmp_path / "certs" / "proxy.pem"),
                    str(tmp_path / "certs" / "proxy-key.pem"),
                    ("proxy.example.com",),
                ),
            ),
        ),
        proxy_protocol=True,
    )
    assert config.upstreams["chat"].tls == UpstreamTls(ca=str(tmp_path / "ca.pem"))


def test_parse_config_resolves_tls_paths_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pems(tmp_path, "c.pem", "k.pem")
    monkeypatch.chdir(tmp_path)
    text = complete('listen:\n  - address: "127.0.0.1:8443"\n    tls: {cert: c.pem, key: k.pem}\n')
    tls = parse_config(text).listeners[0].tls
    assert tls is not None
    assert (tls.cert, tls.key) == (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


# --- one problem per case: field path, 1-based line, and a helpful why -----------------------

UPSTREAM = 'upstreams:\n  chat:\n    servers: ["127.0.0.1:9000"]\n'
LISTEN = 'listen:\n  - address: "127.0.0.1:8080"\n'

PROBLEMS = [
    # Unknown keys, at every level, with and without a close match.
    ("upstreem: {}\n", "upstreem", 1, "unknown key 'upstreem' (did you mean 'upstreams'?)"),
    ("colour: red\n", "colour", 1, "unknown key 'colour' (expected one of: listen, admin"),
    (
        LISTEN + "    proxy_protocl: true\n",
        "listen[0].proxy_protocl",
        3,
        "did you mean 'proxy_protocol'?",
    ),
    ("admin: {address: '127.0.0.1:9901', port: 9}\n", "admin.port", 1, "expected one of: address"),
    (
        UPSTREAM + "    balence: least_conn\n",
        "upstreams.chat.balence",
        4,
        "did you mean 'balance'?",
    ),
    (
        UPSTREAM + "    tls: {verify: true, server_nme: x}\n",
        "upstreams.chat.tls.server_nme",
        4,
        "did you mean 'server_name'?",
    ),
    (
        "upstreams:\n  chat:\n    servers:\n      - {address: 'h:1', wieght: 2}\n",
        "upstreams.chat.servers[0].wieght",
        4,
        "did you mean 'weight'?",
    ),
    ("routes:\n  - upstream: chat\n    upgrades: []\n", "routes[0].upgrades", 3, "'upgrade'?"),
    ("routes:\n  - upstream: chat\n    path: /ws\n", "routes[0].path", 3, "one of: host, path_"),
    ("timeouts:\n  tunel_idle: 5\n", "timeouts.tunel_idle", 2, "did you mean 'tunnel_idle'?"),
    ("limits:\n  max_conections: 5\n", "limits.max_conections", 2, "'max_connections'?"),
    # Mapping structure.
    (
        UPSTREAM + "  chat:\n    servers: ['h:2']\n",
        "upstreams.chat",
        4,
        "duplicate key (first at line 2)",
    ),
    (
        "routes:\n  - upstream: chat\n    1: x\n",
        "routes[0]",
        3,
        "expected a name as key, found the number 1",
    ),
    ("routes:\n  - host: a.com\n", "routes[0].upstream", 2, "required but missing"),
    ("listen:\n  - {}\n", "listen[0].address", 2, "required but missing"),
    ("upstreams:\n  chat: {}\n", "upstreams.chat.servers", 2, "required but missing"),
    (
        "upstreams:\n  chat:\n    servers: ['127.0.0.1:9000', '127.0.0.1:9000']\n",
        "upstreams.chat.servers[1]",
        3,
        "same address as servers[0] (use weight instead)",
    ),
    # Listeners.
    ("listen:\n  address: '127.0.0.1:8080'\n", "listen", 2, "expected a list of listeners like"),
    ("listen: []\n", "listen", 1, "expected at least one listener, found an empty list"),
    ("listen:\n  - '127.0.0.1:8080'\n", "listen[0]", 2, "expected a mapping, found the string"),
    (
        "listen:\n  - address: '127.0.0.1'\n",
        "listen[0].address",
        2,
        "found the string '127.0.0.1' (no port)",
    ),
    ("listen:\n  - address: 8080\n", "listen[0].address", 2, "expected host:port like"),
    (
        LISTEN + "    proxy_protocol: 'yes'\n",
        "listen[0].proxy_protocol",
        3,
        "expected true or false, found the string 'yes'",
    ),
    (
        LISTEN + "    tls: true\n",
        "listen[0].tls",
        3,
        "expected a mapping with 'cert' and 'key' files (or 'certificates'), found the boolean",
    ),
    (
        LISTEN + LISTEN[len("listen:\n") :],
        "listen[1].address",
        3,
        "same address as listen[0]",
    ),
    # Admin and workers.
    ("admin: '127.0.0.1:9901'\n", "admin", 1, "expected a mapping, found the string"),
    (
        "admin: {address: '127.0.0.1:99999'}\n",
        "admin.address",
        1,
        "port must be a number from 0 to 65535",
    ),
    (
        "admin: {address: '127.0.0.1:8080'}\n",
        "admin.address",
        1,
        "127.0.0.1:8080 is also a listener's address",
    ),
    ("workers: 0\n", "workers", 1, "expected a whole number from 1 to 256, found the number 0"),
    ("workers: 100000\n", "workers", 1, "expected a whole number from 1 to 256, found the num"),
    ("workers: true\n", "workers", 1, "found the boolean true"),
    ("workers: '2'\n", "workers", 1, "found the string '2'"),
    ("workers: 1.5\n", "workers", 1, "found the number 1.5"),
    # Upstreams and servers.
    (
        "upstreams: [chat]\n",
        "upstreams",
        1,
        "expected a mapping of upstream names to their settings, found a list",
    ),
    ("upstreams: {}\n", "upstreams", 1, "expected at least one upstream, found an empty mapping"),
    ("upstreams:\n  chat:\n    servers: []\n", "upstreams.chat.servers", 3, "at least one server"),
    (
        "upstreams:\n  chat:\n    servers: 'h:1'\n",
        "upstreams.chat.servers",
        3,
        "expected a list of 'host:port' strings",
    ),
    (
        "upstreams:\n  chat:\n    servers: [5]\n",
        "upstreams.chat.servers[0]",
        3,
        "found the number 5",
    ),
    (
        "upstreams:\n  chat:\n    servers: ['h:0']\n",
        "upstreams.chat.servers[0]",
        3,
        "port from 1 to 65535",
    ),
    (
        "upstreams:\n  chat:\n    servers: ['h:1', 'h 2:3']\n",
        "upstreams.chat.servers[1]",
        3,
        "'h 2' is not a valid host name",
    ),
    (
        "upstreams:\n  chat:\n    servers:\n      - address: 'h:1'\n        weight: 0\n",
        "upstreams.chat.servers[0].weight",
        5,
        "expected a positive whole number, found the number 0",
    ),
    (
        "upstreams:\n  chat:\n    servers:\n      - {address: 'h:1', weight: '3'}\n",
        "upstreams.chat.servers[0].weight",
        4,
        "found the string '3'",
    ),
    (
        UPSTREAM + "    balance: round-robin\n",
        "upstreams.chat.balance",
        4,
        "unknown value 'round-robin' (did you mean 'round_robin'?)",
    ),
    (
        UPSTREAM + "    balance: random\n",
        "upstreams.chat.balance",
        4,
        "(expected one of: round_robin, least_conn, hash)",
    ),
    (UPSTREAM + "    tls: 'on'\n", "upstreams.chat.tls", 4, "expected false, true, or a mapping"),
    (
        UPSTREAM + "    tls: {verify: 'no'}\n",
        "upstreams.chat.tls.verify",
        4,
        "expected true or false",
    ),
    (
        UPSTREAM + "    tls: {server_name: 'a b'}\n",
        "upstreams.chat.tls.server_name",
        4,
        "expected a hostname",
    ),
    # Routes.
    (
        "routes: {upstream: chat}\n",
        "routes",
        1,
        "expected a list of routes like '- upstream: NAME', found a mapping",
    ),
    ("routes: []\n", "routes", 1, "expected at least one route, found an empty list"),
    (
        "routes:\n  - upstream: caht\n",
        "routes[0].upstream",
        2,
        "no upstream named 'caht' (did you mean 'chat'?)",
    ),
    (
        "routes:\n  - upstream: zzz\n",
        "routes[0].upstream",
        2,
        "no upstream named 'zzz' (expected one of: chat)",
    ),
    (
        "routes:\n  - upstream: [chat]\n",
        "routes[0].upstream",
        2,
        "expected the name of an upstream, found a list",
    ),
    (
        "routes:\n  - upstream: chat\n    host: a.com:80\n",
        "routes[0].host",
        3,
        "found the string 'a.com:80' (leave out the port)",
    ),
    (
        "routes:\n  - upstream: chat\n    host: a.*.com\n",
        "routes[0].host",
        3,
        "wildcard must be the whole leftmost label",
    ),
    (
        "routes:\n  - upstream: chat\n    host: '*example.com'\n",
        "routes[0].host",
        3,
        "wildcard must be the whole",
    ),
    (
        "routes:\n  - upstream: chat\n    host: -a.com\n",
        "routes[0].host",
        3,
        "expected a hostname like 'chat.example.com' or a wildcard",
    ),
    (
        "routes:\n  - upstream: chat\n    host: a_b.com\n",
        "routes[0].host",
        3,
        "found the string 'a_b.com'",
    ),
    (
        "routes:\n  - upstream: chat\n    path_prefix: ws\n",
        "routes[0].path_prefix",
        3,
        "expected a path starting with '/'",
    ),
    (
        "routes:\n  - upstream: chat\n    path_prefix: /a b\n",
        "routes[0].path_prefix",
        3,
        "found the string '/a b'",
    ),
    (
        "routes:\n  - upstream: chat\n    path_prefix: /a?b\n",
        "routes[0].path_prefix",
        3,
        "no spaces, '?' or '#'",
    ),
    (
        "routes:\n  - upstream: chat\n    upgrade: websocket\n",
        "routes[0].upgrade",
        3,
        "expected a list of protocols like ['websocket'] ([] for none)",
    ),
    (
        "routes:\n  - upstream: chat\n    upgrade: ['web socket']\n",
        "routes[0].upgrade[0]",
        3,
        "expected a protocol token like",
    ),
    (
        "routes:\n  - upstream: chat\n    upgrade: [h2c, 'SPDY/3/1']\n",
        "routes[0].upgrade[1]",
        3,
        "found the string 'SPDY/3/1'",
    ),
    (
        "routes:\n  - upstream: chat\n    upgrade: [3]\n",
        "routes[0].upgrade[0]",
        3,
        "found the number 3",
    ),
    (
        "routes:\n  - upstream: chat\n    upgrade: [websocket, WebSocket]\n",
        "routes[0].upgrade[1]",
        3,
        "repeats routes[0].upgrade[0]",
    ),
    (
        "routes:\n  - upstream: chat\n  - upstream: chat\n",
        "routes[1]",
        3,
        "never matches: routes[0] has the same host and path_prefix",
    ),
    # Timeouts and limits.
    ("timeouts: 5\n", "timeouts", 1, "expected a mapping with some of: connect, request_header"),
    (
        "timeouts:\n  connect: 0\n",
        "timeouts.connect",
        2,
        "expected a duration greater than zero, found the number 0",
    ),
    (
        "timeouts:\n  connect: '0ms'\n",
        "timeouts.connect",
        2,
        "greater than zero, found the string '0ms'",
    ),
    (
        "timeouts:\n  idle: -1\n",
        "timeouts.idle",
        2,
        "expected a duration greater than zero, found the number -1",
    ),
    ("timeouts:\n  idle: 5x\n", "timeouts.idle", 2, "found the string '5x'"),
    ("timeouts:\n  drain: true\n", "timeouts.drain", 2, "found the boolean true"),
    ("timeouts:\n  drain: [5]\n", "timeouts.drain", 2, "found a list"),
    ("timeouts:\n  drain:\n", "timeouts.drain", 2, "found nothing (null)"),
    (
        "limits:\n  max_connections: 0\n",
        "limits.max_connections",
        2,
        "expected a positive whole number",
    ),
    (
        "limits:\n  max_request_header_bytes: 16k\n",
        "limits.max_request_header_bytes",
        2,
        "found the string '16k'",
    ),
    # Trusted proxies.
    ("trusted_proxies: '10.0.0.0/8'\n", "trusted_proxies", 1, "expected a list of CIDRs like"),
    (
        "trusted_proxies: ['10.0.0.0/33']\n",
        "trusted_proxies[0]",
        1,
        "expected a CIDR like '10.0.0.0/8' or an IP address",
    ),
    ("trusted_proxies:\n  - 10.0.0.1\n  - 5\n", "trusted_proxies[1]", 3, "found the number 5"),
]


@pytest.mark.parametrize(
    ("snippet", "field", "line", "why"),
    PROBLEMS,
    ids=[f"{case[1]}:{case[3][:40]}" for case in PROBLEMS],
)
def test_problem(snippet: str, field: str, line: int, why: str) -> None:
    problems = problems_of(complete(snippet))
    assert [(p.field, p.line) for p in problems] == [(field, line)], problems
    assert why in problems[0].why
    assert problems[0].file == "proxy.yaml"


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        pytest.param("listen: []\n", ["upstreams", "routes"], id="two-missing"),
        pytest.param(FILLER["upstreams"] + FILLER["routes"], ["listen"], id="listen-missing"),
    ],
)
def test_missing_top_level_keys_have_no_line(text: str, fields: list[str]) -> None:
    problems = [p for p in problems_of(text) if p.line is None]
    assert sorted(p.field for p in problems) == sorted(fields)
    assert all(p.why == "required but missing" for p in problems)


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        pytest.param("", None, "the file is empty", id="empty"),
        pytest.param("# nothing here\n", None, "the file is empty", id="only-comments"),
        pytest.param("- a\n- b\n", 1, "expected a mapping of settings like 'listen:'", id="list"),
        pytest.param("hello\n", 1, "found the string 'hello'", id="scalar"),
    ],
)
def test_file_level_problems(text: str, line: int | None, why: str) -> None:
    problems = problems_of(text)
    assert [(p.field, p.line) for p in problems] == [("", line)]
    assert why in problems[0].why


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        pytest.param("listen: [\n", 2, "invalid YAML: expected the node content", id="open-flow"),
        pytest.param("listen:\n  - a\n b: 1\n", 3, "invalid YAML:", id="bad-indent"),
        pytest.param("routes:\n\t- upstream: chat\n", 2, "found character '\\t'", id="tab"),
        pytest.param('a: "unterminated\n', 2, "invalid YAML: found unexpected end", id="quote"),
        pytest.param("a: 1\n---\nb: 2\n", 2, "expected a single document", id="two-docs"),
        pytest.param("a: \x00\n", None, "unacceptable character #x0000", id="nul"),
    ],
)
def test_yaml_syntax_error_is_one_problem(text: str, line: int | None, why: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1
    assert (problems[0].field, problems[0].line) == ("", line)
    assert why in problems[0].why
    assert "\n" not in str(problems[0])


def test_many_problems_are_all_reported_in_line_order() -> None:
    text = (
        "listen:\n"  # 1
        "  - address: '127.0.0.1'\n"  # 2
        "workers: 0\n"  # 3
        "upstreams:\n"  # 4
        "  chat:\n"  # 5
        "    servers: ['h:1']\n"  # 6
        "    balance: fastest\n"  # 7
        "routes:\n"  # 8
        "  - upstream: caht\n"  # 9
        "    path_prefix: ws\n"  # 10
        "timeouts:\n"  # 11
        "  connect: soon\n"  # 12
        "limit: {}\n"  # 13
    )
    problems = problems_of(text)
    assert [(p.line, p.field) for p in problems] == [
        (2, "listen[0].address"),
        (3, "workers"),
        (7, "upstreams.chat.balance"),
        (9, "routes[0].upstream"),
        (10, "routes[0].path_prefix"),
        (12, "timeouts.connect"),
        (13, "limit"),
    ]
    assert "did you mean 'limits'?" in problems[-1].why


def test_tls_file_problems(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "dir.pem").mkdir()
    text = complete(
        "listen:\n"
        "  - address: '127.0.0.1:8443'\n"
        "    tls: {cert: cert.pem, chain: cert.pem}\n"
        "  - address: '127.0.0.1:8444'\n"
        "    tls: {cert: missing.pem, key: dir.pem}\n"
        "upstreams:\n"
        "  chat:\n"
        "    servers: ['h:1']\n"
        "    tls: {ca: ''}\n"
    )
    problems = problems_of(text, base_dir=tmp_path)
    assert [(p.line, p.field, p.why) for p in problems] == [
        (
            3,
            "listen[0].tls.chain",
            "unknown key 'chain' (expected one of: cert, key, certificates, min_version, "
            "ciphers, client_ca, client_auth)",
        ),
        (3, "listen[0].tls.key", "required but missing"),
        (
            3,
            "listen[0].tls.cert",
            f"{tmp_path / 'cert.pem'}: not a PEM certificate "
            "(no '-----BEGIN CERTIFICATE-----' block)",
        ),
        (5, "listen[1].tls.cert", f"no such file: {tmp_path / 'missing.pem'}"),
        (5, "listen[1].tls.key", f"not a file: {tmp_path / 'dir.pem'}"),
        (9, "upstreams.chat.tls.ca", "expected a file path, found an empty string"),
    ]


def test_unreadable_tls_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pems(tmp_path, "c.pem", "k.pem")
    # Faked, because chmod cannot keep root (which CI may run as) from reading a file.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: real_access(path, mode) and "k.pem" not in str(path)
    )
    text = complete("listen:\n  - address: '127.0.0.1:8443'\n    tls: {cert: c.pem, key: k.pem}\n")
    problems = problems_of(text, base_dir=tmp_path)
    assert [(p.field, p.why) for p in problems] == [
        ("listen[0].tls.key", f"file is not readable: {tmp_path / 'k.pem'}")
    ]


# --- loading files ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == (
        ConfigProblem(path, None, "", "cannot read the config file: No such file or directory"),
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(str(tmp_path))


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(str(path))


def test_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(complete("workers: 0\n"))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert (
        str(info.value)
        == f"{path}:1: workers: expected a whole number from 1 to 256, found the number 0"
    )


# --- formatting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        pytest.param(
            ConfigProblem("proxy.yaml", 12, "routes[0].upstream", "no upstream named 'caht'"),
            "proxy.yaml:12: routes[0].upstream: no upstream named 'caht'",
            id="full",
        ),
        pytest.param(
            ConfigProblem("proxy.yaml", None, "routes", "required but missing"),
            "proxy.yaml: routes: required but missing",
            id="no-line",
        ),
        pytest.param(
            ConfigProblem("proxy.yaml", 3, "", "invalid YAML: oops"),
            "proxy.yaml:3: invalid YAML: oops",
            id="no-field",
        ),
    ],
)
def test_problem_str(problem: ConfigProblem, text: str) -> None:
    assert str(problem) == text


def test_config_error_lists_one_problem_per_line() -> None:
    first = ConfigProblem("a.yaml", 1, "workers", "bad")
    second = ConfigProblem("a.yaml", 2, "routes", "worse")
    error = ConfigError([first, second])
    assert error.problems == (first, second)
    assert str(error) == "a.yaml:1: workers: bad\na.yaml:2: routes: worse"


# --- durations and addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(5, 5.0, id="int"),
        pytest.param(2.5, 2.5, id="float"),
        pytest.param(0, 0.0, id="zero"),
        pytest.param("250ms", 0.25, id="ms"),
        pytest.param("5s", 5.0, id="s"),
        pytest.param("1.5s", 1.5, id="fractional-s"),
        pytest.param("1m", 60.0, id="m"),
        pytest.param("1h", 3600.0, id="h"),
        pytest.param("1h30m", 5400.0, id="h-m"),
        pytest.param("1m30s500ms", 90.5, id="m-s-ms"),
        pytest.param("5", 5.0, id="quoted-number"),
        pytest.param(" 2s ", 2.0, id="spaces"),
        pytest.param("2.5", 2.5, id="quoted-fraction"),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("5x", id="bad-unit"),
        pytest.param("", id="empty"),
        pytest.param("s", id="unit-only"),
        pytest.param("1 h", id="inner-space"),
        pytest.param("5M", id="upper-case-unit"),
        pytest.param("1.2.3s", id="two-dots"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(float("nan"), id="nan"),
        pytest.param("inf", id="inf-string"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="none"),
        pytest.param([5], id="list"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected a duration in seconds .* found"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        pytest.param("127.0.0.1:8080", Address("127.0.0.1", 8080), id="ipv4"),
        pytest.param("[::1]:8080", Address("::1", 8080), id="ipv6"),
        pytest.param("[::]:443", Address("::", 443), id="ipv6-any"),
        pytest.param("[2001:DB8:0::1]:80", Address("2001:db8::1", 80), id="ipv6-normalised"),
        pytest.param("localhost:80", Address("localhost", 80), id="hostname"),
        pytest.param(
            "Backend.Example.COM:65535", Address("backend.example.com", 65535), id="max-port"
        ),
        pytest.param("0.0.0.0:0", Address("0.0.0.0", 0), id="port-zero"),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param("127.0.0.1", "no port", id="missing-port"),
        pytest.param("[::1]", "no port", id="ipv6-missing-port"),
        pytest.param("::1:8080", "an IPv6 address needs brackets", id="ipv6-unbracketed"),
        pytest.param("127.0.0.1:65536", "port must be a number from 0 to 65535", id="port-too-big"),
        pytest.param("127.0.0.1:-1", "port must be a number", id="negative-port"),
        pytest.param("127.0.0.1:http", "port must be a number", id="named-port"),
        pytest.param("127.0.0.1:", "port must be a number", id="empty-port"),
        pytest.param(":8080", "no host", id="missing-host"),
        pytest.param("999.1.1.1:80", "'999.1.1.1' is not an IPv4 address", id="bad-ipv4"),
        pytest.param("[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address", id="bracketed-ipv4"),
        pytest.param("[::g]:80", "'::g' is not an IPv6 address", id="bad-ipv6"),
        pytest.param("bad_host:80", "not a valid host name", id="underscore"),
        pytest.param("", "no port", id="empty"),
    ],
)
def test_parse_address_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"expected host:port like") as info:
        parse_address(text)
    assert f"found the string {text!r} (" in str(info.value)
    assert why in str(info.value)
