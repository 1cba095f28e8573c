"""Contract section "Configuration (YAML)": the contract's example runs verbatim, every problem at
every level of the schema is reported with its line, every value form of the schema runs."""

from __future__ import annotations

import re
import signal
import socket
import ssl
from pathlib import Path

import trustme

from tests.support.clients import (
    LOOPBACK,
    free_port,
    http,
    read_response,
    recv_exactly,
    ws_upgrade,
)
from tests.support.configs import write_file
from tests.support.peers import echo_after_switch, respond_ok_forever
from tests.support.processes import CONSOLE, PY_M, run_cli
from tests.support.waiting import WAIT
from tests.support.wire import WS_HEADERS, WS_KEY

CONTRACT_EXAMPLE = """\
listen:                          # one or more listeners
  - address: "127.0.0.1:8080"    # host:port; "[::1]:8080" for IPv6
    tls:                         # optional: terminate TLS here
      cert: certs/proxy.pem
      key: certs/proxy-key.pem
    proxy_protocol: false        # optional: expect a PROXY v1/v2 header from an L4 load balancer
admin:                           # optional: /healthz, /readyz, /metrics (Prometheus text)
  address: "127.0.0.1:9901"
workers: 1                       # optional: processes sharing the listeners (SO_REUSEPORT)
upstreams:
  chat:
    servers: ["127.0.0.1:9000", "127.0.0.1:9001"]   # or {address:, weight:} items
    balance: round_robin         # round_robin | least_conn
    tls: false                   # or {verify: true, ca: FILE, server_name: NAME}
routes:                          # first match wins; no match -> 404
  - host: "chat.example.com"     # optional; "*.example.com" matches one or more labels
    path_prefix: "/ws"           # optional, default "/"
    upstream: chat
    upgrade: ["websocket"]       # Upgrade protocols this route lets through; default ["websocket"];
                                 # [] means none. Any other offered protocol is stripped, and the
                                 # request goes upstream as a plain HTTP request.
timeouts:                        # seconds (numbers) or strings like "250ms", "5s", "1h"
  connect: 5                     # TCP (+TLS) connect to an upstream
  request_header: 10             # client must finish the request head within this
  upstream_response: 60          # upstream must start its response within this
  idle: 75                       # idle keep-alive HTTP connection
  tunnel_idle: 3600              # upgraded tunnel with no bytes either way
  drain: 30                      # grace for open tunnels on shutdown
limits:
  max_request_header_bytes: 16384
  max_connections: 10000         # per worker; beyond it new connections wait in the backlog
trusted_proxies: []              # CIDRs whose X-Forwarded-*/Forwarded headers are kept and extended
"""


