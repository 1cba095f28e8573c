"""Restarts that drop nothing (contract "Operations additions"): `timeouts.drain_delay`,
SIGUSR2 generations on handed-over listening sockets, systemd socket activation.

Real processes on loopback: `python -m upgradeproxy run` signalled with `os.kill`.
"""

from __future__ import annotations

import signal

from tests.conftest import eventually, free_port, refused, respond_ok_forever
from tests.e2e import test_operations
from tests.e2e.test_operations import WAIT, http, proxy_config

start = test_operations.start  # the fixture: `start(config_text, workers=1)`

# --- drain_delay -------------------------------------------------------------------------


def test_drain_delay_keeps_accepting_while_readyz_is_503(start, raw_upstream):
    """From SIGTERM /readyz is 503 at once, yet a new client is served until the delay ends;
    then the listener refuses, and the drain finishes as usual (exit 0)."""
    web = raw_upstream(respond_ok_forever)
    port, admin = free_port(), free_port()
    proc = start(
        proxy_config(
            [port], {"web": web.port}, [("/", "web")], admin=admin,
            extra="timeouts: {drain_delay: 3}",
        )
    )  # fmt: skip
    assert http(admin, "/readyz")[0] == 200
    proc.kill(signal.SIGTERM)
    assert eventually(lambda: http(admin, "/readyz")[0] == 503)
    status, _, body = http(port, "/during-the-delay")
    assert (status, body) == (200, b"ok")
    assert not refused(port)
    proc.wait_log("drain: accepting for drain_delay", seconds=3)
    assert eventually(lambda: refused(port), timeout=WAIT)
    assert proc.wait_exit() == 0
