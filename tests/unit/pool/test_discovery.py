"""The pure rules of DNS discovery (interface.md rule 16): DNS answers -> a lookup's result and
set, SRV ports and weights, the limit, what a lookup does to the set, and the seed."""

from __future__ import annotations

import pytest

from upgradeproxy.config.model import Address, Server
from upgradeproxy.pool.discovery import (
    MAX_SERVERS,
    Answer,
    Lookup,
    SrvRecord,
    diff,
    from_addresses,
    from_srv,
    next_servers,
    read_seed,
    seed_text,
    spread_deadlines,
    srv_weights,
)


def s(host: str, port: int = 9000, weight: int = 1) -> Server:
    return Server(Address(host, port), weight)


def records(*ips: str) -> Answer:
    return Answer("records", tuple(ips))


NODATA, NXDOMAIN = Answer("nodata"), Answer("nxdomain")
TIMEOUT = Answer("error", why="A: no answer in time")

ADDRESS_LOOKUPS = [
    pytest.param([records("10.0.0.2", "10.0.0.1"), NODATA],
                 Lookup("ok", (s("10.0.0.1"), s("10.0.0.2")), "2 servers"), id="sorted-by-address"),
    pytest.param([records("10.0.0.1"), records("fd00::1")],
                 Lookup("ok", (s("10.0.0.1"), s("fd00::1")), "2 servers"), id="a-and-aaaa"),
    pytest.param([records("fd00::2"), records("10.0.0.9")],
                 Lookup("ok", (s("10.0.0.9"), s("fd00::2")), "2 servers"), id="ipv4-first"),
    pytest.param([records("10.0.0.1", "10.0.0.1"), NODATA],
                 Lookup("ok", (s("10.0.0.1", weight=2),), "1 server"), id="repeat-adds-weight"),
    pytest.param([records("10.0.0.10", "10.0.0.9"), NODATA],
                 Lookup("ok", (s("10.0.0.9"), s("10.0.0.10")), "2 servers"),
                 id="numeric-not-text-order"),
    pytest.param([NXDOMAIN, NXDOMAIN], Lookup("empty", detail="NXDOMAIN"), id="nxdomain"),
    pytest.param([NODATA, NODATA], Lookup("empty", detail="no A/AAAA records"), id="nodata"),
    pytest.param([NODATA, NXDOMAIN], Lookup("empty", detail="no A/AAAA records"), id="mixed"),
    pytest.param([records("10.0.0.1"), TIMEOUT], Lookup("error", detail="A: no answer in time"),
                 id="one-query-failed-fails-all"),
    pytest.param([TIMEOUT, Answer("error", why="AAAA: SERVFAIL")],
                 Lookup("error", detail="A: no answer in time; AAAA: SERVFAIL"), id="both-failed"),
]  # fmt: skip


@pytest.mark.parametrize(("answers", "expected"), ADDRESS_LOOKUPS)
def test_an_a_aaaa_lookup(answers: list[Answer], expected: Lookup) -> None:
    assert from_addresses(answers, 9000) == expected


def test_a_set_larger_than_the_limit_is_cut_to_the_lowest_addresses() -> None:
    ips = [f"10.0.{i // 250}.{i % 250}" for i in range(500)]
    lookup = from_addresses([records(*reversed(ips)), NODATA], 9000)
    assert lookup.result == "ok"
    assert len(lookup.servers) == MAX_SERVERS
    assert lookup.servers == tuple(s(ip) for ip in ips[:MAX_SERVERS])
    assert lookup.warnings == ("500 servers: only the first 256 by address are used",)


def srv(*items: tuple[int, int, int, str]) -> Answer:
    return Answer("records", srv=tuple(SrvRecord(*item) for item in items))


A_TARGETS = {"a.test": [records("10.0.0.1")], "b.test": [records("10.0.0.2"), NODATA]}

