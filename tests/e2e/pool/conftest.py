"""Fixtures of the pool tests: pods on several loopback addresses, a DNS server naming them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.dns_server import DnsServer
from tests.e2e.pool import pods as pods_module
from tests.e2e.pool.pods import Pod


@pytest.fixture
def make_pods() -> Iterator[Callable[..., list[Pod]]]:
    """`make_pods(n, first=2, port=None)`: pods on 127.0.0.FIRST.. (one port for all)."""
    made: list[Pod] = []

    def make(n: int, first: int = 2, port: int | None = None) -> list[Pod]:
        pods = pods_module.make(n, first, port)
        made.extend(pods)
        return pods

    yield make
    for pod in made:
        pod.close()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()
