"""The one process runner: a command in its own session, its output in files read with pread.

`Process` runs any command (the bench's nginx too); `ProxyProcess` is `upgradeproxy run`
(python -m, the console script, or the one-file binary as its `command`, `workers: N`
included) and `DemoProcess` is `upgradeproxy demo`, each ready once its log or banner says
so. stderr (and stdout) go to files, not pipes: nobody has to drain them, and a full pipe
can never stall the process. They are read with pread at an offset of our own, because the
process writes through a descriptor that shares the file offset with ours: a seek would
move where its next line lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from tests.support import procfs
from tests.support.configs import write_file
from tests.support.waiting import WAIT, eventually

PY_M = (sys.executable, "-m", "upgradeproxy")
CONSOLE_SCRIPT = Path(sys.executable).with_name("upgradeproxy")
CONSOLE = (str(CONSOLE_SCRIPT),)
ROOT = Path(__file__).resolve().parents[2]
STARTUP = 20.0  # the bound on a start (a loaded machine, a one-file binary unpacking itself)

Record = dict[str, Any]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without UPGRADEPROXY_CONFIG (a test names its config), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "UPGRADEPROXY_CONFIG"}
    env.update(extra)
    return env


def run_cli(
    *args: str, command: Sequence[str] = PY_M, env: dict[str, str] | None = None,
    timeout: float = 30, cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`upgradeproxy ARGS` to completion, its output captured (a clean environment unless
    `env` is given)."""
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=env if env is not None else clean_env(), stdin=subprocess.DEVNULL, cwd=cwd,
    )  # fmt: skip


