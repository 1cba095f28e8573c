"""Servers from DNS answers (interface.md rule 16), decided over plain data.

The resolver loop (upstream/discovery.py) asks DNS and hands each query's outcome here as an
`Answer`; this module turns them into one `Lookup` (a result and a set of servers) and says
what changed. Invariants:
- A lookup is all or nothing: one failed query (no answer in time, SERVFAIL, no resolver
  reachable, a malformed answer) makes the whole lookup an `error`, and the last known set
  stays. Only an authoritative "no such name" or "no such records" empties the set.
- A set is sorted by address and cut at `MAX_SERVERS` (the lowest addresses kept), so every
  worker and every replica that got the same records, in whatever order, builds the same set.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from upgradeproxy.config.model import Address, Server

Result = Literal["ok", "empty", "error"]
AnswerKind = Literal["records", "nodata", "nxdomain", "error"]

# Per upstream: past this, a set is cut (with a warning). Every server costs a health-check
# probe per interval, 160 ring points with balance: hash, and an entry in /upstreams.
MAX_SERVERS: Final = 256
# SRV weights (0-65535) are scaled so that the largest is at most this: a balancer weight
# stands for ring points and round-robin turns, and ratios finer than 1% buy nothing.
MAX_SRV_WEIGHT: Final = 100


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV record (RFC 2782); `target` is a lower-case name without the final dot."""

    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What one DNS query got: its records, an authoritative nothing, or a failure."""

    kind: AnswerKind
    addresses: tuple[str, ...] = ()  # A/AAAA records (IP literals)
    srv: tuple[SrvRecord, ...] = ()
    why: str = ""  # for "error": what failed


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup of a discovered upstream's name: its result and the servers it found."""

    result: Result
    servers: tuple[Server, ...] = ()  # sorted; only meaningful when result == "ok"
    detail: str = ""  # "3 servers", "NXDOMAIN", "timed out after 2s", ...
    warnings: tuple[str, ...] = ()  # a cut set, SRV targets without an address


