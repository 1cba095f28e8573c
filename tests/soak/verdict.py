"""The soak's tallies and its verdict table."""

from __future__ import annotations

from dataclasses import dataclass, field

MB = 1 << 20
RSS_BOUND = 32 * MB  # what three stalled readers may add to the proxy's RSS


@dataclass
class Tally:
    tunnel_bytes: int = 0
    tunnels: dict[str, int] = field(default_factory=lambda: {"long": 0, "short": 0})
    lost: int = 0  # bytes lost, reordered or altered in a tunnel
    http_ok: int = 0
    http_bytes: int = 0
    wrong_bodies: int = 0
    unexpected: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    chaos: dict[str, int] = field(default_factory=dict)

    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


@dataclass
class Ending:
    """What the soak measured once the traffic stopped."""

    ran: float
    baseline: int  # proxy descriptors before any traffic
    settled: int  # proxy descriptors at the end, idle pooled upstream connections not counted
    fresh: bool  # a new request and a new tunnel were served at the end
    alive: bool
    rss_growth: int | None  # bytes, under the stalled readers
    processes: tuple[int, int] = (1, 1)  # the proxy's processes at the start and at the end


def verdict(t: Tally, end: Ending, pid: int, rss_now: int) -> int:
    """Print the table; 0 and a last line `PASS` only when every check holds."""
    growth = end.rss_growth
    checks = [
        ("bytes lost/reordered in tunnels", t.lost, t.lost == 0),
        ("wrong HTTP bodies", t.wrong_bodies, t.wrong_bodies == 0),
        ("unexpected errors", len(t.unexpected), not t.unexpected),
        ("proxy descriptors vs baseline", f"{end.settled} / {end.baseline}",
         end.settled <= end.baseline),
        ("RSS growth under stalled readers",
         "not measured" if growth is None else f"{growth / MB:.1f} MB",
         growth is not None and growth < RSS_BOUND),
        ("fresh request and tunnel at the end", "served" if end.fresh else "FAILED", end.fresh),
        ("proxy processes at the end / start", "{} / {}".format(*reversed(end.processes)),
         end.processes[1] == end.processes[0]),
        ("proxy alive", end.alive, end.alive),
    ]  # fmt: skip
    print(f"soak: {end.ran:.0f}s against upgradeproxy (pid {pid})")
    print(f"  traffic: {t.tunnels['long']} long + {t.tunnels['short']} short tunnels, "
          f"{t.tunnel_bytes / MB:.1f} MB checked byte for byte; {t.http_ok} HTTP exchanges, "
          f"{t.http_bytes / MB:.1f} MB of bodies")  # fmt: skip
    print("  chaos: " + ", ".join(f"{k} {v}" for k, v in t.chaos.items()))
    if t.expected:
        print("  expected casualties: " + ", ".join(f"{k} {v}" for k, v in t.expected.items()))
    print(f"  proxy RSS {rss_now / MB:.1f} MB at the end")
    print(f"  {'check':<40} {'value':>14}  verdict")
    for name, value, ok in checks:
        print(f"  {name:<40} {value!s:>14}  {'ok' if ok else 'FAIL'}")
    for line in t.unexpected[:20]:
        print(f"  unexpected: {line}")
    passed = all(ok for _, _, ok in checks)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1
