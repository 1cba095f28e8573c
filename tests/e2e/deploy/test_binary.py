"""The standalone binary (deploy/binary/build.sh): built once per session from nothing, then run
with no Python on PATH: `--version`, `check`, `demo` (its page and `--selftest`), and `workers: 2`
with a tunnel, merged metrics, SIGHUP reload and SIGTERM drain. And build.sh's bad input: a
missing prerequisite is one line saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.support.clients import LOOPBACK, free_port, http
from tests.support.configs import config_yaml
from tests.support.metrics import scrape, value
from tests.support.processes import ROOT, DemoProcess, run_cli
from tests.support.waiting import WAIT
from upgradeproxy import __version__

BUILD = ROOT / "deploy" / "binary" / "build.sh"
BUILD_TIMEOUT = 600  # seconds; it takes well under a minute here (README, "Standalone binary")


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/upgradeproxy, built afresh into a temporary directory (nothing cached across runs)."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "DIST_DIR": str(out)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"build.sh failed:\n{done.stdout}\n{done.stderr}"
    path = out / "upgradeproxy"
    assert path.is_file()
    assert os.access(path, os.X_OK)
    return path


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds no Python (nor anything else)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    assert shutil.which("python3", path=str(empty)) is None
    return {"PATH": str(empty), "HOME": str(tmp_path), "LANG": "C.UTF-8"}


def run(binary: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, command=[str(binary)], env=env, cwd=ROOT, timeout=60)


# --- one-shot commands ------------------------------------------------------------------


@pytest.mark.slow
def test_binary_version_check_and_selftest_need_no_python(binary, bare_env, tmp_path):
    version = run(binary, bare_env, "--version")
    assert (version.returncode, version.stdout) == (0, f"upgradeproxy {__version__}\n")

    checked = run(binary, bare_env, "check", "--config", "config/upgradeproxy.yaml")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("config/upgradeproxy.yaml: ok")

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: []\nupstreams: {}\nroutes: []\nbogus: 1\n")
    rejected = run(binary, bare_env, "check", "--config", str(bad))
    assert rejected.returncode == 1
    assert f"{bad}:4: bogus" in rejected.stderr
    assert "Traceback" not in rejected.stderr

    selftest = run(binary, bare_env, "demo", "--selftest")
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "selftest ok" in selftest.stdout


@pytest.mark.slow
def test_binary_demo_serves_its_bundled_page(binary, bare_env):
    with DemoProcess(port=str(free_port()), command=[str(binary)], env=bare_env) as demo:
        status, _, page = http(demo.port, "/")
        assert status == 200
        assert page == (files("upgradeproxy.demo") / "static" / "demo.html").read_bytes()
        demo.signal(signal.SIGTERM)
        assert demo.wait_exit() == 0


# --- workers: 2 -------------------------------------------------------------------------


def tunnels_active(admin: int) -> float:
    return value(scrape(admin), "upgradeproxy_tunnels_active")


def two_workers(port: int, admin: int, upstream: int) -> str:
    return config_yaml({"chat": upstream}, listen=port, admin=admin, workers=2,
                       timeouts={"drain": 60})  # fmt: skip


@pytest.mark.slow
def test_binary_two_workers_tunnel_metrics_reload_and_drain(
    run_proxy, binary, bare_env, ws_upstream, tmp_path
):
    """Two workers from the one file: a tunnel through them, every scrape shows both workers'
    totals, SIGHUP reaches both, SIGTERM drains (503, the tunnel lives on) and exits 0."""
    first, second = ws_upstream(), ws_upstream()
    port, admin = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(two_workers(port, admin, first.port))
    proc = run_proxy(config, command=[str(binary)], env=bare_env, workers=2)
    ready = proc.wait_log("worker ready", count=2)
    assert {line["worker"] for line in ready} == {0, 1}

    with connect(f"ws://{LOOPBACK}:{port}/chat", open_timeout=WAIT) as tunnel:
        tunnel.send("through the binary")
        assert tunnel.recv(timeout=WAIT) == "through the binary"
        assert len(first.requests) == 1
        # Multiprocess metrics: whichever worker answers, it reports both workers' totals.
        for _ in range(8):
            assert tunnels_active(admin) == 1

        config.write_text(two_workers(port, admin, second.port))
        proc.signal(signal.SIGHUP)
        assert {line["worker"] for line in proc.wait_log("reloaded", count=2)} == {0, 1}
        with connect(f"ws://{LOOPBACK}:{port}/chat", open_timeout=WAIT) as later:
            later.send("after the reload")
            assert later.recv(timeout=WAIT) == "after the reload"
        assert len(second.requests) == 1

        proc.signal(signal.SIGTERM)
        proc.wait_log("draining", count=3)  # the supervisor and both workers
        assert http(admin, "/readyz")[0] == 503
        tunnel.send("while draining")
        assert tunnel.recv(timeout=WAIT) == "while draining"
    assert proc.wait_exit() == 0
    proc.wait_log("all workers exited")


# --- build.sh's bad input ----------------------------------------------------------------


def _path_without(tmp_path: Path, missing: str) -> str:
    """A PATH with the tools build.sh checks for, `missing` left out."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("uname", "dirname", "ldd", "objdump", "objcopy", "strip", "cc"):
        found = shutil.which(tool)
        if tool != missing and found is not None:
            (tools / tool).symlink_to(found)
    return str(tools)


@pytest.mark.parametrize(
    ("missing", "said"),
    [
        ("cc", "missing: a C compiler (cc; Debian: apt-get install gcc)"),
        ("objdump", "missing: objdump (Debian: apt-get install binutils)"),
        ("ldd", "missing: ldd (Debian: apt-get install libc-bin)"),
        ("strip", "missing: strip (Debian: apt-get install binutils)"),
    ],
)
def test_build_without_a_tool_says_which_in_one_line(tmp_path, missing, said):
    if shutil.which(missing) is None:
        pytest.skip(f"{missing} is not installed here, so there is nothing to take away")
    env = {
        "PATH": _path_without(tmp_path, missing),
        "PYTHON": sys.executable,
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["/bin/bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr == f"deploy/binary/build.sh: {said}\n"


def test_build_without_python_says_so_in_one_line(tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHON": str(tmp_path / "no-python3")}
    done = subprocess.run(
        ["/bin/bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"deploy/binary/build.sh: missing: {tmp_path}/no-python3 (")
    assert done.stderr.count("\n") == 1


@pytest.mark.slow
def test_build_with_a_dependency_pip_cannot_find_says_so_in_one_line(tmp_path):
    env = {
        **os.environ,
        "PYINSTALLER_SPEC": "pyinstaller==0.0.0.dev0",  # no such release
        "DIST_DIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith("deploy/binary/build.sh: pip could not install what the build")
    assert "pyinstaller==0.0.0.dev0" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "upgradeproxy").exists()