@dataclass(frozen=True, slots=True)
class Change:
    """How a set of servers changed; a server whose weight changed is in both lists."""

    added: tuple[Server, ...] = ()
    removed: tuple[Server, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def failed(why: str) -> Lookup:
    return Lookup("error", detail=why)


def from_addresses(answers: Sequence[Answer], port: int) -> Lookup:
    """The lookup of an A/AAAA name from its queries' answers (one per record type)."""
    if errors := [a.why for a in answers if a.kind == "error"]:
        return failed("; ".join(errors))
    found = [(ip, port, 1) for answer in answers for ip in answer.addresses]
    if not found:
        nothing = "NXDOMAIN" if all(a.kind == "nxdomain" for a in answers) else "no A/AAAA records"
        return Lookup("empty", detail=nothing)
    return _ok(found)


def from_srv(answer: Answer, targets: Mapping[str, Sequence[Answer]]) -> Lookup:
    """The lookup of an SRV name from its answer and the address answers of its targets.

    Only the records of the lowest priority are used (RFC 2782: the others are for when it
    cannot be reached, which a balancer with health checks handles among its own servers).
    A target with no address is left out with a warning; an error on any target fails all.
    """
    if answer.kind == "error":
        return failed(answer.why)
    records = preferred(answer.srv)
    if not records:
        return Lookup("empty", detail="NXDOMAIN" if answer.kind == "nxdomain" else "no SRV records")
    found: list[tuple[str, int, int]] = []
    warnings: list[str] = []
    weights = srv_weights([r.weight for r in records])
    for record, weight in zip(records, weights, strict=True):
        got = targets.get(record.target, ())
        if errors := [a.why for a in got if a.kind == "error"]:
            return failed(f"target {record.target}: {'; '.join(errors)}")
        ips = [ip for a in got for ip in a.addresses]
        if not ips:
            warnings.append(f"SRV target {record.target} has no address: left out")
        found.extend((ip, record.port, weight) for ip in ips)
    if not found:
        return Lookup("empty", detail="no SRV target has an address", warnings=tuple(warnings))
    lookup = _ok(found)
    return Lookup("ok", lookup.servers, lookup.detail, (*warnings, *lookup.warnings))


def preferred(records: Iterable[SrvRecord]) -> list[SrvRecord]:
    """The records of the lowest priority, at most `MAX_SERVERS` of them (sorted, so the
    same ones are kept everywhere)."""
    records = list(records)
    if not records:
        return []
    best = min(r.priority for r in records)
    ordered = sorted((r for r in records if r.priority == best), key=lambda r: (r.target, r.port))
    return ordered[:MAX_SERVERS]


def srv_weights(weights: Sequence[int]) -> list[int]:
    """Balancer weights for SRV weights: scaled so the largest is at most `MAX_SRV_WEIGHT`,
    then divided by their common divisor (33, 33, 33 -> 1, 1, 1). A weight 0 among others
    gets the smallest share, 1; all zero means equal shares (RFC 2782)."""
    top = max(weights, default=0)
    if top == 0:
        return [1 for _ in weights]
    scale = min(1.0, MAX_SRV_WEIGHT / top)
    scaled = [max(1, round(w * scale)) for w in weights]
    divisor = math.gcd(*scaled)
    return [w // divisor for w in scaled]


def _ok(found: Iterable[tuple[str, int, int]]) -> Lookup:
    """Servers from (ip, port, weight): one per address (weights of repeats added up),
    sorted by address, cut at `MAX_SERVERS`."""
    weights: dict[Address, int] = {}
    for ip, port, weight in found:
        address = Address(_canonical(ip), port)
        weights[address] = weights.get(address, 0) + weight
    ordered = sorted(weights, key=address_order)
    warnings: tuple[str, ...] = ()
    if len(ordered) > MAX_SERVERS:
        warnings = (f"{len(ordered)} servers: only the first {MAX_SERVERS} by address are used",)
        ordered = ordered[:MAX_SERVERS]
    servers = tuple(Server(a, weights[a]) for a in ordered)
    count = f"{len(servers)} server" + ("" if len(servers) == 1 else "s")
    return Lookup("ok", servers, count, warnings)


def _canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def address_order(address: Address) -> tuple[int, bytes, int]:
    """IPv4 before IPv6, then by the address's bytes and the port."""
    ip = ipaddress.ip_address(address.host)
    return (ip.version, ip.packed, address.port)


def next_servers(
    current: tuple[Server, ...], lookup: Lookup, *, same_source: bool = True
) -> tuple[Server, ...]:
    """The set after `lookup`: an error keeps the current set (none when the name or the
    resolvers just changed: another name's servers are not this one's)."""
    if lookup.result == "error":
        return current if same_source else ()
    return lookup.servers if lookup.result == "ok" else ()


def diff(old: Sequence[Server], new: Sequence[Server]) -> Change:
    before, after = set(old), set(new)
    return Change(
        added=tuple(s for s in new if s not in before),
        removed=tuple(s for s in old if s not in after),
    )


def spread_deadlines(count: int, now: float, window: float) -> list[float]:
    """`count` times spread evenly over `window` from `now`: the middle of each of `count`
    equal slices, so none falls at the window's very end (rule 13's spread)."""
    return [now + window * (i + 0.5) / count for i in range(count)]


# --- the set handed to a new generation (SIGUSR2) or a new worker ------------------------

# A new generation of a lone process gets the sets in its environment; the workers of one
# group share a file (the supervisor names it), which each reads at start and rewrites on
# every change, so a worker that starts or is replaced has a set before its first lookup.
SEED_ENV: Final = "UPGRADEPROXY_DISCOVERED"
SEED_FILE_ENV: Final = "UPGRADEPROXY_DISCOVERED_FILE"

Seed = dict[str, tuple[tuple[object, ...], tuple[Server, ...]]]  # upstream -> (source, set)


def seed_text(sets: Mapping[str, tuple[tuple[object, ...], Sequence[Server]]]) -> str:
    """JSON for `read_seed`: per upstream, the discover source and the servers."""
    return json.dumps({
        name: {"source": _source_json(source),
               "servers": [[s.address.host, s.address.port, s.weight] for s in servers]}
        for name, (source, servers) in sets.items()
    })  # fmt: skip


def read_seed(text: str) -> Seed:
    """What `seed_text` wrote; anything malformed is left out (a seed is only a hint)."""
    out: Seed = {}
    try:
        data = json.loads(text)
    except ValueError:
        return out
    if not isinstance(data, dict):
        return out
    for name, entry in data.items():
        try:
            source = _source_from_json(entry["source"])
            servers = tuple(
                Server(Address(_canonical(host), int(port)), int(weight))
                for host, port, weight in entry["servers"][:MAX_SERVERS]
            )
        except (KeyError, TypeError, ValueError):
            continue
        out[name] = (source, tuple(sorted(servers, key=lambda s: address_order(s.address))))
    return out


def _source_json(source: tuple[object, ...]) -> list[object]:
    name, port, resolvers = source
    assert isinstance(resolvers, tuple)
    return [name, port, [[a.host, a.port] for a in resolvers]]


def _source_from_json(value: object) -> tuple[object, ...]:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError("not a source")
    name, port, resolvers = value
    return (str(name), int(port), tuple(Address(str(h), int(p)) for h, p in resolvers))
