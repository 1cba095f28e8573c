"""The prober edge: one task per upstream with checks, restarted only when it changes."""

from __future__ import annotations

import trio

from tests.support.configs import config_yaml, upstream
from upgradeproxy.config.loader import parse_config
from upgradeproxy.connection.context import Runtime, Shared
from upgradeproxy.upstream.health_checks import Probers


def config(a_interval: str, b_interval: str, c_check: bool = True) -> str:
    c_keys = {"health_check": {"interval": 60}} if c_check else {}
    return config_yaml({
        "a": upstream(9, health_check={"interval": a_interval}),
        "b": upstream(9, health_check={"interval": b_interval}),
        "c": upstream(9, **c_keys),
    })  # fmt: skip


async def test_reload_restarts_the_probes_of_changed_upstreams_only() -> None:
    shared = Shared()
    probers = Probers()
    async with trio.open_nursery() as nursery:
        first = Runtime.build(parse_config(config("60", "60"), "t.yaml"), shared.book)
        probers.sync(
            nursery, first.config.upstreams, first.tls_contexts, shared.book, shared.telemetry
        )
        scopes = {name: scope for name, (_, scope) in probers._running.items()}
        assert sorted(scopes) == ["a", "b", "c"]
        second = Runtime.build(parse_config(config("60", "30", False), "t.yaml"), shared.book, 1.0)
        probers.sync(
            nursery, second.config.upstreams, second.tls_contexts, shared.book, shared.telemetry
        )
        assert not scopes["a"].cancel_called  # unchanged: its probes go on
        assert scopes["b"].cancel_called  # changed: restarted
        assert scopes["c"].cancel_called  # checks removed: stopped
        assert sorted(probers._running) == ["a", "b"]
        assert probers._running["b"][1] is not scopes["b"]
        nursery.cancel_scope.cancel()
