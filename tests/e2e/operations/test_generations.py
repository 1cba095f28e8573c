"""Restarts that drop nothing (contract "Operations additions"): SIGUSR2 generations on
handed-over listening sockets, systemd socket activation and notification, and the parent
that owns the sockets.

Real processes on loopback: `python -m upgradeproxy run` signalled with `os.kill`."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

from tests.support.clients import LOOPBACK, Tunnel, free_port, http, read_response, refused
from tests.support.configs import config_yaml, route
from tests.support.peers import echo_after_switch, respond_ok_forever
from tests.support.processes import ProxyProcess, clean_env
from tests.support.procfs import gone
from tests.support.waiting import WAIT, eventually


class ClientLoop:
    """Fresh connections in a loop on a thread, bounded in count and time: an HTTP request,
    a short WebSocket handshake (one echo, then closed) and an admin /healthz. Every failure
    (refused, reset, wrong answer) is kept."""

    def __init__(self, port: int, admin: int) -> None:
        self.port, self.admin = port, admin
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 4 * WAIT
        while not self._stop.is_set() and time.monotonic() < deadline and self.rounds < 3000:
            try:
                assert http(self.port, "/web")[::2] == (200, b"ok")
                tunnel = Tunnel(self.port, "/chat", tag=1)
                assert tunnel.echo(b"hello") == b"hello"
                tunnel.close()
                assert http(self.admin, "/healthz")[0] == 200
            except (OSError, AssertionError, EOFError) as exc:
                self.errors.append(repr(exc))
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)


def upgrade_config(port: int, admin: int, web: int, chat: int, **keys: Any) -> str:
    return config_yaml({"web": web, "chat": chat}, [route("chat", path_prefix="/chat"),
                       route("web")], listen=[port], admin=admin, **keys)  # fmt: skip


def served_by(proc: ProxyProcess, since: int) -> set[int]:
    """The pids in the access-log lines logged after the first `since` lines."""
    return {line["pid"] for line in proc.records()[since:] if line.get("msg") in ("http", "tunnel")}


def test_sigusr2_with_one_worker_hands_the_sockets_to_a_new_process(run_proxy, raw_upstream):
    """workers: 1: a new process (new pid) takes over the listening and admin sockets. A
    client loop throughout sees no refusal or reset, tunnels opened before keep passing
    bytes, new connections go to the new pid, and the old one exits with its last tunnel."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    proc = run_proxy(upgrade_config(port, admin, web.port, chat.port))
    old = proc.popen.pid
    before = [Tunnel(port, "/chat", tag=1) for _ in range(3)]
    loop = ClientLoop(port, admin)
    assert eventually(lambda: loop.rounds >= 5)
    proc.signal(signal.SIGUSR2)
    retired = proc.wait_log("upgrade: new process accepts; retiring")[0]
    new = retired["new_pid"]
    assert new != old
    rounds = loop.rounds
    assert eventually(lambda: loop.rounds >= rounds + 2)  # what the old one took has ended
    mark, rounds = len(proc.records()), loop.rounds
    assert eventually(lambda: loop.rounds >= rounds + 10)
    loop.stop()
    assert loop.errors == [], loop.errors[:5]
    assert served_by(proc, mark) == {new}
    assert proc.popen.poll() is None  # still finishing the tunnels it has
    for i, tunnel in enumerate(before):
        assert tunnel.echo(b"still here") == b"still here"
        tunnel.close()
        if i < len(before) - 1:
            assert proc.popen.poll() is None
    assert proc.wait_exit() == 0
    assert http(port, "/web")[0] == 200
    assert http(admin, "/readyz")[0] == 200
    os.kill(new, signal.SIGTERM)
    assert eventually(lambda: gone(new))
    assert refused(port)
    assert refused(admin)


