"""The pool layout's own config (deploy/kubernetes/pool/upgradeproxy.yaml), its `discover`
pointed at a DNS server the test controls, in front of three python-socketio servers behind
one name (127.0.0.2-4, one port, as pods behind the headless Service): every session connects
by long-polling, upgrades to a WebSocket and echoes, 10 of 10, across the config's two
workers, and every pod gets sessions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_proxy
from tests.e2e.pool.pods import common_port
from tests.e2e.pool_peers import admin_json

socketio = pytest.importorskip("socketio")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

LAYOUT = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "pool"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


class Pod:
    """A python-socketio ASGI app under uvicorn on its own address; `echo` answers with it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.sessions: list[str] = []
        sio = socketio.AsyncServer(async_mode="asgi", ping_interval=2, ping_timeout=2)

        @sio.event
        async def connect(sid: str, environ: dict) -> None:
            self.sessions.append(sid)

        @sio.event
        async def echo(sid: str, data: object) -> dict:
            return {"server": host, "data": data}

        config = uvicorn.Config(
            socketio.ASGIApp(sio), host=host, port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    port = common_port(HOSTS)
    made = [Pod(host, port) for host in HOSTS]
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


def session(url: str, n: int) -> str | None:
    """One client session: connect by polling, upgrade, echo. The pod's address, or None."""
    client = socketio.Client()
    try:
        client.connect(url, wait_timeout=3)
        deadline = time.monotonic() + 3
        while client.transport() != "websocket" and time.monotonic() < deadline:
            time.sleep(0.02)
        if client.transport() != "websocket":
            return None
        answer = client.call("echo", n, timeout=3)
        return answer["server"] if answer["data"] == n else None
    except (socketio.exceptions.ConnectionError, socketio.exceptions.TimeoutError):
        return None
    finally:
        client.disconnect()


def test_every_session_works_through_the_pool_layout(spawn, tmp_path, dns, pods):
    layout = yaml.safe_load((LAYOUT / "upgradeproxy.yaml").read_text())
    (upstream,) = layout["upstreams"].values()
    dns.set(upstream["discover"]["name"], A=HOSTS)  # "chat-ws", as the file names it
    port, admin, pod_port = free_port(), free_port(), pods[0].server.config.port
    path = tmp_path / "upgradeproxy.yaml"
    path.write_text(layout_config(dns.address, port, admin, pod_port))
    proc = start_proxy(spawn, path)
    proc.wait_msg("worker ready", count=layout["workers"])
    (listed,) = admin_json(admin).values()
    assert [s["address"] for s in listed["servers"]] == [f"{h}:{pod_port}" for h in HOSTS]
    results = [session(f"http://127.0.0.1:{port}", n) for n in range(10)]
    assert None not in results, results
    assert set(results) == set(HOSTS)
    assert all(pod.sessions for pod in pods)
