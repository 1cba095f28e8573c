"""A SIGHUP that reaches the `workers` supervisor while workers are still starting (the first
ones, or a new generation after SIGUSR2) kills none of them: a worker has no SIGHUP handler
until it is ready, so the reload is passed to it once it is, and it ends up on the file as it
is now.
"""

from __future__ import annotations

import signal

from tests.support import procfs
from tests.support.clients import free_port, http
from tests.support.configs import config_yaml, route
from tests.support.peers import named
from tests.support.processes import ProxyProcess
from tests.support.waiting import eventually


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    return {kid for kid in procfs.children(pid) if not procfs.gone(kid)}


def config(port: int, upstream: int) -> str:
    return config_yaml({"web": upstream}, [route("web", path_prefix="/")], listen=[port],
                       workers=2)  # fmt: skip


def reloaded_pids(proc: ProxyProcess) -> set[int]:
    return {line["pid"] for line in proc.matching(lambda line: line.get("msg") == "reloaded")}


def test_a_reload_during_an_upgrade_reaches_the_new_workers(run_proxy, raw_upstream):
    """SIGUSR2, then SIGHUP (with a new file) while the new workers start: the upgrade goes
    through, each new worker reloads once ready, and every client reaches the new upstream."""
    before, after = raw_upstream(named(b"before")), raw_upstream(named(b"after"))
    port = free_port()
    proc = run_proxy(config(port, before.port), workers=2)
    old = children(proc.pid)
    proc.signal(signal.SIGUSR2)
    assert eventually(lambda: len(children(proc.pid) - old) == 2)  # starting, not ready
    proc.rewrite(config(port, after.port))
    proc.signal(signal.SIGHUP)
    proc.wait_log("upgrade: new generation ready, retiring the old one", generation=1)
    new = {line["pid"] for line in proc.wait_log("worker ready", generation=1, count=2)}
    assert eventually(lambda: new <= reloaded_pids(proc))  # the reload owed to each
    assert not proc.matching(lambda line: line.get("msg", "").startswith("upgrade failed"))
    assert not proc.matching(lambda line: line.get("msg") == "worker died: replacing it")
    for pid in old:
        proc.wait_log("worker exited", pid=pid, exit_code=0)
    assert _all_on(port, b"after")


def test_a_reload_before_the_first_workers_are_ready_stops_nothing(run_proxy, raw_upstream):
    """It used to kill them, and a first worker that cannot start stops the group (exit 1)."""
    before, after = raw_upstream(named(b"before")), raw_upstream(named(b"after"))
    port = free_port()
    proc = run_proxy(config(port, before.port), workers=2, ready=False)
    assert eventually(lambda: len(children(proc.pid)) == 2)
    proc.rewrite(config(port, after.port))
    proc.signal(signal.SIGHUP)
    proc.wait_log("worker ready", count=2)
    assert eventually(lambda: _all_on(port, b"after"))
    assert proc.alive()
    assert not proc.matching(lambda line: line.get("msg") == "worker died: replacing it")


def _all_on(port: int, body: bytes, rounds: int = 16) -> bool:
    """Whether `rounds` fresh connections (spread over the workers) all reach `body`'s server."""
    return all(http(port, "/")[2] == body for _ in range(rounds))