def contract_certs(directory: Path) -> trustme.CA:
    """certs/proxy.pem and certs/proxy-key.pem next to the config, as the example names them."""
    ca = trustme.CA()
    cert = ca.issue_cert("chat.example.com")
    (directory / "certs").mkdir(exist_ok=True)
    cert.cert_chain_pems[0].write_to_path(str(directory / "certs" / "proxy.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(directory / "certs" / "proxy.pem"), append=True)
    cert.private_key_pem.write_to_path(str(directory / "certs" / "proxy-key.pem"))
    return ca


def test_contract_example_is_valid_verbatim_and_runs(run_proxy, tmp_path, raw_upstream):
    """The contract's YAML example, as written (the certificate files it names created next to
    it): `check` exits 0, and `run` (its ports moved to free ones) serves a WebSocket over its
    TLS listener and the admin endpoints."""
    ca = contract_certs(tmp_path)
    verbatim = write_file(tmp_path / "contract.yaml", CONTRACT_EXAMPLE)
    result = run_cli("check", "--config", str(verbatim), command=CONSOLE)
    assert result.returncode == 0, result.stdout + result.stderr

    one, two = raw_upstream(echo_after_switch(b"!")), raw_upstream(echo_after_switch(b"!"))
    port, admin = free_port(), free_port()
    moved = (
        CONTRACT_EXAMPLE.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        .replace("127.0.0.1:9901", f"127.0.0.1:{admin}")
        .replace("127.0.0.1:9000", f"127.0.0.1:{one.port}")
        .replace("127.0.0.1:9001", f"127.0.0.1:{two.port}")
    )
    config = write_file(tmp_path / "moved.yaml", moved)
    proc = run_proxy(config)
    assert http(admin, "/healthz")[0] == 200
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def tls_client() -> ssl.SSLSocket:
        raw = socket.create_connection((LOOPBACK, port), timeout=WAIT)
        return context.wrap_socket(raw, server_hostname="chat.example.com")

    with tls_client() as tls:
        buf = ws_upgrade(tls, "/ws/room", host="chat.example.com")
        assert recv_exactly(tls, 1, buf) == b"!"
        tls.sendall(b"over tls")
        assert recv_exactly(tls, 8, buf) == b"over tls"
    with tls_client() as tls:
        tls.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")
        assert read_response(tls)[0] == 404  # no match -> 404
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


# (line, field, a fragment of the why): every level of the schema, all in one file.
NESTED_BAD = """\
listen:
  - address: "127.0.0.1:8080"
    tsl: {}
    proxy_protocol: "yes"
admin:
  adress: "127.0.0.1:9901"
workers: "two"
upstreams:
  chat:
    servers:
      - {address: "127.0.0.1:9000", wieght: 2}
      - address: "127.0.0.1:9001"
        weight: 0
    balance: random
    tls: {verfy: true, server_name: 5}
routes:
  - host: "chat.example.com"
    path_prefx: "/ws"
    upstream: chat
    upgrade: "websocket"
timeouts:
  connect: -1
  idle: "5 minutes"
  tunnel_idel: 3
limits:
  max_request_header_bytes: "big"
  max_conections: 5
trusted_proxies: ["not-a-cidr", "10.0.0.0/33"]
extra_top: 1
"""


NESTED_PROBLEMS = [
    (3, "listen[0].tsl", "'tls'"),
    (4, "listen[0].proxy_protocol", "true or false"),
    (6, "admin.adress", "'address'"),
    (7, "workers", "whole number"),
    (11, "upstreams.chat.servers[0].wieght", "'weight'"),
    (13, "upstreams.chat.servers[1].weight", "0"),
    (14, "upstreams.chat.balance", "round_robin"),
    (15, "upstreams.chat.tls.verfy", "'verify'"),
    (15, "upstreams.chat.tls.server_name", "hostname"),
    (18, "routes[0].path_prefx", "'path_prefix'"),
    (20, "routes[0].upgrade", "list"),
    (22, "timeouts.connect", "-1"),
    (23, "timeouts.idle", "5 minutes"),
    (24, "timeouts.tunnel_idel", "'tunnel_idle'"),
    (26, "limits.max_request_header_bytes", "big"),
    (27, "limits.max_conections", "'max_connections'"),
    (28, "trusted_proxies[0]", "not-a-cidr"),
    (28, "trusted_proxies[1]", "10.0.0.0/33"),
    (29, "extra_top", "unknown"),
]


def test_every_problem_at_every_level_with_its_line(tmp_path):
    """`check` ... print every problem (file, line, field, why) and exit 1. Unknown keys are
    errors (with the nearest valid name suggested), not silently ignored."""
    path = write_file(tmp_path / "bad.yaml", NESTED_BAD)
    result = run_cli("check", "--config", str(path), command=CONSOLE)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    for line, field, why in NESTED_PROBLEMS:
        pattern = rf"^{re.escape(str(path))}:{line}: {re.escape(field)}: .*{re.escape(why)}"
        assert re.search(pattern, out, re.M), f"missing {line}: {field} in:\n{out}"
    assert "Traceback" not in out
    ran = run_cli("run", "--config", str(path), command=PY_M)
    assert ran.returncode == 2
    for line, field, _ in NESTED_PROBLEMS:
        assert f"{path}:{line}: {field}: " in ran.stderr


def test_every_value_form_of_the_schema_runs(run_proxy, tmp_path, raw_upstream):
    """Config forms from the contract: `"[::1]:8080"` for IPv6; servers as `{address:, weight:}`
    items; upstream `tls: {verify: true, ca: FILE, server_name: NAME}`; `"*.example.com"`
    matches one or more labels; `[]` means none (the Upgrade offer is stripped and the request
    goes upstream as plain HTTP); timeouts as numbers or "250ms", "5s", "1h";
    `trusted_proxies` CIDRs whose X-Forwarded-* headers are kept and extended."""
    web = raw_upstream(respond_ok_forever)
    ca = contract_certs(tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "certs" / "ca.pem"))
    port4, port6 = free_port(), free_port(socket.AF_INET6)
    config = write_file(
        tmp_path / "proxy.yaml",
        f"""\
listen:
  - address: "[::1]:{port6}"
  - address: "127.0.0.1:{port4}"
    tls: false
    proxy_protocol: false
upstreams:
  web:
    servers:
      - {{address: "127.0.0.1:{web.port}", weight: 3}}
    balance: least_conn
    tls: false
  secure:
    servers: ["localhost:1", {{address: "127.0.0.1:2", weight: 1}}]
    tls: {{verify: true, ca: certs/ca.pem, server_name: chat.example.com}}
routes:
  - host: "*.example.com"
    upstream: web
    upgrade: []
  - host: "Exact.Test"
    path_prefix: "/ws"
    upstream: web
    upgrade: ["websocket", "h2c", "SPDY/3.1"]
timeouts:
  connect: "250ms"
  request_header: "5s"
  upstream_response: "1h"
  idle: 2.5
  tunnel_idle: "1h30m"
  drain: 1
limits:
  max_request_header_bytes: 8192
  max_connections: 100
trusted_proxies: ["10.0.0.0/8", "fd00::/8", "192.0.2.1", "::1/128"]
""",
    )
    assert run_cli("check", "--config", str(config), command=PY_M).returncode == 0
    proc = run_proxy(config)
    with socket.create_connection(("::1", port6), timeout=WAIT) as sock:
        sock.sendall(
            b"GET /any HTTP/1.1\r\nHost: a.b.example.com\r\n" + WS_HEADERS
            + b"X-Forwarded-For: 203.0.113.7\r\n\r\n"
        )  # fmt: skip
        assert read_response(sock)[0] == 200
    head = web.accept().heads[-1].lower()
    assert b"\r\nupgrade:" not in head  # upgrade: [] strips the offer
    assert b"sec-websocket-key: " + WS_KEY.lower() in head  # end-to-end headers pass
    assert re.search(rb"\r\nx-forwarded-for: 203\.0\.113\.7, ?::1\r\n", head), head
    assert http(("::1", port6), "/any", host="example.com")[0] == 404
    assert http(port4, "/ws/x", host="exact.test")[0] == 200
    assert http(port4, "/other", host="exact.test")[0] == 404
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
