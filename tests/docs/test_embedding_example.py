"""The embedding example of the README (and of Getting started), run for real.

The block is written to a file and run as a program beside a `proxy.yaml` (the README's
minimal config, on port 0, pointed at a real `websockets` upstream). Through the proxy it
prints the address of: a plain request and a WebSocket echo; `SIGHUP` with a changed file
(applied), then with a broken one (reported, old config kept); `SIGTERM` with a tunnel open
(the drain lets it finish, refuses new clients, and the program exits 0).
"""

from __future__ import annotations

import ast
import signal
import sys
from pathlib import Path

import pytest
import yaml
from websockets.sync.client import connect as ws_connect

from tests.docs.blocks import ROOT, Block, all_blocks, code_blocks
from tests.support.clients import http, refused
from tests.support.waiting import WAIT, eventually

EXAMPLES = [b for b in all_blocks("python") if b.marker == "run: embedding"]


def test_readme_and_getting_started_show_the_same_example() -> None:
    texts = {b.path.name: b.text for b in EXAMPLES}
    assert set(texts) == {"README.md", "getting-started.md"}
    assert texts["README.md"] == texts["getting-started.md"]


def _config(upstream_port: int, prefix: str = "/ws") -> str:
    """The README's minimal config, on port 0, routed to `upstream_port`."""
    readme = next(b for b in code_blocks(ROOT / "README.md") if b.lang == "yaml")
    config = yaml.safe_load(readme.text)
    config["listen"][0]["address"] = "127.0.0.1:0"
    config["upstreams"]["chat"]["servers"] = [f"127.0.0.1:{upstream_port}"]
    config["routes"][0]["path_prefix"] = prefix
    return yaml.safe_dump(config, sort_keys=False)


def _get(port: int, path: str) -> tuple[int, str, str]:
    status, headers, body = http(port, path)
    return status, headers.get(b"via", b"").decode(), body.decode()


@pytest.mark.parametrize("block", EXAMPLES[:1], ids=lambda b: b.where)
def test_embedding_example_serves_reloads_and_drains(
    block: Block, tmp_path: Path, spawn, ws_upstream
) -> None:
    upstream = ws_upstream(plain="hello\n").port  # and it echoes WebSocket messages
    config = tmp_path / "proxy.yaml"
    config.write_text(_config(upstream))
    (tmp_path / "example.py").write_text(block.text)
    program = spawn([sys.executable, "example.py"], cwd=tmp_path)

    def printed(count: int) -> str:
        """The `count`-th line the example printed, once it has."""
        return program.wait_lines(lambda line: True, count, stdout=True)[count - 1]

    first = printed(1)
    assert first.startswith("listening on "), first
    [(host, port)] = ast.literal_eval(first.removeprefix("listening on "))
    assert (host, port != 0) == ("127.0.0.1", True)

    assert _get(port, "/ws/hello") == (200, "1.1 upgradeproxy", "hello\n")
    with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=WAIT) as ws:
        ws.send("through the embedded proxy")
        assert ws.recv(timeout=WAIT) == "through the embedded proxy"

    config.write_text(_config(upstream, prefix="/chat"))
    program.signal(signal.SIGHUP)
    assert eventually(lambda: _get(port, "/ws/hello")[0] == 404)
    assert _get(port, "/chat/hello")[0] == 200

    config.write_text(_config(upstream, prefix="/ws").replace("path_prefix", "path_prefx"))
    program.signal(signal.SIGHUP)
    problem = printed(2)
    assert problem.startswith("proxy.yaml:"), problem
    assert problem.endswith(
        "routes[0].path_prefx: unknown key 'path_prefx' (did you mean 'path_prefix'?)"
    )
    assert _get(port, "/chat/hello")[0] == 200  # the old config stays

    with ws_connect(f"ws://127.0.0.1:{port}/chat", open_timeout=WAIT) as ws:
        program.signal(signal.SIGTERM)
        assert eventually(lambda: refused(port))
        ws.send("still open while draining")
        assert ws.recv(timeout=WAIT) == "still open while draining"
    assert program.wait_exit(WAIT) == 0
