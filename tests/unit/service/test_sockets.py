"""service/sockets.py: the supervisor's listening sockets, handing them down, systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.configs import proxy_yaml
from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Config
from upgradeproxy.service.sockets import (
    ENV_FDS,
    close_all,
    fds_env,
    handed_sockets,
    own_sockets,
    sd_notify,
    systemd_sockets,
)

LOOPBACK = "127.0.0.1"


def config(*ports: int, admin: int | None = None) -> Config:
    admin_keys = {"admin": {"address": f"127.0.0.2:{admin}"}} if admin is not None else {}
    return parse_config(proxy_yaml(9000, listen=list(ports), **admin_keys))


@pytest.fixture
def owned() -> Iterator[list[dict[str, list[socket.socket]]]]:
    found: list[dict[str, list[socket.socket]]] = []
    yield found
    for sockets in found:
        close_all(s for socks in sockets.values() for s in socks)


def test_one_reuseport_socket_per_slot_all_on_the_port_the_first_got(owned) -> None:
    sockets = own_sockets(config(0), 3, {})
    owned.append(sockets)
    socks = sockets[f"{LOOPBACK}:0"]
    assert len({id(s) for s in socks}) == 3
    assert len({s.getsockname() for s in socks}) == 1
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)


def test_sockets_already_owned_are_kept_and_new_addresses_bound(owned) -> None:
    first = own_sockets(config(0), 2, {})
    owned.append(first)
    again = own_sockets(config(0, admin=0), 2, {}, first)
    owned.append({k: v for k, v in again.items() if k not in first})
    assert again[f"{LOOPBACK}:0"] is first[f"{LOOPBACK}:0"]
    assert [s.getsockname()[0] for s in again["127.0.0.2:0"]] == ["127.0.0.2"]  # admin


def test_the_admin_address_gets_one_socket_shared_by_every_slot(owned) -> None:
    """A worker that exits first in a drain must not take an admin socket (and the probes
    the kernel hashed to it) with it: every slot accepts on the one socket."""
    sockets = own_sockets(config(0, admin=0), 3, {})
    owned.append(sockets)
    assert len(sockets[f"{LOOPBACK}:0"]) == 3
    assert len(sockets["127.0.0.2:0"]) == 1


def test_a_given_socket_serves_every_slot_and_unclaimed_ones_are_closed(owned) -> None:
    given = socket.create_server((LOOPBACK, 0))
    stray = socket.create_server((LOOPBACK, 0))
    port = given.getsockname()[1]
    sockets = own_sockets(config(port), 4, {f"{LOOPBACK}:{port}": given, "elsewhere": stray})
    owned.append(sockets)
    assert sockets[f"{LOOPBACK}:{port}"] == [given]
    assert stray.fileno() == -1


def test_binding_is_all_or_nothing_and_names_the_address(owned) -> None:
    with socket.create_server((LOOPBACK, 0)) as holder:
        held = holder.getsockname()[1]
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            free = probe.getsockname()[1]
        with pytest.raises(OSError, match=f"listen.1..address {LOOPBACK}:{held}: address already"):
            own_sockets(config(free, held), 2, {})
    with socket.create_server((LOOPBACK, free)):  # nothing of the first address stayed bound
        pass


def test_sockets_handed_down_through_the_environment(monkeypatch) -> None:
    with socket.create_server((LOOPBACK, 0)) as server:
        monkeypatch.setenv(ENV_FDS, fds_env({"127.0.0.1:0": os.dup(server.fileno())})[ENV_FDS])
        handed = handed_sockets()
        assert ENV_FDS not in os.environ
        assert list(handed) == ["127.0.0.1:0"]
        with handed["127.0.0.1:0"] as sock:
            assert sock.getsockname() == server.getsockname()
    assert handed_sockets() == {}


@pytest.mark.parametrize("pid", ["1", "not-a-pid"])
def test_listen_fds_for_another_process_are_ignored_and_not_passed_on(monkeypatch, pid) -> None:
    monkeypatch.setenv("LISTEN_PID", pid)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "http")
    assert systemd_sockets(config(8080)) == {}
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_the_state_to_notify_socket(monkeypatch, tmp_path: Path, abstract) -> None:
    name = f"@upgradeproxy-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:] if abstract else name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        sd_notify("READY=1")
        assert listener.recv(64) == b"READY=1"


def test_sd_notify_without_systemd_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sd_notify("READY=1")  # no socket, no error
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    sd_notify("READY=1")  # a socket that is gone is not an error either