class _Output:
    """The lines a process writes to one file, read incrementally with pread."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.lines: list[str] = []
        self._offset = 0
        self._lock = threading.Lock()

    def refresh(self, final: bool = False) -> list[str]:
        """Read what is new; complete lines only, unless the writer is gone (`final`)."""
        with self._lock:
            fd = self.file.fileno()
            data = os.pread(fd, max(0, os.fstat(fd).st_size - self._offset), self._offset)
            end = len(data) if final else data.rfind(b"\n") + 1
            if end:
                self._offset += end
                text = data[:end].decode("utf-8", "replace")
                self.lines += [line.rstrip("\r") for line in text.splitlines()]
            return list(self.lines)


class Process:
    """A command in its own session (process group): stdout and stderr to files; `tty=True`
    gives it a pseudo-terminal as stderr. `log` keeps stderr in that file; `merge_stdout`
    sends stdout there too."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        tty: bool = False, log: Path | None = None, merge_stdout: bool = False, **popen: Any,
    ) -> None:  # fmt: skip
        self.argv = list(argv)
        err: IO[bytes] = log.open("w+b") if log else tempfile.TemporaryFile()  # noqa: SIM115
        out: IO[bytes] = err if merge_stdout else tempfile.TemporaryFile()  # noqa: SIM115
        self._err, self._out = _Output(err), _Output(out)
        master = slave = -1
        if tty:
            master, slave = pty.openpty()
        self._pump: threading.Thread | None = None
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=slave if tty else err,
                env=env if env is not None else clean_env(), cwd=cwd, start_new_session=True,
                **popen,
            )  # fmt: skip
        finally:
            if tty:
                os.close(slave)
        if tty:
            self._pump = threading.Thread(target=self._copy_tty, args=(master,), daemon=True)
            self._pump.start()

    def _copy_tty(self, master: int) -> None:
        """What the process writes to its terminal, into the stderr file (ours to append to)."""
        fd = self._err.file.fileno()
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                break
            os.write(fd, data)
        os.close(master)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def finished(self) -> bool:
        """Exited, with everything it wrote readable: no process of its session (a worker, a
        generation it handed over to) is left to write to the same files."""
        if self.popen.poll() is None or procfs.session(self.pid):
            return False
        if self._pump is not None:
            self._pump.join(WAIT)
        return True

    # --- output ------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """stderr so far, line by line."""
        return self._err.refresh(final=self.finished())

    def text(self) -> str:
        return "\n".join(self.lines())

    def stdout_lines(self) -> list[str]:
        return self._out.refresh(final=self.finished())

    def stdout_text(self) -> str:
        return "\n".join(self.stdout_lines())

    def records(self) -> list[Record]:
        """stderr as JSON log records; a line that is not one is {"msg": line, "not_json": True}."""
        out = []
        for line in self.lines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append(record if isinstance(record, dict) else {"msg": line, "not_json": True})
        return out

    def matching(self, match: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self.records() if match(r)]

    def access(self) -> list[Record]:
        return self.matching(lambda r: r.get("logger") == "upgradeproxy.access")

    def _wait(self, found: Callable[[], list[Any]], count: int, what: str, timeout: float) -> None:
        def enough() -> bool:
            if len(found()) >= count:
                return True
            if self.finished() and len(found()) < count:
                raise AssertionError(f"{what}: the process exited; stderr:\n{self.text()}")
            return False

        if not eventually(enough, timeout):
            raise AssertionError(f"{what} within {timeout} s; stderr:\n{self.text()}")

    def wait_lines(
        self, match: Callable[[str], bool], count: int = 1, timeout: float = WAIT,
        stdout: bool = False,
    ) -> list[str]:  # fmt: skip
        """The first `count` stderr (or stdout) lines that `match`, once there are that many."""
        read = self.stdout_lines if stdout else self.lines

        def found() -> list[str]:
            return [line for line in read() if match(line)]

        self._wait(found, count, f"{count} matching line(s)", timeout)
        return found()[:count]

    def wait_line(self, match: Callable[[str], bool], timeout: float = WAIT) -> str:
        return self.wait_lines(match, 1, timeout)[0]

    def wait_record(
        self, match: Callable[[Record], bool], count: int = 1, timeout: float = WAIT
    ) -> list[Record]:
        """The first `count` log records that `match`, once there are that many."""
        self._wait(lambda: self.matching(match), count, f"{count} matching record(s)", timeout)
        return self.matching(match)[:count]

    def wait_log(self, msg: str, count: int = 1, **fields: object) -> list[Record]:
        """The first `count` records with this `msg` and these field values."""
        return self.wait_record(
            lambda r: r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items()), count
        )

    # --- signals and ends --------------------------------------------------------------

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        code = self.popen.wait(timeout)
        self.finished()
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group (workers too), and reap the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(WAIT)

    def stop(self, grace: float = WAIT, group: bool = False) -> int | None:
        """SIGTERM (to the group with `group`), then SIGKILL whatever is left after `grace`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM) if group else self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill()  # workers can outlive their leader; the group id still names them
        return self.popen.returncode

    def close(self) -> None:
        self.kill()
        for output in (self._err, self._out):
            output.file.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what /proc says ----------------------------------------------------------------

    def rss_bytes(self) -> int:
        return procfs.rss_bytes(self.pid)

    def descriptors(self) -> int:
        return procfs.descriptors(self.pid)

    def cpu_seconds(self) -> float:
        return procfs.cpu_seconds(self.pid)


class ProxyProcess(Process):
    """`[prefix] COMMAND run --config FILE --log-format json EXTRA`; `ready()` waits for it."""

    def __init__(
        self, config: Path, *extra: str, command: Sequence[str] = PY_M,
        prefix: Sequence[str] = (), log_format: str | None = "json", **kwargs: Any,
    ) -> None:  # fmt: skip
        fmt = ("--log-format", log_format) if log_format else ()
        if any(arg.startswith("--log-format") for arg in extra):
            fmt = ()
        super().__init__([*prefix, *command, "run", "--config", str(config), *fmt, *extra],
                         **kwargs)  # fmt: skip
        self.config = config

    def ready(self, workers: int = 1, timeout: float = STARTUP) -> ProxyProcess:
        """Once it logs `listening` (with `workers` > 1: that many `worker ready`)."""
        marker = "worker ready" if workers > 1 else "listening"
        self.wait_lines(lambda line: marker in line, workers, timeout)
        return self

    @property
    def port(self) -> int:
        """The port of its first listener, as its `listening` line says (port 0 resolved)."""
        address = self.wait_log("listening")[0]["addresses"][0]
        return int(address.rsplit(":", 1)[1])

    def rewrite(self, text: str) -> None:
        """Replace the config file atomically, as a deploy tool would."""
        write_file(self.config, text)

    def errors(self) -> list[str]:
        """Log lines at error level or worse, or with a traceback: never expected."""
        bad = re.compile(r'"level": "(error|critical)"|Traceback')
        return [line for line in self.lines() if bad.search(line)]

    # --- generations: after a SIGUSR2 a lone process hands over to a new one -------------

    @property
    def serving_pid(self) -> int:
        """The process that takes signals: ours, or the generation it last handed over to
        (not our child: it logs to our stderr all the same)."""
        for line in reversed(self.lines()):  # the newest handover (a JSON log only)
            if '"upgrade: new process accepts; retiring"' in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    return int(json.loads(line)["new_pid"])
        return self.pid

    def serving(self) -> bool:
        """Whether the serving process (see `serving_pid`) is alive."""
        pid = self.serving_pid
        return self.alive() if pid == self.pid else not procfs.gone(pid)

    def processes(self) -> set[int]:
        """Every live process of this proxy: supervisor, workers, every generation."""
        return procfs.session(self.pid)

    def all_descriptors(self) -> int:
        """Descriptors held by all of `processes()` (one that exits meanwhile counts 0)."""
        total = 0
        for pid in self.processes():
            with contextlib.suppress(OSError):
                total += procfs.descriptors(pid)
        return total

    def reload(self) -> None:
        os.kill(self.serving_pid, signal.SIGHUP)

    def upgrade(self) -> None:
        """SIGUSR2 to the serving process: a new generation takes the sockets over."""
        os.kill(self.serving_pid, signal.SIGUSR2)

    def stop(self, grace: float = WAIT, group: bool = False) -> int | None:
        """As `Process.stop`; after an upgrade the SIGTERM goes to the serving generation and
        the wait is for every process of the proxy."""
        if self.serving_pid != self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.serving_pid, signal.SIGTERM)
            eventually(lambda: not self.processes(), grace)
        return super().stop(grace, group)


class DemoProcess(Process):
    """`COMMAND demo --port PORT --log-format json EXTRA`, ready once its banner is printed:
    stdout is the banner, stderr the JSON log."""

    def __init__(
        self, *extra: str, port: str | None = "0", command: Sequence[str] = PY_M,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        port_args = ("--port", port) if port is not None else ()
        super().__init__([*command, "demo", *port_args, "--log-format", "json", *extra], env=env)
        self.banner = self._wait_banner()
        found = re.search(r"Open\s+(https?://[\w.]+:(\d+)/)", self.banner)
        upstream = re.search(r"built-in upstream 127\.0\.0\.1:(\d+)", self.banner)
        assert found, self.banner
        assert upstream, self.banner
        self.url, self.port = found[1], int(found[2])
        self.upstream_port = int(upstream[1])

    def _wait_banner(self) -> str:
        def printed() -> bool:
            if "Ctrl-C" in self.stdout_text():
                return True
            if self.finished():
                raise AssertionError(f"the demo exited:\n{self.stdout_text()}\n{self.text()}")
            return False

        if not eventually(printed, STARTUP):
            raise AssertionError(f"no banner from the demo:\n{self.stdout_text()}\n{self.text()}")
        return self.stdout_text()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_records(self) -> list[Record]:
        return [r for r in self.records() if "not_json" not in r]

    def tunnel_records(self, path: str = "/ws") -> list[Record]:
        return [r for r in self.log_records() if r.get("msg") == "tunnel" and r["path"] == path]

    def interrupt(self, timeout: float = 15) -> int:
        """SIGINT, as Ctrl-C would; returns the exit code."""
        self.signal(signal.SIGINT)
        return self.wait_exit(timeout)
