"""Listening sockets a process did not bind itself, and the systemd notification socket.

A listening socket that closes resets every connection still waiting in its queue, so a
restart that drops nothing must keep the *same* sockets open across processes: the previous
generation (or the `workers` supervisor) passes its file descriptors down, named in
$UPGRADEPROXY_FDS as JSON `{"<configured address>": fd}`; systemd socket activation passes
them as $LISTEN_FDS descriptors from 3, matched here to the config by their bound address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Final

import trio

from upgradeproxy.config.model import Address, Config
from upgradeproxy.transport.streams import aclose_quietly

log = logging.getLogger("upgradeproxy.service.sockets")

ENV_FDS: Final = "UPGRADEPROXY_FDS"
LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START
BACKLOG: Final = 4096

Sockets = dict[str, socket.socket]  # configured address (str(Address)) -> listening socket


def fds_env(fds: Mapping[str, int]) -> dict[str, str]:
    """The environment that hands `fds` (address -> descriptor) to a child process."""
    return {ENV_FDS: json.dumps(dict(fds))}


def handed_sockets() -> Sockets:
    """The sockets our parent handed down in $UPGRADEPROXY_FDS (the variable is removed)."""
    text = os.environ.pop(ENV_FDS, None)
    if not text:
        return {}
    found: Sockets = {}
    for address, fd in json.loads(text).items():
        try:
            found[address] = socket.socket(fileno=int(fd))
        except OSError as exc:
            log.warning("handed-down socket unusable: %s", exc, extra={"address": address})
    return found


def systemd_sockets(config: Config) -> Sockets:
    """$LISTEN_FDS sockets (when $LISTEN_PID is us) matched to the config's listeners and
    admin address by bound IP and port. One that matches nothing is logged and closed; a
    configured address that no descriptor matches is bound as usual."""
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)  # children must not take them for theirs
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return {}
    wanted = _resolved(config)
    found: Sockets = {}
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count or 0)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("LISTEN_FDS: not a socket, ignored", extra={"fd": fd, "error": str(exc)})
            continue
        name = _key(sock) if sock.type == socket.SOCK_STREAM else None
        address = wanted.pop(name, None) if name is not None else None
        if address is None:
            log.warning(
                "LISTEN_FDS: socket matches no listener in the config: closed",
                extra={"fd": fd, "bound": str(sock.getsockname())},
            )
            sock.close()
            continue
        log.info("LISTEN_FDS: socket activation", extra={"fd": fd, "address": address})
        found[address] = sock
    return found


def _key(sock: socket.socket) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return ipaddress.ip_address(host), port


def _resolved(config: Config) -> dict[object, str]:
    """(ip, port) -> configured address, for every listener and the admin address."""
    addresses = [listener.address for listener in config.listeners]
    addresses += [config.admin.address] if config.admin else []
    keys: dict[object, str] = {}
    for address in addresses:
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            keys.setdefault((ipaddress.ip_address(info[4][0]), address.port), str(address))
    return keys


def inherited_sockets(config: Config) -> Sockets:
    """Every listening socket this process was given: by its parent first, then by systemd."""
    return {**systemd_sockets(config), **handed_sockets()}


def listening_socket(address: Address, *, reuse_port: bool) -> socket.socket:
    """An unbound TCP socket for `address` with the options every listener sets; SO_REUSEPORT
    lets several sockets (workers, generations) accept on one address."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def cannot_listen(address: Address, exc: OSError) -> OSError:
    """The bare errno text ("Address already in use") does not say which address."""
    return OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}")


