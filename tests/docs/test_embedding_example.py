"""The embedding example of the README (and of Getting started), run for real.

The block is written to a file and run as a program beside a `proxy.yaml` (the README's
minimal config, on port 0, pointed at a real `websockets` upstream). Through the proxy it
prints the address of: a plain request and a WebSocket echo; `SIGHUP` with a changed file
(applied), then with a broken one (reported, old config kept); `SIGTERM` with a tunnel open
(the drain lets it finish, refuses new clients, and the program exits 0).
"""

from __future__ import annotations

import ast
import http.client
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection, serve

from tests.conftest import eventually
from tests.docs.blocks import ROOT, Block, all_blocks, code_blocks

EXAMPLES = [b for b in all_blocks("python") if b.marker == "run: embedding"]
WAIT = 10.0


def test_readme_and_getting_started_show_the_same_example() -> None:
    texts = {b.path.name: b.text for b in EXAMPLES}
    assert set(texts) == {"README.md", "getting-started.md"}
    assert texts["README.md"] == texts["getting-started.md"]


@pytest.fixture
def upstream() -> Iterator[int]:
    """A `websockets` server: echoes on WebSocket, answers plain GETs with 200 'hello'."""

    def answer_plain(connection: ServerConnection, request: Any) -> Any:
        if request.headers.get("Upgrade") is None:
            return connection.respond(HTTPStatus.OK, "hello\n")
        return None

    def echo(connection: ServerConnection) -> None:
        for message in connection:
            connection.send(message)

    with serve(echo, "127.0.0.1", 0, process_request=answer_plain) as server:
        thread = threading.Thread(target=server.serve_forever, name="ws upstream", daemon=True)
        thread.start()
        yield server.socket.getsockname()[1]
        server.shutdown()
        thread.join(WAIT)


def _config(upstream_port: int, prefix: str = "/ws") -> str:
    """The README's minimal config, on port 0, routed to `upstream_port`."""
    readme = next(b for b in code_blocks(ROOT / "README.md") if b.lang == "yaml")
    config = yaml.safe_load(readme.text)
    config["listen"][0]["address"] = "127.0.0.1:0"
    config["upstreams"]["chat"]["servers"] = [f"127.0.0.1:{upstream_port}"]
    config["routes"][0]["path_prefix"] = prefix
    return yaml.safe_dump(config, sort_keys=False)


class Program:
    """The example as a running program; its stdout read line by line with a deadline."""

    def __init__(self, block: Block, cwd: Path) -> None:
        (cwd / "example.py").write_text(block.text)
        self.proc = subprocess.Popen(
            [sys.executable, "example.py"], cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.stdout, selectors.EVENT_READ)

    def line(self) -> str:
        if not self.selector.select(WAIT):
            pytest.fail("the example printed nothing within the deadline")
        return self.stdout.readline().rstrip("\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=WAIT)
        self.selector.close()


def _get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Via") or "", response.read().decode()
    finally:
        conn.close()


def _refused(port: int) -> bool:
    try:
        _get(port, "/ws/hello")
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("block", EXAMPLES[:1], ids=lambda b: b.where)
def test_embedding_example_serves_reloads_and_drains(
    block: Block, tmp_path: Path, upstream: int
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(_config(upstream))
    program = Program(block, tmp_path)
    try:
        first = program.line()
        assert first.startswith("listening on "), first
        [(host, port)] = ast.literal_eval(first.removeprefix("listening on "))
        assert (host, port != 0) == ("127.0.0.1", True)

        assert _get(port, "/ws/hello") == (200, "1.1 upgradeproxy", "hello\n")
        with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=WAIT) as ws:
            ws.send("through the embedded proxy")
            assert ws.recv(timeout=WAIT) == "through the embedded proxy"

        config.write_text(_config(upstream, prefix="/chat"))
        program.proc.send_signal(signal.SIGHUP)
        assert eventually(lambda: _get(port, "/ws/hello")[0] == 404)
        assert _get(port, "/chat/hello")[0] == 200

        config.write_text(_config(upstream, prefix="/ws").replace("path_prefix", "path_prefx"))
        program.proc.send_signal(signal.SIGHUP)
        problem = program.line()
        assert problem.startswith("proxy.yaml:"), problem
        assert problem.endswith(
            "routes[0].path_prefx: unknown key 'path_prefx' (did you mean 'path_prefix'?)"
        )
        assert _get(port, "/chat/hello")[0] == 200  # the old config stays

        with ws_connect(f"ws://127.0.0.1:{port}/chat", open_timeout=WAIT) as ws:
            program.proc.send_signal(signal.SIGTERM)
            assert eventually(lambda: _refused(port))
            ws.send("still open while draining")
            assert ws.recv(timeout=WAIT) == "still open while draining"
        assert program.proc.wait(WAIT) == 0
    finally:
        program.stop()