def test_sigusr2_with_two_workers_starts_a_new_generation_on_the_same_sockets(
    run_proxy, raw_upstream
):
    """workers: 2: two new workers (new pids) accept on the parent's sockets before the old
    ones stop; no client is refused or reset; each old worker keeps its tunnels and exits
    when they are closed; the parent stays and drains the new generation on SIGTERM."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    proc = run_proxy(upgrade_config(port, admin, web.port, chat.port, workers=2), workers=2)
    old = {line["pid"] for line in proc.wait_log("worker ready", count=2)}
    # Enough that both old workers hold some (all on one: a 2**-11 chance).
    before = [Tunnel(port, "/chat", tag=1) for _ in range(12)]
    loop = ClientLoop(port, admin)
    assert eventually(lambda: loop.rounds >= 5)
    proc.signal(signal.SIGUSR2)
    proc.wait_log("upgrade: new generation ready, retiring the old one", generation=1)
    new = {line["pid"] for line in proc.wait_log("worker ready", generation=1, count=2)}
    assert not new & old
    proc.wait_log("retiring: a new generation accepts", count=2)
    rounds = loop.rounds
    assert eventually(lambda: loop.rounds >= rounds + 2)
    mark, rounds = len(proc.records()), loop.rounds
    assert eventually(lambda: loop.rounds >= rounds + 10)
    loop.stop()
    assert loop.errors == [], loop.errors[:5]
    assert served_by(proc, mark) <= new
    holders = {line["pid"] for line in proc.records()[:mark] if line.get("msg") == "http"
               and line.get("status") == 101 and line["pid"] in old}  # fmt: skip
    assert holders == old
    assert all(not gone(pid) for pid in holders)  # each keeps serving its tunnels
    for tunnel in before:
        assert tunnel.echo(b"still here") == b"still here"
        tunnel.close()
    for pid in old:
        proc.wait_log("worker exited", pid=pid, exit_code=0)
    assert http(port, "/web")[0] == 200
    assert proc.popen.poll() is None
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert all(gone(pid) for pid in new)


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["old", "new"])
def test_sigterm_during_an_upgrade_drains_both_generations(run_proxy, raw_upstream, signalled):
    """workers: 1, SIGTERM to either process once the new one accepts: both drain, so the
    listener closes and tunnels on both sides get `timeouts.drain`, not `upgrade_grace`."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    timeouts = {"drain": 2, "upgrade_grace": 600}
    proc = run_proxy(upgrade_config(port, admin, web.port, chat.port, timeouts=timeouts))
    on_old = Tunnel(port, "/chat", tag=1)
    proc.signal(signal.SIGUSR2)
    new = proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
    on_new = Tunnel(port, "/chat", tag=1)
    assert eventually(lambda: any(line.get("pid") == new for line in proc.records()
                                  if line.get("msg") == "http"))  # fmt: skip
    signalled_at = time.monotonic()
    os.kill(proc.popen.pid if signalled == "old" else new, signal.SIGTERM)
    assert eventually(lambda: refused(port))
    for tunnel in (on_old, on_new):
        assert tunnel.closed_by_peer()
    assert 2.0 <= time.monotonic() - signalled_at < WAIT  # the drain deadline, not the grace
    assert proc.wait_exit() == 0
    assert eventually(lambda: gone(new))
    assert not proc.matching(lambda line: line["msg"] == "stopping now")


