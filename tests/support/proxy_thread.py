"""The proxy in-process: a `Proxy` under `trio.run` in a daemon thread, driven from the test."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from tests.support.clients import LOOPBACK
from tests.support.waiting import WAIT
from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Config
from upgradeproxy.service.server import Proxy


class ProxyThread:
    """A `Proxy` running under `trio.run` in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proxy: Proxy | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(WAIT):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            proxy = Proxy(self.config)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                self.proxy = proxy
                self._ready.set()

        try:
            trio.run(run)
        except BaseException as exc:  # surfaced to the test that started us
            self._error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.addresses[0][1]

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://{LOOPBACK}:{self.port}{path}"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a sync function in the proxy's trio thread (e.g. reload, drain)."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def reload(self, config: Config) -> None:
        assert self.proxy is not None
        trio.from_thread.run(self.proxy.reload, config, trio_token=self._token)

    def drain(self) -> None:
        assert self.proxy is not None
        self.call(self.proxy.drain)

    def settle(self) -> None:
        """Return once every task of the proxy is blocked with no I/O ready for it: whatever
        the proxy was going to do with what it has received so far, it has done."""
        assert self._token is not None
        trio.from_thread.run(trio.testing.wait_all_tasks_blocked, trio_token=self._token)

    @property
    def telemetry(self) -> Any:
        assert self.proxy is not None
        return self.proxy.shared.telemetry

    def stop(self, timeout: float = 10) -> None:
        if self.proxy is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self.drain()
        self._thread.join(timeout)

    @property
    def admin_port(self) -> int:
        assert self.proxy is not None
        assert self.proxy.admin_address is not None
        return int(self.proxy.admin_address[1])

    def tunnels_active(self) -> int:
        """Open tunnels as the proxy counts them, read in its own thread."""
        return int(self.call(lambda: self.telemetry.tunnels_active))

    @classmethod
    def from_yaml(cls, text: str) -> ProxyThread:
        return cls(parse_config(text, "test.yaml"))
