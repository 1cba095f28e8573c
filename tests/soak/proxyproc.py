"""A real `upgradeproxy run` subprocess and what /proc says about it (RSS, descriptors, CPU).

Shared by the soak (tests/soak/soak.py) and the fault tests (tests/e2e/test_faults.py). After
a SIGUSR2 a lone process (`workers: 1`) hands over to a new one (a new pid, not our child):
signals then go to the process serving now, and `processes()` finds every generation by the
config file in its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ProxyProcess:
    """`upgradeproxy run --config FILE`, optionally behind a wrapper like `prlimit`."""

    def __init__(self, config_yaml: str, port: int, wrapper: tuple[str, ...] = ()) -> None:
        self.port = port
        self._dir = tempfile.TemporaryDirectory(prefix="upx-")
        self.config = Path(self._dir.name) / "upgradeproxy.yaml"
        self.config.write_text(config_yaml)
        self.log: list[str] = []
        self.serving_pid = 0  # the process that takes signals: ours, or the one it handed over to
        env = {k: v for k, v in os.environ.items() if k != "UPGRADEPROXY_CONFIG"}
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "upgradeproxy", "run", "--config", str(self.config),
             "--log-format", "json", "--no-access-log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(ROOT),
        )  # fmt: skip
        self.serving_pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("proxy did not start:\n" + "\n".join(self.log[-20:]))
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            if '"upgrade: new process accepts; retiring"' in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.serving_pid = int(json.loads(line)["new_pid"])

    def _accepts(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self.serving_pid == self.proc.pid:
            return self.proc.poll() is None
        return self.serving_pid in self.processes()

    def rss_bytes(self, pid: int | None = None) -> int:
        for line in Path(f"/proc/{pid or self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def descriptors(self, pid: int | None = None) -> int:
        return len(os.listdir(f"/proc/{pid or self.pid}/fd"))

    def processes(self) -> set[int]:
        """Every live process of this proxy: supervisor, workers, every generation."""
        wanted = str(self.config).encode()
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if wanted in cmdline.split(b"\0") and state != "Z":
                    found.add(int(entry))
        return found

    def all_descriptors(self) -> int:
        """Descriptors held by all of `processes()` (one that exits meanwhile counts 0)."""
        total = 0
        for pid in self.processes():
            with contextlib.suppress(OSError):
                total += self.descriptors(pid)
        return total

    def upgrade(self) -> None:
        """SIGUSR2 to the serving process: a new generation takes the sockets over."""
        os.kill(self.serving_pid, signal.SIGUSR2)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reload(self) -> None:
        os.kill(self.serving_pid, signal.SIGHUP)

    def errors(self) -> list[str]:
        """Log lines at ERROR level or with a traceback: never expected."""
        return [ln for ln in self.log if '"level": "error"' in ln.lower() or "Traceback" in ln
                or '"level": "critical"' in ln.lower()]  # fmt: skip

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM to the serving process; every generation gone within `timeout` (or killed);
        the exit code of the process we started."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.serving_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._reader.join(5)
        with contextlib.suppress(OSError):
            self._dir.cleanup()
        return self.proc.returncode


def config_yaml(port: int, upstreams: dict[str, list[int]], routes: str, extra: str = "") -> str:
    """A config listening on `port` with the given upstreams (name -> ports) and routes."""
    lines = []
    for name, ports in upstreams.items():
        servers = ", ".join(f'"{LOOPBACK}:{p}"' for p in ports)
        lines.append(f"  {name}:\n    servers: [{servers}]")
    ups = "\n".join(lines)
    return (
        f'listen:\n  - address: "{LOOPBACK}:{port}"\nupstreams:\n{ups}\nroutes:\n{routes}\n{extra}'
    )