async def bind_socket(address: Address, *, reuse_port: bool) -> trio.socket.SocketType:
    """A bound (not yet listening) trio socket for `address`."""
    sock = trio.socket.from_stdlib_socket(listening_socket(address, reuse_port=reuse_port))
    try:
        await sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(address, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listening(address: Address, *, reuse_port: bool) -> socket.socket:
    """A bound, listening stdlib socket (blocking bind: only at start and on SIGUSR2)."""
    sock = listening_socket(address, reuse_port=reuse_port)
    try:
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise cannot_listen(address, exc) from exc
    return sock


def start_error(exc: OSError, field: str, address: Address) -> OSError:
    """`exc` as a start error naming the config field: `admin.address 1.2.3.4:9: ...`."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OSError(exc.errno, f"{field} {address}: {reason[:1].lower()}{reason[1:]}")


def _fields(config: Config) -> dict[str, str]:
    """Configured address -> the field that names it, for start errors."""
    fields = {str(lsn.address): f"listen[{i}].address" for i, lsn in enumerate(config.listeners)}
    if config.admin is not None:
        fields[str(config.admin.address)] = "admin.address"
    return fields


def config_addresses(config: Config) -> list[Address]:
    """Every address the config listens on, the admin one last."""
    return [listener.address for listener in config.listeners] + (
        [config.admin.address] if config.admin else []
    )


def close_all(socks: Iterable[socket.socket | trio.socket.SocketType]) -> None:
    for sock in socks:
        sock.close()


def sd_notify(state: str) -> None:
    """Tell systemd `state` (READY=1, MAINPID=..., STOPPING=1) when $NOTIFY_SOCKET is set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    target = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.connect(target)
        sock.sendall(state.encode())


Owned = dict[str, list[socket.socket]]  # configured address -> its sockets (slot % len picks)


def own_sockets(config: Config, slots: int, given: Sockets, current: Owned | None = None) -> Owned:
    """The `workers` supervisor's sockets for `config`: those it has (`current`), those it was
    given (one, shared by every slot), else `slots` SO_REUSEPORT sockets bound here, so the
    kernel spreads connections over the workers as when each bound its own. All or none.

    The admin address gets one socket shared by every slot: a worker that exits first in a
    drain then takes no socket with it, so a probe never meets a reset in place of a 503.
    """
    current = current or {}
    owned: Owned = {}
    fresh: list[socket.socket] = []
    fields = _fields(config)
    admin = config.admin.address if config.admin else None
    try:
        for address in config_addresses(config):
            key = str(address)
            count = 1 if address == admin else slots
            if key in current:
                owned[key] = current[key]
            elif key in given:
                owned[key] = [given.pop(key)]
            else:
                try:
                    fresh.append(bind_listening(address, reuse_port=True))
                    port = fresh[-1].getsockname()[1]  # port 0: all slots on the one it got
                    for _ in range(count - 1):
                        fresh.append(bind_listening(Address(address.host, port), reuse_port=True))
                except OSError as exc:
                    raise start_error(exc, fields[key], address) from exc
                owned[key] = fresh[-count:]
    except BaseException:
        close_all(fresh)
        raise
    close_all(given.values())  # given for an address the config does not name
    return owned


class Handed:
    """Listening sockets bound by someone else (a previous generation, the supervisor,
    systemd), by configured address: taken instead of binding that address anew."""

    def __init__(self, sockets: Mapping[str, socket.socket] | None = None) -> None:
        self._sockets = dict(sockets or {})

    def take(self, address: Address) -> trio.socket.SocketType | None:
        sock = self._sockets.pop(str(address), None)
        return None if sock is None else trio.socket.from_stdlib_socket(sock)

    def take_listener(self, address: Address, backlog: int) -> trio.SocketListener | None:
        sock = self.take(address)
        if sock is None:
            return None
        sock.listen(backlog)
        return trio.SocketListener(sock)

    def close_rest(self) -> None:
        """Those the config no longer names: closing them is what it asks."""
        for address, sock in self._sockets.items():
            log.info("handed-down socket not in the config: closed", extra={"address": address})
            sock.close()
        self._sockets.clear()


class InFlight:
    """Connections accepted and not yet served, so a stopping server can let them finish: cut,
    a probe would see a reset where it was owed an answer (a 503 while draining)."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = trio.Event()
        self.idle.set()

    def enter(self) -> None:
        if not self.count:
            self.idle = trio.Event()
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()


class StoppableListener(trio.abc.Listener[trio.SocketStream]):
    """A listener that can stop accepting without cancelling the connections it accepted
    (the admin server's, when a new generation takes its socket over or a worker exits).

    Each connection it returns is counted in `busy` until its handler calls `busy.leave()`;
    `closed` is set once it has stopped and closed its copy of the socket.
    """

    def __init__(self, listener: trio.SocketListener, busy: InFlight) -> None:
        self.listener = listener
        self.busy = busy
        self.stopped = False
        self.closed = trio.Event()
        self._accepting: trio.CancelScope | None = None

    async def accept(self) -> trio.SocketStream:
        if not self.stopped:
            # A cancelled accept has accepted nothing: trio's accept is atomic.
            with trio.CancelScope() as self._accepting:
                stream = await self.listener.accept()
                self.busy.enter()  # before the handler exists: a stop waits for it too
                return stream
        # Closed here, not in stop(): closing under a waiting accept would raise in it.
        self.listener.socket.close()  # our copy: the socket stays open in the new generation
        self.closed.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        self.stopped = True
        if self._accepting is not None:
            self._accepting.cancel()

    async def aclose(self) -> None:
        await aclose_quietly(self.listener)
