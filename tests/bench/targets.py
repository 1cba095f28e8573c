"""The processes under test and around them: configs written to a temp dir, then started.

- the WebSocket upstream (upstream_server.py), shared by every target;
- an nginx serving `return 200 "ok"` as the plain-HTTP upstream (its own instance, so the
  nginx under test does not also pay for the upstream's work);
- nginx as a reverse proxy, one worker, configured like upgradeproxy;
- upgradeproxy itself, `workers: 1` (and `workers: 2` for the scaling test);
- the peers (optional, `--peers`): HAProxy (one thread, 64 KiB buffers, keep-alive on both
  sides) and mitmproxy (reverse mode, `websocket=false` so a tunnel is a byte relay; installed
  into its own venv by run.sh, see `mitmdump_binary`).

"direct" is the upstream itself, without a proxy in between.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml
from procs import Managed, Processes, tree, wait_for_port

from tests.support.configs import config_yaml, listener, route

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent.parent
NOFILE: Final = 65536
# The relay buffer both proxies use: nginx's proxy_buffer_size, upgradeproxy's 64 KiB pipes.
RELAY_BUFFER: Final = "64k"


@dataclass
class Target:
    """Where a client connects to reach the WebSocket and HTTP upstreams."""

    name: str
    port: int  # WebSocket paths (/echo, /hs, /sink, /source)
    http_port: int  # /http
    proc: Managed | None  # the proxy process; None for direct


def nginx_binary() -> str:
    # /usr/sbin is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found:
        raise RuntimeError("nginx not found: run tests/bench/run.sh, which installs it")
    return found


def _nginx_main(tmp: Path, name: str) -> str:
    # Temp paths all under `tmp`: nothing from the system nginx config is read or written.
    user = "user root root;\n" if os.geteuid() == 0 else ""  # root's workers must open tmp
    return f"""\
{user}worker_processes 1;
worker_rlimit_nofile {NOFILE};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{
    worker_connections {NOFILE // 2};
}}
"""


def _temp_paths(tmp: Path, name: str) -> str:
    return "\n".join(
        f"    {kind}_temp_path {tmp}/{name}-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def nginx_http_upstream_conf(tmp: Path, port: int) -> str:
    return (
        _nginx_main(tmp, "nginx-http")
        + f"""\
http {{
    access_log off;
{_temp_paths(tmp, "nginx-http")}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "ok";
        }}
    }}
}}
"""
    )


def nginx_proxy_conf(tmp: Path, port: int, ws_port: int, http_port: int) -> str:
    """nginx set up the way the nginx docs proxy WebSocket, with upgradeproxy's settings."""
    proxy = f"""\
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            # upgradeproxy adds these (and Via); make nginx do the same work.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_buffer_size {RELAY_BUFFER};
            proxy_buffers 4 {RELAY_BUFFER};
            proxy_busy_buffers_size 128k;
            # Match upgradeproxy's tunnel_idle: nginx's 60 s default would cut idle tunnels.
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""
    return (
        _nginx_main(tmp, "nginx")
        + f"""\
http {{
    access_log off;
{_temp_paths(tmp, "nginx")}
    # upgradeproxy has no per-connection request cap; nginx's default 1000 would add reconnects.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    # The standard map: "upgrade" when the client offers one, else no Connection header at
    # all, so that plain requests can use the upstream keep-alive pool.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream ws_upstream {{
        server 127.0.0.1:{ws_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream http_upstream {{
        server 127.0.0.1:{http_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://ws_upstream;
{proxy}
        }}
        location /http {{
            proxy_pass http://http_upstream;
{proxy}
        }}
    }}
}}
"""
    )


def upgradeproxy_conf(
    port: int, ws_port: int, http_port: int, workers: int, *, http2: bool = False,
    websocket: str = "",
) -> str:  # fmt: skip
    """`websocket`: a route `websocket` block (rule 18) for the WebSocket route, e.g. "{}"."""
    # No admin listener (nginx has none either); the access log goes to a file.
    block = {"websocket": yaml.safe_load(websocket)} if websocket else {}
    return config_yaml(
        {"ws": ws_port, "http": http_port},
        [route("http", path_prefix="/http"), route("ws", path_prefix="/", **block)],
        listen=listener(port, http2=True) if http2 else port,
        workers=workers,
        timeouts={"idle": 75, "tunnel_idle": 3600, "drain": 1},
        limits={"max_connections": NOFILE // 2},
    )


def start_ws_upstream(procs: Processes, tmp: Path, port: int, workers: int) -> Managed:
    argv = [sys.executable, str(HERE / "upstream_server.py"), "--port", str(port)]
    proc = procs.start("ws-upstream", [*argv, "--procs", str(workers)], tmp / "ws-upstream.log")
    wait_for_port(port, proc)
    return proc


def start_nginx(procs: Processes, tmp: Path, name: str, conf: str, port: int) -> Managed:
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    argv = [nginx_binary(), "-p", str(tmp), "-c", str(path), "-e", str(tmp / f"{name}.error.log")]
    argv += ["-g", "daemon off; master_process on;"]
    proc = procs.start(name, argv, tmp / f"{name}.log")
    wait_for_port(port, proc)
    return proc


@dataclass(frozen=True)
class Variant:
    """upgradeproxy from another venv (a compiled build, another h11), as an extra target."""

    name: str
    python: str
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """`NAME=PYTHON[@VAR=VALUE]`, e.g. `mypyc=/tmp/build/.venv/bin/python@H11_MYPYC=1`."""
        name, _, rest = spec.partition("=")
        python, _, env = rest.partition("@")
        if not name or not python:
            raise ValueError(f"--variant {spec!r}: expected NAME=PYTHON[@VAR=VALUE]")
        pairs = tuple(tuple(e.split("=", 1)) for e in env.split(",") if "=" in e)
        return cls(f"upgradeproxy[{name}]", python, pairs)  # type: ignore[arg-type]

    @property
    def cwd(self) -> Path:
        """PYTHONPATH if the variant sets one (another source tree, same venv), else the
        venv's parent: the source tree a compiled build was made in."""
        env = dict(self.env)
        if "PYTHONPATH" in env:
            return Path(env["PYTHONPATH"])
        return Path(self.python).absolute().parent.parent.parent