SRV_LOOKUPS = [
    pytest.param(srv((0, 3, 9000, "a.test"), (0, 1, 9001, "b.test")), A_TARGETS,
                 Lookup("ok", (s("10.0.0.1", 9000, 3), s("10.0.0.2", 9001, 1)), "2 servers"),
                 id="ports-and-weights"),
    pytest.param(srv((10, 1, 9000, "a.test"), (20, 1, 9001, "b.test")), A_TARGETS,
                 Lookup("ok", (s("10.0.0.1", 9000),), "1 server"), id="lowest-priority-only"),
    pytest.param(srv((0, 1, 9000, "a.test"), (0, 1, 9000, "c.test")),
                 {**A_TARGETS, "c.test": [NXDOMAIN, NXDOMAIN]},
                 Lookup("ok", (s("10.0.0.1", 9000),), "1 server",
                        ("SRV target c.test has no address: left out",)),
                 id="target-without-address"),
    pytest.param(srv((0, 1, 9000, "c.test")), {"c.test": [NODATA, NODATA]},
                 Lookup("empty", detail="no SRV target has an address",
                        warnings=("SRV target c.test has no address: left out",)),
                 id="no-target-has-an-address"),
    pytest.param(srv((0, 1, 9000, "a.test"), (0, 1, 9000, "b.test")),
                 {**A_TARGETS, "b.test": [TIMEOUT]},
                 Lookup("error", detail="target b.test: A: no answer in time"),
                 id="a-target-lookup-failed"),
    pytest.param(srv((0, 1, 9000, "a.test"), (0, 2, 9000, "a.test")), A_TARGETS,
                 Lookup("ok", (s("10.0.0.1", 9000, 3),), "1 server"), id="same-target-twice"),
    pytest.param(NXDOMAIN, {}, Lookup("empty", detail="NXDOMAIN"), id="nxdomain"),
    pytest.param(NODATA, {}, Lookup("empty", detail="no SRV records"), id="nodata"),
    pytest.param(Answer("error", why="SRV: SERVFAIL"), {}, Lookup("error", detail="SRV: SERVFAIL"),
                 id="servfail"),
]  # fmt: skip


@pytest.mark.parametrize(("answer", "targets", "expected"), SRV_LOOKUPS)
def test_an_srv_lookup(answer: Answer, targets: dict[str, list[Answer]], expected: Lookup) -> None:
    assert from_srv(answer, targets) == expected


WEIGHTS = [
    pytest.param([3, 1], [3, 1], id="kept"),
    pytest.param([33, 33, 33], [1, 1, 1], id="common-divisor"),
    pytest.param([60, 30, 10], [6, 3, 1], id="ratios-kept"),
    pytest.param([65535, 1], [100, 1], id="scaled-to-at-most-100"),
    pytest.param([0, 10, 10], [1, 10, 10], id="zero-gets-the-smallest-share"),
    pytest.param([0, 0], [1, 1], id="all-zero-equal"),
]


@pytest.mark.parametrize(("weights", "expected"), WEIGHTS)
def test_srv_weights(weights: list[int], expected: list[int]) -> None:
    assert srv_weights(weights) == expected


OLD = (s("10.0.0.1"), s("10.0.0.2"))
NEW = (s("10.0.0.2"), s("10.0.0.3"))

NEXT = [
    pytest.param(Lookup("ok", NEW), True, NEW, id="ok-replaces"),
    pytest.param(Lookup("empty", detail="NXDOMAIN"), True, (), id="empty-empties"),
    pytest.param(Lookup("error", detail="timeout"), True, OLD, id="error-keeps"),
    pytest.param(Lookup("error", detail="timeout"), False, (), id="error-after-a-new-name"),
    pytest.param(Lookup("ok", NEW), False, NEW, id="ok-after-a-new-name"),
]


@pytest.mark.parametrize(("lookup", "same", "expected"), NEXT)
def test_what_a_lookup_does_to_the_set(lookup: Lookup, same: bool, expected: tuple) -> None:
    assert next_servers(OLD, lookup, same_source=same) == expected


def test_diff() -> None:
    change = diff(OLD, (*NEW, s("10.0.0.1", weight=2)))
    assert change.added == (s("10.0.0.3"), s("10.0.0.1", weight=2))
    assert change.removed == (s("10.0.0.1"),)
    assert not diff(OLD, OLD)


def test_spread_deadlines_are_inside_the_window_and_evenly_spaced() -> None:
    assert spread_deadlines(4, 100.0, 8.0) == [101.0, 103.0, 105.0, 107.0]
    assert spread_deadlines(0, 100.0, 8.0) == []


def test_a_seed_round_trips_and_a_bad_one_is_ignored() -> None:
    source = ("chat.test", 9000, (Address("10.96.0.10", 53),))
    servers = (s("10.0.0.1", weight=2), s("fd00::1"))
    assert read_seed(seed_text({"chat": (source, servers)})) == {"chat": (source, servers)}
    assert read_seed("not json") == {}
    assert read_seed('{"chat": {"source": 1}, "api": []}') == {}
