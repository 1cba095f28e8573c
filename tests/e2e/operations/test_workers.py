"""`workers: N`: requests spread over the workers and every scrape reports the totals; a killed
worker is replaced; the parent validates reloads; a drain reaches every worker once."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.support.clients import (
    Tunnel,
    free_port,
    http,
)
from tests.support.configs import config_yaml, route
from tests.support.metrics import scrape
from tests.support.metrics import value as total
from tests.support.peers import echo_after_switch, respond_ok_forever
from tests.support.waiting import eventually


@pytest.mark.slow
def test_two_workers_each_scrape_reports_the_totals(run_proxy, raw_upstream):
    """Requests spread over both workers; every scrape, whichever worker answers it, shows
    the totals of both: requests, the duration histogram and the open tunnels."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    config = config_yaml(
        {"web": web.port, "chat": chat.port},
        [route("chat", path_prefix="/ws"), route("web")],
        listen=[port],
        admin=admin,
        workers=2,
    )
    proc = run_proxy(config, workers=2)
    requests = 40
    for i in range(requests):
        assert http(port, f"/r{i}")[0] == 200
    served = proc.wait_log("http", count=requests)
    assert {line["worker"] for line in served} == {0, 1}
    tunnels = [Tunnel(port, "/ws", tag=1) for _ in range(6)]
    expected = requests + len(tunnels)
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_requests_total") == expected)
    for _ in range(12):  # fresh connections: SO_REUSEPORT spreads them over both workers
        found = scrape(admin)
        assert total(found, "upgradeproxy_requests_total") == expected
        assert total(found, "upgradeproxy_request_duration_seconds_count") == expected
        assert total(found, "upgradeproxy_tunnels_active") == len(tunnels)
    for tunnel in tunnels:
        tunnel.close()
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == 0)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_totals_survive(run_proxy, raw_upstream):
    """SIGKILL one worker: the parent starts another; the dead worker's counts stay in the
    totals, its tunnels leave the gauge; SIGTERM to the parent drains all and exits 0."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    config = config_yaml(
        {"web": web.port, "chat": chat.port},
        [route("chat", path_prefix="/ws"), route("web")],
        listen=[port],
        admin=admin,
        workers=2,
    )
    proc = run_proxy(config, workers=2)
    pids = {line["worker"]: line["pid"] for line in proc.wait_log("worker ready", count=2)}
    for i in range(10):
        assert http(port, f"/before{i}")[0] == 200
    # Enough that both workers hold some (all on one: a 2**-19 chance).
    tunnels = [Tunnel(port, "/ws", tag=1) for _ in range(20)]
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == 20)
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_connections_active") == 20)
    # process_* per live worker, labelled with its pid (issue 11).
    memory = scrape(admin)["process_resident_memory_bytes"].samples
    assert {s.labels["pid"] for s in memory} == {str(pid) for pid in pids.values()}
    assert all(s.value > 0 for s in memory)

    os.kill(pids[0], signal.SIGKILL)
    proc.wait_log("worker died: replacing it", worker=0)
    fresh = proc.wait_record(
        lambda line: (
            line["msg"] == "worker ready" and line["worker"] == 0 and line["pid"] != pids[0]
        )
    )[0]["pid"]
    alive = [t for t in tunnels if t.works()]
    assert len(alive) < len(tunnels)  # worker 0 took some tunnels with it
    for i in range(10):
        assert http(port, f"/after{i}")[0] == 200
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_tunnels_active") == len(alive))
    # Gauges count live workers only; counters keep what the dead one counted (below).
    active = "upgradeproxy_connections_active"
    assert eventually(lambda: total(scrape(admin), active) == len(alive))
    memory = scrape(admin)["process_resident_memory_bytes"].samples
    assert {s.labels["pid"] for s in memory} == {str(pids[1]), str(fresh)}
    expected = 10 + len(tunnels) + 10  # the 101s count as exchanges too
    assert eventually(lambda: total(scrape(admin), "upgradeproxy_requests_total") == expected)

    proc.signal(signal.SIGTERM)
    for tunnel in alive:
        tunnel.close()
    assert proc.wait_exit() == 0
    for pid in (pids[1], fresh):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_reload_with_workers_is_validated_by_the_parent(run_proxy, raw_upstream):
    """SIGHUP to the parent: an invalid file is rejected there (workers untouched); a valid
    one reaches every worker. A new `workers` count is logged as needing a restart."""
    a, b = raw_upstream(echo_after_switch(b"A")), raw_upstream(echo_after_switch(b"B"))
    port = free_port()
    good = config_yaml({"chat": a.port}, [route("chat")], listen=[port], workers=2)
    proc = run_proxy(good, workers=2)
    proc.rewrite(good + "bogus: 1\n")
    proc.signal(signal.SIGHUP)
    proc.wait_record(
        lambda line: line["msg"].startswith("reload rejected: ") and "bogus" in line["msg"]
    )
    assert {Tunnel(port, tag=1).tag for _ in range(6)} == {b"A"}

    proc.rewrite(config_yaml({"chat": b.port}, [route("chat")], listen=[port], workers=3))
    proc.signal(signal.SIGHUP)
    reloaded = proc.wait_log("reloaded", count=2)
    assert {line["worker"] for line in reloaded} == {0, 1}
    assert proc.matching(lambda line: "takes a restart" in line["msg"])
    assert {Tunnel(port, tag=1).tag for _ in range(8)} == {b"B"}
    assert len(proc.matching(lambda line: line["msg"] == "worker ready")) == 2


@pytest.mark.slow
def test_worker_signalled_directly_and_by_the_parent_drains_once(run_proxy, raw_upstream):
    """systemd's default KillMode signals every process of the unit, so a worker may get
    SIGTERM both directly and from the parent: a repeat must not cut its tunnels."""
    chat = raw_upstream(echo_after_switch(b"A"))
    port = free_port()
    config = config_yaml(
        {"chat": chat.port}, [route("chat")], listen=[port], workers=2, timeouts={"drain": 600}
    )
    proc = run_proxy(config, workers=2)
    pids = {line["worker"]: line["pid"] for line in proc.wait_log("worker ready", count=2)}
    tunnel = Tunnel(port, tag=1)
    worker = proc.wait_log("http", status=101)[0]["worker"]
    os.kill(pids[worker], signal.SIGTERM)
    proc.wait_log("draining", worker=worker)
    proc.signal(signal.SIGTERM)
    proc.wait_log("already draining", worker=worker)
    assert tunnel.works()
    assert not proc.matching(lambda line: line["msg"] == "stopping now")
    tunnel.close()
    assert proc.wait_exit() == 0


def test_readyz_answers_503_while_a_worker_drains_after_the_other_exited(run_proxy, raw_upstream):
    """workers: 2, SIGTERM with one tunnel open: the idle worker exits at once, and every
    probe that follows still gets its 503 from the worker left draining, never a reset
    (the admin socket is one socket shared by the workers, not one per worker)."""
    chat = raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    config = config_yaml(
        {"chat": chat.port}, [route("chat")], listen=[port], admin=admin, workers=2,
        timeouts={"drain": 600},
    )  # fmt: skip
    proc = run_proxy(config, workers=2)
    proc.wait_log("worker ready", count=2)
    tunnel = Tunnel(port, tag=1)
    answers: list[int | str] = []
    exited = threading.Event()

    def probe() -> None:
        # Fresh connections (fresh source ports, hashed anywhere over per-worker sockets)
        # all through the idle worker's exit; bounded in count.
        for _ in range(5000):
            try:
                answers.append(http(admin, "/readyz")[0])
            except OSError as exc:
                answers.append(type(exc).__name__)
            if exited.is_set() and len(answers) > 50:
                return

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        proc.signal(signal.SIGTERM)
        proc.wait_log("worker exited")  # the idle one
    finally:
        exited.set()
        prober.join()
    assert set(answers[-20:]) == {503}
    assert set(answers) <= {200, 503}, [a for a in answers if a not in (200, 503)][:5]
    assert tunnel.works()
    tunnel.close()
    assert proc.wait_exit() == 0
