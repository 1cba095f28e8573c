"""`check` problems for the pool keys (interface.md rule 9-11), each with its file and line."""

from __future__ import annotations

import pytest

from upgradeproxy.config.loader import ConfigError, parse_config
from upgradeproxy.config.model import HashKey, HealthCheck


def config(upstream_keys: str) -> str:
    body = "\n".join("    " + line for line in upstream_keys.strip().splitlines())
    return f"""listen: [{{address: "127.0.0.1:0"}}]
upstreams:
  chat:
    servers: ["127.0.0.1:9000"]
{body}
routes: [{{upstream: chat}}]
"""


def problems(upstream_keys: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(upstream_keys), "pool.yaml")
    return [str(p) for p in info.value.problems]


PROBLEMS = [
    pytest.param("balance: hash", "pool.yaml:5: upstreams.chat.balance: balance: hash needs a "
                 "hash_key", id="hash-without-key"),
    pytest.param("balance: least_conn\nhash_key: client_ip", "pool.yaml:6: upstreams.chat.hash_key:"
                 " hash_key only applies to balance: hash (balance is least_conn)",
                 id="key-with-least-conn"),
    pytest.param("hash_key: client_ip", "pool.yaml:5: upstreams.chat.hash_key: hash_key only "
                 "applies to balance: hash (balance is round_robin)", id="key-without-balance"),
    pytest.param("balance: hash\nhash_key: 'ip:x'", "pool.yaml:6: upstreams.chat.hash_key: "
                 "expected client_ip, header:NAME, cookie:NAME or query:NAME, found the string "
                 "'ip:x'", id="unknown-kind"),
    pytest.param("balance: hash\nhash_key: 'header:'", "pool.yaml:6: upstreams.chat.hash_key: "
                 "expected a header name after 'header:', found the string 'header:'",
                 id="empty-header-name"),
    pytest.param("balance: hash\nhash_key: 'cookie:a b'", "pool.yaml:6: upstreams.chat.hash_key:"
                 " expected a cookie name after 'cookie:', found the string 'cookie:a b'",
                 id="bad-cookie-name"),
    pytest.param("balance: random", "pool.yaml:5: upstreams.chat.balance: unknown value 'random'"
                 " (expected one of: round_robin, least_conn, hash)", id="unknown-balance"),
    pytest.param("sticky_cookie: 'a;b'", "pool.yaml:5: upstreams.chat.sticky_cookie: expected a "
                 "cookie name (letters, digits, '-', '_'), found the string 'a;b'",
                 id="sticky-cookie-name"),
    pytest.param("max_tunnels: 0", "pool.yaml:5: upstreams.chat.max_tunnels: expected a positive"
                 " whole number, found the number 0", id="max-tunnels-zero"),
    pytest.param("max_tunnels: many", "pool.yaml:5: upstreams.chat.max_tunnels: expected a "
                 "positive whole number, found the string 'many'", id="max-tunnels-text"),
    pytest.param("slow_start: '5x'", "pool.yaml:5: upstreams.chat.slow_start: expected a duration"
                 " in seconds (5, 2.5) or a string like '250ms', '5s', '1m', '1h30m', found the "
                 "string '5x'", id="slow-start-unit"),
    pytest.param("health_check: /healthz", "pool.yaml:5: upstreams.chat.health_check: expected a"
                 " mapping with some of: path, upgrade, interval, timeout, healthy_after, "
                 "unhealthy_after, found the string '/healthz'", id="health-not-mapping"),
    pytest.param("health_check:\n  path: healthz", "pool.yaml:6: upstreams.chat.health_check.path"
                 ": expected a path starting with '/' (no spaces, '?' or '#'), found the string "
                 "'healthz'", id="health-path"),
    pytest.param("health_check:\n  upgrade: h2c", "pool.yaml:6: upstreams.chat.health_check."
                 "upgrade: expected 'websocket' (the only upgrade checked), found the string 'h2c'",
                 id="health-upgrade"),
    pytest.param("health_check:\n  interval: 0", "pool.yaml:6: upstreams.chat.health_check."
                 "interval: expected a duration greater than zero, found the number 0",
                 id="health-interval-zero"),
    pytest.param("health_check:\n  timeout: -1s", "pool.yaml:6: upstreams.chat.health_check."
                 "timeout: expected a duration greater than zero, found the string '-1s'",
                 id="health-timeout"),
    pytest.param("health_check:\n  healthy_after: 0", "pool.yaml:6: upstreams.chat.health_check."
                 "healthy_after: expected a positive whole number, found the number 0",
                 id="healthy-after"),
    pytest.param("health_check:\n  unhealthy_after: 1.5", "pool.yaml:6: upstreams.chat."
                 "health_check.unhealthy_after: expected a positive whole number, found the number"
                 " 1.5", id="unhealthy-after"),
    pytest.param("health_check:\n  intervall: 1", "pool.yaml:6: upstreams.chat.health_check."
                 "intervall: unknown key 'intervall' (did you mean 'interval'?)",
                 id="health-unknown-key"),
    pytest.param("stickycookie: upx", "pool.yaml:5: upstreams.chat.stickycookie: unknown key "
                 "'stickycookie' (did you mean 'sticky_cookie'?)", id="unknown-upstream-key"),
]  # fmt: skip


@pytest.mark.parametrize(("keys", "expected"), PROBLEMS)
def test_pool_key_problem(keys: str, expected: str) -> None:
    assert expected in problems(keys)


def test_every_pool_key_problem_is_reported_in_one_run() -> None:
    found = problems("balance: hash\nmax_tunnels: 0\nsticky_cookie: 'a b'\nslow_start: x")
    assert len(found) == 4, found


def test_pool_keys_parse() -> None:
    cfg = parse_config(
        config("""
balance: hash
hash_key: "header:X-User"
sticky_cookie: upx
max_tunnels: 5000
slow_start: 30s
health_check:
  path: /healthz
  upgrade: websocket
  interval: 5s
  timeout: 250ms
  healthy_after: 2
  unhealthy_after: 3
""")
    )
    up = cfg.upstreams["chat"]
    assert up.hash_key == HashKey("header", "x-user")
    assert (up.sticky_cookie, up.max_tunnels, up.slow_start) == ("upx", 5000, 30.0)
    assert up.health_check == HealthCheck("/healthz", "websocket", 5.0, 0.25, 2, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("client_ip", HashKey("client_ip")), ("cookie:sid", HashKey("cookie", "sid")),
     ("query:room", HashKey("query", "room")), ("header:X-A", HashKey("header", "x-a"))],
)  # fmt: skip
def test_hash_key_kinds(text: str, expected: HashKey) -> None:
    cfg = parse_config(config(f"balance: hash\nhash_key: '{text}'"))
    assert cfg.upstreams["chat"].hash_key == expected


def test_defaults_keep_todays_behaviour() -> None:
    up = parse_config(config("")).upstreams["chat"]
    assert (up.hash_key, up.sticky_cookie, up.max_tunnels, up.slow_start, up.health_check) == (
        None, None, 0, 0.0, None,
    )  # fmt: skip
