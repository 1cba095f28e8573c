"""The system's resolvers (interface.md rule 16): without `resolvers`, a lookup uses
/etc/resolv.conf's nameservers, `search` domains and `ndots`, as a pod needs for `chat-ws` to
mean `chat-ws.<namespace>.svc.cluster.local`; with `resolvers`, the name is taken as written.

resolv.conf has no port, so the DNS server listens on port 53 of a loopback address (this
needs the right to bind a port below 1024; without it the test is skipped).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer
from upgradeproxy.config.model import Address, Discover, Server
from upgradeproxy.upstream.dns import asker, look_up

POD = "10.20.0.7"


@pytest.fixture
def port53() -> Iterator[DnsServer]:
    try:
        server = DnsServer("127.53.0.1", 53)
    except PermissionError:
        pytest.skip("cannot bind port 53 (needs root or CAP_NET_BIND_SERVICE)")
    except OSError as exc:
        pytest.skip(f"port 53 of 127.53.0.1 is taken: {exc}")
    server.set("chat-ws.team.svc.cluster.test", A=[POD])
    yield server
    server.close()


def resolv_conf(tmp_path: Path, text: str) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return str(path)


SYSTEM = "nameserver 127.53.0.1\nsearch team.svc.cluster.test svc.cluster.test\noptions ndots:5\n"


async def test_a_short_name_is_found_through_the_search_domains(port53, tmp_path):
    discover = Discover("chat-ws", 9000)
    lookup = await look_up(discover, asker(discover, 2.0, resolv_conf(tmp_path, SYSTEM)), 2.0)
    assert (lookup.result, lookup.servers) == ("ok", (Server(Address(POD, 9000)),))
    assert port53.asked("chat-ws.team.svc.cluster.test", "A") == 1
    assert port53.asked("chat-ws.svc.cluster.test") == 0  # found at the first domain


async def test_a_name_with_a_final_dot_is_not_searched(port53, tmp_path):
    discover = Discover("chat-ws.", 9000)
    lookup = await look_up(discover, asker(discover, 2.0, resolv_conf(tmp_path, SYSTEM)), 2.0)
    assert (lookup.result, lookup.detail) == ("empty", "NXDOMAIN")
    assert port53.asked("chat-ws.team.svc.cluster.test") == 0


async def test_with_ndots_1_a_dotted_name_is_asked_as_written_first(port53, tmp_path):
    conf = resolv_conf(tmp_path, SYSTEM.replace("ndots:5", "ndots:1"))
    port53.set("chat-ws.team", A=["10.20.0.9"])
    discover = Discover("chat-ws.team", 9000)
    lookup = await look_up(discover, asker(discover, 2.0, conf), 2.0)
    assert lookup.servers == (Server(Address("10.20.0.9", 9000)),)


async def test_explicit_resolvers_take_the_name_as_written(port53, tmp_path):
    discover = Discover("chat-ws", 9000, resolvers=(Address("127.53.0.1", 53),))
    lookup = await look_up(discover, asker(discover, 2.0, resolv_conf(tmp_path, SYSTEM)), 2.0)
    assert (lookup.result, lookup.detail) == ("empty", "NXDOMAIN")
    assert port53.asked("chat-ws") == 2  # A and AAAA, nothing else


async def test_a_resolv_conf_without_nameservers_is_a_failed_lookup(tmp_path):
    discover = Discover("chat-ws", 9000)
    conf = resolv_conf(tmp_path, "search svc.cluster.test\n")
    lookup = await look_up(discover, asker(discover, 2.0, conf), 2.0)
    assert lookup.result == "error"
    assert lookup.detail.startswith("no resolver")
