"""The pool layout's own config (deploy/kubernetes/pool/upgradeproxy.yaml), its `discover`
pointed at a DNS server the test controls, in front of three python-socketio servers behind
one name (127.0.0.2-4, one port, as pods behind the headless Service): every session connects
by long-polling, upgrades to a WebSocket and echoes, 10 of 10, across the config's two
workers, and every pod gets sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from tests.support.clients import free_port
from tests.support.metrics import admin_json
from tests.support.pods import common_port
from tests.support.processes import ROOT

pytest.importorskip("socketio")
pytest.importorskip("uvicorn")

from tests.support.socketio_peers import SocketIOServer, session

pytestmark = pytest.mark.slow

LAYOUT = ROOT / "deploy" / "kubernetes" / "pool"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture
def pods() -> Iterator[list[SocketIOServer]]:
    """Three python-socketio servers on their own addresses, one port; each is named by its
    address."""
    port = common_port(HOSTS)
    made = [SocketIOServer(host, host, port) for host in HOSTS]
    yield made
    for pod in made:
        pod.stop()


def layout_config(dns_address: str, port: int, admin: int, pod_port: int) -> str:
    """The layout's file with only what a loopback test must change: its addresses, no PROXY
    header from a cloud balancer, the test's DNS server and the pods' port."""
    config = yaml.safe_load((LAYOUT / "upgradeproxy.yaml").read_text())
    config["listen"][0].update(address=f"127.0.0.1:{port}", proxy_protocol=False)
    config["admin"]["address"] = f"127.0.0.1:{admin}"
    (upstream,) = config["upstreams"].values()
    upstream["discover"].update(resolvers=[dns_address], port=pod_port)
    return yaml.safe_dump(config)


def test_every_session_works_through_the_pool_layout(run_proxy, dns, pods):
    layout = yaml.safe_load((LAYOUT / "upgradeproxy.yaml").read_text())
    (upstream,) = layout["upstreams"].values()
    dns.set(upstream["discover"]["name"], A=HOSTS)  # "chat-ws", as the file names it
    port, admin, pod_port = free_port(), free_port(), pods[0].port
    # The layout's own file, as it ships, with only its addresses moved.
    run_proxy(layout_config(dns.address, port, admin, pod_port), workers=layout["workers"])
    (listed,) = admin_json(admin).values()
    assert [s["address"] for s in listed["servers"]] == [f"{h}:{pod_port}" for h in HOSTS]
    results = [session(f"http://127.0.0.1:{port}", n) for n in range(10)]
    assert None not in results, results
    assert set(results) == set(HOSTS)
    assert all(pod.sessions for pod in pods)