def start_upgradeproxy(
    procs: Processes,
    tmp: Path,
    name: str,
    port: int,
    ws_port: int,
    http_port: int,
    workers: int,
    variant: Variant | None = None,
    websocket: str = "",
) -> Managed:
    path = tmp / f"{name}.yaml"
    path.write_text(upgradeproxy_conf(port, ws_port, http_port, workers, websocket=websocket))
    python = variant.python if variant else sys.executable
    argv = [python, "-m", "upgradeproxy", "run", "--config", str(path)]
    # nginx runs with `access_log off`; so does upgradeproxy, for a like-for-like comparison.
    argv += ["--log-format", "json", "--no-access-log"]
    cwd = variant.cwd if variant else REPO
    env = {**os.environ, **dict(variant.env)} if variant else None
    proc = procs.start(name, argv, tmp / f"{name}.log", cwd=cwd, env=env)
    wait_for_port(port, proc)
    return proc


def worker_count(proc: Managed) -> int:
    """Processes in the proxy's tree: `workers: N` shows up as N (or N + a supervisor)."""
    return len(tree(proc.pid))


def workers_ready(proc: Managed) -> int:
    """How many workers a `workers: N` supervisor has reported ready in its JSON log."""
    return sum('"worker ready"' in line for line in proc.process.lines())


# --- the peers: HAProxy and mitmproxy ---------------------------------------------------

# mitmproxy pins many dependencies: run.sh installs it into a venv of its own here, never
# into the project's.
PEER_VENV: Final = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
MITM_VENV: Final = PEER_VENV / "upgradeproxy-bench" / "mitmproxy-venv"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not found:
        raise RuntimeError("haproxy not found: run tests/bench/run.sh, which installs it")
    return found


def mitmdump_binary() -> str:
    found = MITM_VENV / "bin" / "mitmdump"
    if not found.exists():
        raise RuntimeError(f"{found} not found: run tests/bench/run.sh, which installs it")
    return str(found)


def haproxy_conf(tmp: Path, port: int, ws_port: int, http_port: int) -> str:
    """HAProxy doing nginx's work: one thread, 64 KiB buffers, keep-alive on both sides
    (the default http-keep-alive mode; no http-server-close), the same X-Forwarded-* headers,
    no log, nginx's timeouts (75 s keep-alive, 3600 s tunnel)."""
    import resource

    # HAProxy refuses to start when 2 x maxconn fds exceed the hard limit.
    maxconn = min(NOFILE // 2, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2)
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
    tune.bufsize 65536
    pidfile {tmp}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-request 75s
    timeout http-keep-alive 75s
    timeout tunnel 3600s
frontend fe
    bind 127.0.0.1:{port} backlog 4096
    maxconn {maxconn}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    use_backend be_http if {{ path_beg /http }}
    default_backend be_ws
backend be_ws
    http-reuse always
    server ws 127.0.0.1:{ws_port}
backend be_http
    http-reuse always
    server http 127.0.0.1:{http_port}
"""


def start_haproxy(procs: Processes, tmp: Path, port: int, ws_port: int, http_port: int) -> Managed:
    path = tmp / "haproxy.cfg"
    path.write_text(haproxy_conf(tmp, port, ws_port, http_port))
    # -db: foreground, one process (no master-worker), like nginx's single worker.
    proc = procs.start("haproxy", [haproxy_binary(), "-db", "-f", str(path)], tmp / "haproxy.log")
    wait_for_port(port, proc)
    return proc


def start_mitmproxy(
    procs: Processes, tmp: Path, port: int, http_port: int, ws_port: int, http_upstream: int
) -> Managed:
    """mitmdump in reverse mode on two ports (WebSocket paths, /http), one process.

    `websocket=false`: after the 101 mitmproxy relays bytes instead of parsing frames, the
    work upgradeproxy does. No flow is kept or printed (`flow_detail=0`, `-q`).
    """
    argv = [mitmdump_binary(), "-q", "--listen-host", "127.0.0.1"]
    argv += ["--mode", f"reverse:http://127.0.0.1:{ws_port}@{port}"]
    argv += ["--mode", f"reverse:http://127.0.0.1:{http_upstream}@{http_port}"]
    argv += ["--set", "websocket=false", "--set", "flow_detail=0"]
    argv += ["--set", "keep_host_header=true", "--set", f"confdir={tmp}/mitmproxy"]
    proc = procs.start("mitmproxy", argv, tmp / "mitmproxy.log")
    wait_for_port(port, proc, timeout=30.0)
    wait_for_port(http_port, proc, timeout=30.0)
    return proc


def peer_version(name: str) -> str:
    import subprocess

    with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
        if name == "haproxy":
            out = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True)
            return out.stdout.split("\n")[0].split(" - ")[0].strip()
        if name == "mitmproxy":
            out = subprocess.run([mitmdump_binary(), "--version"], capture_output=True, text=True)
            return out.stdout.split("\n")[0].strip()
    return f"{name} (version unknown)"


def nginx_version() -> str:
    import subprocess

    out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")