@pytest.mark.slow
def test_sigterm_during_an_upgrade_with_workers_drains_both_generations(run_proxy, raw_upstream):
    """workers: 2, SIGTERM to the parent after the new generation took over: the retiring
    workers cut their grace to `timeouts.drain`, the new ones drain; the parent exits 0."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    timeouts = {"drain": 2, "upgrade_grace": 600}
    config = upgrade_config(port, admin, web.port, chat.port, workers=2, timeouts=timeouts)
    proc = run_proxy(config, workers=2)
    old = [Tunnel(port, "/chat", tag=1) for _ in range(4)]
    proc.signal(signal.SIGUSR2)
    proc.wait_log("retiring: a new generation accepts", count=2)
    new = [Tunnel(port, "/chat", tag=1) for _ in range(4)]
    signalled_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert eventually(lambda: refused(port))
    for tunnel in old + new:
        assert tunnel.closed_by_peer()
    assert 2.0 <= time.monotonic() - signalled_at < WAIT
    assert proc.wait_exit() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_listen_fds_sockets_are_used_as_listeners(run_proxy, tmp_path, raw_upstream, workers):
    """LISTEN_FDS=2 with LISTEN_PID = the proxy's pid: fd 3 (bound by the test, which keeps
    its copy, so the proxy could not bind that port itself) serves the listener with its
    address; fd 4 matches no listener and is closed; a listener without an fd is bound."""
    web = raw_upstream(respond_ok_forever)
    activated = socket.create_server((LOOPBACK, 0))
    stray = socket.create_server((LOOPBACK, 0))
    port, own = activated.getsockname()[1], free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(config_yaml({"web": web.port}, [route("web")], listen=[port, own],
                                workers=workers))  # fmt: skip

    def onto_3_and_4() -> None:  # in the child, before exec
        os.dup2(activated.fileno(), 3)
        os.dup2(stray.fileno(), 4)

    with activated, stray:
        proc = run_proxy(
            path,
            prefix=["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"],
            env=clean_env(LISTEN_FDS="2"),
            preexec_fn=onto_3_and_4,
            close_fds=False,
            ready=False,
        )
        proc.wait_log("listening", count=workers)
        proc.wait_log("LISTEN_FDS: socket activation", fd=3, address=f"{LOOPBACK}:{port}")
        proc.wait_log("LISTEN_FDS: socket matches no listener in the config: closed", fd=4)
        assert http(port, "/activated")[0] == 200
        assert http(own, "/own")[0] == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        # systemd (here the test) still holds the socket: clients wait for the next start.
        with socket.create_connection((LOOPBACK, port), timeout=WAIT):
            pass


def test_systemd_hears_ready_and_the_new_main_pid_after_sigusr2(run_proxy, raw_upstream, tmp_path):
    """With $NOTIFY_SOCKET (Type=notify): READY=1 once listening; after SIGUSR2 the new
    process reports MAINPID=<its pid>, so systemd follows it and not the exiting one."""
    web = raw_upstream(respond_ok_forever)
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(WAIT)
        proc = run_proxy(
            config_yaml({"web": web.port}, [route("web")], listen=[port]),
            env=clean_env(NOTIFY_SOCKET=str(tmp_path / "notify")),
            ready=False,
        )
        assert notify.recv(4096) == b"READY=1"
        proc.signal(signal.SIGUSR2)
        new = proc.wait_log("upgrade: new process accepts; retiring")[0]["new_pid"]
        assert notify.recv(4096) == f"MAINPID={new}\nREADY=1".encode()
        assert proc.wait_exit() == 0  # nothing open: the old one exits at once
        assert http(port, "/")[0] == 200


def test_failed_upgrade_keeps_the_old_process_serving(run_proxy, raw_upstream):
    """SIGUSR2 with an invalid file on disk: the new process exits, the old one logs it and
    keeps accepting (and can be upgraded later)."""
    web = raw_upstream(respond_ok_forever)
    port = free_port()
    good = config_yaml({"web": web.port}, [route("web")], listen=[port])
    proc = run_proxy(good)
    proc.rewrite(good + "bogus: 1\n")
    proc.signal(signal.SIGUSR2)
    proc.wait_log("upgrade failed: the new process did not start; this one keeps serving")
    assert http(port, "/")[0] == 200
    proc.rewrite(good)
    proc.signal(signal.SIGUSR2)
    proc.wait_log("upgrade: new process accepts; retiring")
    assert proc.wait_exit() == 0
    assert http(port, "/")[0] == 200


def test_clients_queued_on_a_dead_workers_socket_are_served_by_its_replacement(
    run_proxy, raw_upstream
):
    """workers: 2, worker 0 stopped (SIGSTOP) while clients connect, then SIGKILLed: the
    clients queued on its socket are not reset (the parent still holds the socket); its
    replacement accepts and serves them."""
    web = raw_upstream(respond_ok_forever)
    port = free_port()
    proc = run_proxy(config_yaml({"web": web.port}, [route("web")], listen=[port], workers=2),
                 workers=2)  # fmt: skip
    pids = {line["worker"]: line["pid"] for line in proc.wait_log("worker ready", count=2)}
    os.kill(pids[0], signal.SIGSTOP)
    clients = []
    try:
        # The kernel puts each connection in one worker's queue as it is made: worker 1
        # takes its share, worker 0's waits. (All on worker 1's socket: a 2**-16 chance.)
        for i in range(16):
            sock = socket.create_connection((LOOPBACK, port), timeout=WAIT)
            sock.sendall(f"GET /{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            clients.append(sock)
    finally:
        os.kill(pids[0], signal.SIGKILL)
    fresh = proc.wait_record(
        lambda line: line["msg"] == "worker ready" and line["worker"] == 0
        and line["pid"] != pids[0]
    )[0]["pid"]  # fmt: skip
    for sock in clients:
        with sock:
            assert read_response(sock)[0] == 200
    # The queued ones waited for the replacement (its access lines follow the responses).
    assert eventually(lambda: fresh in served_by(proc, 0))


def test_rejected_upgrades_with_workers_leave_the_old_generation_serving(run_proxy, raw_upstream):
    """workers: 2: SIGUSR2 with an invalid file, then with a new listener whose port is held
    by someone else: each is logged and nothing changes; a good file then upgrades."""
    web = raw_upstream(respond_ok_forever)
    port = free_port()
    good = config_yaml({"web": web.port}, [route("web")], listen=[port], workers=2)
    proc = run_proxy(good, workers=2)
    old = {line["pid"] for line in proc.wait_log("worker ready", count=2)}
    proc.rewrite(good + "bogus: 1\n")
    proc.signal(signal.SIGUSR2)
    proc.wait_record(
        lambda line: line["msg"].startswith("upgrade rejected: ") and "bogus" in line["msg"]
    )
    with socket.create_server((LOOPBACK, 0)) as holder:
        held = holder.getsockname()[1]
        proc.rewrite(config_yaml({"web": web.port}, [route("web")], listen=[port, held], workers=2))
        proc.signal(signal.SIGUSR2)
        why = f"listen[1].address {LOOPBACK}:{held}: address already in use"
        proc.wait_log(f"upgrade failed: {why}")
    assert http(port, "/")[0] == 200
    assert not proc.matching(lambda line: line["msg"] == "retiring: a new generation accepts")
    proc.rewrite(good)
    proc.signal(signal.SIGUSR2)
    new = {line["pid"] for line in proc.wait_log("worker ready", generation=1, count=2)}
    for pid in old:
        proc.wait_log("worker exited", pid=pid, exit_code=0)
    assert not new & old
    assert http(port, "/")[0] == 200


@pytest.mark.slow
def test_sigterm_before_the_new_process_is_ready_drains_both(run_proxy, raw_upstream):
    """workers: 1, SIGTERM right after SIGUSR2 (the new process still starting): the old one
    drains, and the new one drains as soon as it runs; both exit, the port is closed."""
    web, chat = raw_upstream(respond_ok_forever), raw_upstream(echo_after_switch(b"A"))
    port, admin = free_port(), free_port()
    proc = run_proxy(upgrade_config(port, admin, web.port, chat.port, timeouts={"drain": 2}))
    tunnel = Tunnel(port, "/chat", tag=1)
    proc.signal(signal.SIGUSR2)
    new = proc.wait_log("upgrade: new process started")[0]["new_pid"]
    proc.signal(signal.SIGTERM)
    proc.wait_log("draining: the previous generation was told to stop", pid=new)
    assert tunnel.closed_by_peer()
    assert proc.wait_exit() == 0
    assert eventually(lambda: gone(new))
    assert refused(port)
    assert not proc.matching(lambda line: line["msg"] == "upgrade: new process accepts; retiring")
