"""DNS lookups of a discovered upstream's name (interface.md rule 16), with dnspython on trio.

Each query's outcome becomes a plain `Answer` for pool/discovery.py to decide on. Queries go
over UDP and, when an answer comes back truncated, again over TCP (dnspython's stub resolver
does both). Nothing is cached here: every lookup asks the resolver, so a record's TTL neither
delays nor hastens what the proxy sees beyond what the resolver itself caches.

A lookup is bounded by `timeouts.connect` as a whole (every query, SRV targets included); one
resolver attempt gets at most `ATTEMPT_SECONDS` of it, so a silent resolver is passed over for
the next one in time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from upgradeproxy.config.model import Discover
from upgradeproxy.pool.discovery import (
    MAX_SERVERS,
    Answer,
    Lookup,
    SrvRecord,
    failed,
    from_addresses,
    from_srv,
    preferred,
)

log = logging.getLogger("upgradeproxy")

RESOLV_CONF: Final = "/etc/resolv.conf"
ATTEMPT_SECONDS: Final = 2.0  # one try at one resolver (glibc's default is 5 s, twice)
_ADDRESS_TYPES: Final = ("A", "AAAA")


@dataclass(slots=True)
class Asker:
    """A resolver for one `discover` block: its servers, and whether search domains apply."""

    resolver: dns.asyncresolver.Resolver | None
    search: bool
    problem: str = ""  # why there is no resolver (e.g. /etc/resolv.conf names none)


def asker(discover: Discover, lifetime: float, resolv_conf: str = RESOLV_CONF) -> Asker:
    """Explicit `resolvers` (the name taken as written, no search domains), or the system's:
    resolv.conf's nameservers, `search` domains and `ndots`, as a pod needs for `chat-ws` to
    mean `chat-ws.<namespace>.svc.cluster.local`."""
    try:
        if discover.resolvers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(a.host, a.port) for a in discover.resolvers
            ]
        else:
            resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
    except (dns.exception.DNSException, OSError, ValueError) as exc:
        return Asker(None, False, f"no resolver: {exc}")
    resolver.cache = None
    resolver.lifetime = lifetime
    resolver.timeout = min(lifetime, ATTEMPT_SECONDS)
    return Asker(resolver, not discover.resolvers)


async def look_up(discover: Discover, ask: Asker, timeout: float) -> Lookup:
    """One lookup of `discover.name` within `timeout`: never raises but for cancellation."""
    if ask.resolver is None:
        return failed(ask.problem)
    with trio.move_on_after(timeout):
        try:
            if discover.srv:
                return await _srv_lookup(discover.name, ask)
            return from_addresses(await _addresses(ask, discover.name, ask.search), discover.port)
        except Exception as exc:
            # dnspython on a hostile answer: count it and go on, never crash the loop.
            log.exception("lookup of %s failed unexpectedly", discover.name)
            return failed(f"lookup failed: {type(exc).__name__}")
    return failed(f"no answer within {timeout:g}s")


async def _addresses(ask: Asker, name: str, search: bool) -> list[Answer]:
    """The A and the AAAA answers for `name`, asked at once."""
    return await _gather([partial(_query, ask, name, rdtype, search) for rdtype in _ADDRESS_TYPES])


async def _srv_lookup(name: str, ask: Asker) -> Lookup:
    """SRV records, then each target's addresses: from the answer's additional section when it
    has them, else from a lookup of the target (all at once)."""
    extra: dict[str, list[str]] = {}
    answer = await _query(ask, name, "SRV", ask.search, additional=extra)
    if answer.kind != "records":
        return from_srv(answer, {})
    targets = {r.target for r in preferred(answer.srv)}
    given = {t: [Answer("records", tuple(extra[t]))] for t in targets if t in extra}
    missing = sorted(t for t in targets if t not in given)[:MAX_SERVERS]
    found = await _gather([partial(_addresses, ask, f"{t}.", False) for t in missing])
    return from_srv(answer, {**given, **dict(zip(missing, found, strict=True))})


async def _query(
    ask: Asker, name: str, rdtype: str, search: bool, additional: dict[str, list[str]] | None = None
) -> Answer:
    """One question to the resolvers, as an `Answer`; `additional` collects the A/AAAA
    records of the answer's additional section by owner name."""
    assert ask.resolver is not None
    try:
        got = await ask.resolver.resolve(name, rdtype, search=search)
    except dns.resolver.NXDOMAIN:
        return Answer("nxdomain")
    except dns.resolver.NoAnswer:
        return Answer("nodata")
    except dns.resolver.LifetimeTimeout as exc:
        return Answer("error", why=f"{rdtype}: no answer in time ({_short(exc)})")
    except dns.resolver.NoNameservers as exc:
        return Answer("error", why=f"{rdtype}: {_short(exc)}")
    except (dns.exception.DNSException, OSError, ValueError) as exc:
        return Answer("error", why=f"{rdtype}: {type(exc).__name__}: {exc}")
    if got.rrset is None:
        return Answer("nodata")
    if rdtype != "SRV":
        return Answer("records", tuple(sorted({rd.address for rd in got.rrset})))
    if additional is not None:
        additional.update(_glue(got.response))
    # RFC 2782: a target of "." says the service is not offered at this name.
    records = tuple(
        SrvRecord(rd.priority, rd.weight, rd.port, _bare(rd.target))
        for rd in got.rrset
        if rd.target != dns.name.root
    )
    return Answer("records", srv=records) if records else Answer("nodata")


def _glue(response: dns.message.Message) -> dict[str, list[str]]:
    """The A/AAAA records of a response's additional section, by owner name."""
    out: dict[str, list[str]] = {}
    for rrset in response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.setdefault(_bare(rrset.name), []).extend(rd.address for rd in rrset)
    return out


def _bare(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _short(exc: dns.exception.DNSException) -> str:
    """dnspython's message without its repeated preamble."""
    text = str(exc)
    _, sep, rest = text.partition(": ")
    return rest if sep and rest else text


R = TypeVar("R")


async def _gather(calls: Sequence[Callable[[], Awaitable[R]]]) -> list[R]:
    """Run `calls` at once; their results in order."""
    results: dict[int, R] = {}

    async def run(i: int) -> None:
        results[i] = await calls[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(run, i, name=f"dns query {i}")
    return [results[i] for i in range(len(calls))]
