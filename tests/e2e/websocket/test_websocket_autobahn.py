"""Rule 18 against the Autobahn|Testsuite: the same verdicts through a route with a generous
`websocket` block as without the proxy, in both directions.

The runner is kosoku (PyPI), which drives Autobahn's own Python case files from a Rust core
under Python 3 (the `autobahntestsuite` package itself needs Python 2). Two runs each:

* fuzzingclient: kosoku plays a (often broken) client against a `websockets` echo server,
  directly and through the proxy: the proxy reads the fuzzed client frames;
* fuzzingserver: a `websockets` client runs each case against kosoku's fuzzing server,
  directly and through the proxy: the proxy reads the fuzzed server frames.

Autobahn's verdict on a case is OK, NON-STRICT, INFORMATIONAL (all passing), or a failure.
Where a proxied case and its direct twin differ only between passing verdicts (which cases
like 3.3 do from run to run, by the timing of an echo against a connection failure), they
count as the same; a pass on one side and a failure on the other never does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import free_port
from tests.support.configs import config_yaml, route
from tests.support.peers import WsUpstream
from tests.support.processes import ProxyProcess

kosoku = pytest.importorskip("kosoku")

pytestmark = pytest.mark.slow

# Framing, pings, reserved bits, opcodes, fragmentation, UTF-8, closing, limits and
# performance (9.x: messages and frames up to 16 MiB), auto-fragmentation, and the small
# permessage-deflate cases (12.1, 13.1: RSV1 on compressed frames). The rest of 12/13 repeat
# those with bigger messages and run for minutes.
CLIENT_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.1.*", "13.1.*"]
SERVER_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]
GENEROUS = {"max_message_bytes": 1 << 27, "max_frame_bytes": 1 << 27,
            "messages_per_second": 100_000}  # fmt: skip
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}

Verdicts = dict[str, tuple[str, str]]


def verdicts(results: list[Any]) -> Verdicts:
    return {r.case_id: (r.behavior.value, r.behavior_close.value) for r in results}


def compare(direct: Verdicts, proxied: Verdicts) -> list[str]:
    """The cases whose verdicts differ, beyond a move between passing verdicts."""
    assert direct.keys() == proxied.keys()
    differ = []
    for case, want in direct.items():
        got = proxied[case]
        if got != want and not (set(got) <= PASSING and set(want) <= PASSING):
            differ.append(f"{case}: direct {want}, through the proxy {got}")
    return differ


@contextlib.contextmanager
def proxy_to(port: int, tmp: Path) -> Iterator[int]:
    """A proxy process in front of 127.0.0.1:`port`; yields its own port."""
    listen = free_port()
    config = tmp / f"proxy-{port}.yaml"
    config.write_text(
        config_yaml({"fuzz": port}, [route("fuzz", websocket=GENEROUS)], listen=listen)
    )
    proc = ProxyProcess(config)
    try:
        proc.ready()
        yield listen
        problems = [r for r in proc.records() if r.get("level") not in ("info", "debug")]
        assert not problems, problems
    finally:
        proc.close()


async def _echo(ws: Any) -> None:
    with contextlib.suppress(Exception):  # the fuzzer breaks connections on purpose
        async for message in ws:
            await ws.send(message)


async def _fuzzingclient(port: int) -> Verdicts:
    try:
        results = await kosoku.run_fuzzingclient(
            f"ws://127.0.0.1:{port}", CLIENT_CASES, concurrency=4
        )
    except kosoku.FailureError as failed:  # some cases fail direct too: compare, not judge
        results = failed.results
    return verdicts(results)


def test_fuzzing_client_same_verdicts_direct_and_through_the_proxy(tmp_path: Path) -> None:
    upstream = WsUpstream(_echo)  # permessage-deflate on, as the library's default
    try:
        direct = asyncio.run(_fuzzingclient(upstream.port))
        with proxy_to(upstream.port, tmp_path) as port:
            proxied = asyncio.run(_fuzzingclient(port))
    finally:
        upstream.close()
    assert len(direct) > 300
    assert not compare(direct, proxied)


async def _autobahn_client(base: str) -> None:
    """What Autobahn asks of a client under test: echo every message of every case."""
    async with connect(f"{base}/getCaseCount") as ws:
        count = int(await ws.recv())
    for case in range(1, count + 1):
        with contextlib.suppress(Exception):
            async with connect(f"{base}/runCase?case={case}&agent=upx", max_size=None) as ws:
                async for message in ws:
                    await ws.send(message)
    async with connect(f"{base}/updateReports?agent=upx"):
        pass


async def _fuzzingserver(tmp: Path, through_proxy: bool) -> Verdicts:
    async with kosoku.run_fuzzingserver(SERVER_CASES, port=0) as server:
        with contextlib.ExitStack() as stack:
            port = server.port
            if through_proxy:
                port = stack.enter_context(proxy_to(server.port, tmp))
            await _autobahn_client(f"ws://127.0.0.1:{port}")
            try:
                results = await asyncio.wait_for(server.get_result(), timeout=120)
            except kosoku.FailureError as failed:
                results = failed.results
    return verdicts(results)


def test_fuzzing_server_same_verdicts_direct_and_through_the_proxy(tmp_path: Path) -> None:
    direct = asyncio.run(_fuzzingserver(tmp_path, through_proxy=False))
    proxied = asyncio.run(_fuzzingserver(tmp_path, through_proxy=True))
    assert len(direct) > 200
    assert not compare(direct, proxied)
