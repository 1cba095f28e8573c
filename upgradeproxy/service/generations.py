"""SIGUSR2 in a lone process (`workers: 1`): a new process takes over the listening sockets.

As nginx's binary upgrade: this process starts `upgradeproxy run` again (the code now on disk)
with its listening sockets (the admin one too) inherited and one end of a socketpair. The new
process says `ready` on it once it accepts; only then does this one retire (stop accepting,
give its tunnels and requests `timeouts.upgrade_grace`, exit). The sockets never close, so no
client is refused or reset. Either side sends `drain` when it gets SIGTERM/SIGINT, so a stop
during the change drains both generations under `timeouts.drain`; EOF means the other exited.

Under systemd the new process reports `MAINPID=<its pid>` (`Type=notify`, `NotifyAccess=all`),
so systemd follows it rather than the old process that is about to exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Final

import trio

from upgradeproxy.service.server import Proxy
from upgradeproxy.service.sockets import fds_env, sd_notify
from upgradeproxy.service.workers import worker_command
from upgradeproxy.transport.streams import STREAM_ERRORS

log = logging.getLogger("upgradeproxy")

READY_TIMEOUT: Final = 60.0  # a new process not accepting by then is killed; we keep serving


@dataclass(frozen=True, slots=True)
class Launch:
    """How this process was started: the new generation is started the same way."""

    path: str
    log_format: str
    access_log: bool

    def argv(self, link_fd: int) -> list[str]:
        return [
            *worker_command(), "run", "--config", self.path,
            "--log-format", self.log_format, "--takeover-fd", str(link_fd),
            *(() if self.access_log else ("--no-access-log",)),
        ]  # fmt: skip


class Link:
    """One end of the socketpair between two generations: one word per line."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buf = b""
        self._sending = trio.Lock()
        self.open = True

    async def send(self, word: bytes) -> None:
        async with self._sending:
            if not self.open:
                return
            try:
                await self._stream.send_all(word + b"\n")
            except STREAM_ERRORS:
                self.open = False

    async def receive(self) -> bytes | None:
        """The next word, or None once the other side is gone."""
        while b"\n" not in self._buf:
            try:
                data = await self._stream.receive_some(64)
            except STREAM_ERRORS:
                data = b""
            if not data:
                self.open = False
                return None
            self._buf += data
        word, self._buf = self._buf.split(b"\n", 1)
        return word

    def close(self) -> None:
        self.open = False
        self._stream.socket.close()


class Generations:
    """This process's links to the generation before it and to the one after it."""

    def __init__(self, proxy: Proxy, launch: Launch | None, previous_fd: int | None) -> None:
        self.proxy = proxy
        self.launch = launch
        self.previous = None if previous_fd is None else Link(socket.socket(fileno=previous_fd))
        self.next: Link | None = None
        self.upgrading = False

    async def started(self) -> None:
        """We accept: the previous generation may retire, and systemd follows our pid."""
        if self.previous is None:
            sd_notify("READY=1")
            return
        await self.previous.send(b"ready")
        sd_notify(f"MAINPID={os.getpid()}\nREADY=1")

    async def follow_previous(self) -> None:
        """Drain when the previous generation is told to stop during the change."""
        assert self.previous is not None
        while (word := await self.previous.receive()) is not None:
            if word == b"drain" and not self.proxy.draining:
                log.info("draining: the previous generation was told to stop")
                self.proxy.drain()
        self.previous.close()  # it exited: its end of the link is all that is left

    async def tell_drain(self) -> None:
        """A SIGTERM/SIGINT here: the generations on either side drain too."""
        for link in (self.previous, self.next):
            if link is not None:
                await link.send(b"drain")

    async def upgrade(self) -> None:
        """SIGUSR2: start the next generation on our sockets; retire once it accepts."""
        if self.upgrading or self.proxy.draining or self.launch is None:
            why = "draining" if self.proxy.draining else "one in progress"
            log.warning("upgrade ignored: %s", why if self.launch else "no config file")
            return
        self.upgrading = True
        ours, theirs = socket.socketpair()
        fds = self.proxy.handover_fds()
        try:
            proc = await trio.lowlevel.open_process(
                self.launch.argv(theirs.fileno()),
                env={**os.environ, **fds_env(fds), **self.proxy.discovery.seed_env()},
                pass_fds=(*fds.values(), theirs.fileno()),
            )
        except OSError as exc:
            log.error("upgrade failed: cannot start a new process: %s", exc)
            ours.close()
            self.upgrading = False
            return
        finally:
            theirs.close()
        link = self.next = Link(ours)
        log.info("upgrade: new process started", extra={"new_pid": proc.pid})
        word = None
        with trio.move_on_after(READY_TIMEOUT):
            word = await link.receive()
        if word != b"ready":
            with contextlib.suppress(OSError):
                proc.kill()
            await proc.wait()
            link.close()
            self.next, self.upgrading = None, False  # before the log: a new SIGUSR2 may follow it
            log.error("upgrade failed: the new process did not start; this one keeps serving",
                      extra={"new_pid": proc.pid})  # fmt: skip
            return
        grace = self.proxy.runtime.config.timeouts.upgrade_grace
        if not self.proxy.draining:  # a stop during the start was passed on already
            extra = {"new_pid": proc.pid, "grace": grace}
            log.info("upgrade: new process accepts; retiring", extra=extra)
            self.proxy.retire(grace)
        while (word := await link.receive()) is not None:
            if word == b"drain":
                self.proxy.cut_to_drain()
        log.warning("upgrade: the new process exited", extra={"new_pid": proc.pid})
