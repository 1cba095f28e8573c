"""Results: what was measured, the targets from issue 5, and the markdown they become."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# Column order; bench.py appends the upgradeproxy variants (`--variant`) it runs.
TARGETS: Final = ["direct", "nginx", "haproxy", "mitmproxy", "upgradeproxy"]


def proxies() -> list[str]:
    return TARGETS[1:]


@dataclass
class Run:
    """One measurement of one target, with CPU% per process role over its window."""

    value: float
    cpu: dict[str, float]
    unit: str = ""
    # The proxy's CPU per operation (µs per handshake, request, round trip or MB), from its
    # CPU seconds over the window divided by the operations completed in it.
    per_op: float | None = None


@dataclass
class Figure:
    """One measured quantity across targets (several runs each)."""

    label: str
    unit: str
    higher_is_better: bool
    runs: dict[str, list[Run]] = field(default_factory=lambda: defaultdict(list))
    note: str = ""

    def median(self, target: str) -> float | None:
        values = [r.value for r in self.runs.get(target, [])]
        return statistics.median(values) if values else None

    def per_op(self, target: str) -> float | None:
        """Median of the runs' proxy CPU per operation."""
        values = [r.per_op for r in self.runs.get(target, []) if r.per_op is not None]
        return statistics.median(values) if values else None

    def cpu(self, target: str) -> dict[str, float]:
        """Mean CPU% per role over the runs of `target`."""
        runs = self.runs.get(target, [])
        roles = sorted({role for r in runs for role in r.cpu})
        return {role: statistics.fmean(r.cpu.get(role, 0.0) for r in runs) for role in roles}


@dataclass
class Goal:
    """A target of issue 5: `ratio` (upgradeproxy vs nginx) compared with `bound`."""

    text: str
    bound: float
    at_least: bool

    def check(self, ratio: float | None) -> str:
        if ratio is None:
            return "n/a"
        ok = ratio >= self.bound if self.at_least else ratio <= self.bound
        return "pass" if ok else "**MISS**"


@dataclass
class Row:
    label: str
    values: dict[str, float | None]
    ratio: float | None
    goal: Goal | None
    fmt: Callable[[float], str]


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_1(x: float) -> str:
    return f"{x:,.1f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def cell(value: float | None, fmt: Callable[[float], str]) -> str:
    return "—" if value is None else fmt(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def present(rows: list[Row]) -> list[str]:
    """The targets with a value in at least one row, in TARGETS order (peers are optional)."""
    return [t for t in TARGETS if any(row.values.get(t) is not None for row in rows)]


def table(rows: list[Row]) -> str:
    names = present(rows)
    out = [
        f"| figure | {' | '.join(names)} | upgradeproxy ÷ nginx | target | result |",
        "|---|" + "---:|" * (len(names) + 1) + "---|---|",
    ]
    for row in rows:
        v = row.values
        out.append(
            f"| {row.label} | {' | '.join(cell(v.get(t), row.fmt) for t in names)} | "
            f"{cell(row.ratio, fmt_ratio)} | "
            f"{row.goal.text if row.goal else ''} | "
            f"{row.goal.check(row.ratio) if row.goal else ''} |"
        )
    return "\n".join(out)


def per_op_table(rows: list[tuple[str, Figure]]) -> str:
    """Proxy CPU per operation for each proxy, and each one's ratio to nginx (lower is less
    CPU). Per operation, not per second: far less sensitive to other load on the machine."""
    names = [t for t in proxies() if any(fig.per_op(t) is not None for _, fig in rows)]
    others = [t for t in names if t != "nginx"]
    out = [
        f"| proxy CPU per operation | {' | '.join(names)} | "
        + " | ".join(f"{t} ÷ nginx" for t in others)
        + " |",
        "|---|" + "---:|" * (len(names) + len(others)),
    ]
    for label, fig in rows:
        values = {t: fig.per_op(t) for t in names}
        ratios = [cell(ratio(values[t], values.get("nginx")), fmt_ratio) for t in others]
        cells = [cell(values[t], fmt_1) for t in names]
        out.append(f"| {label} | {' | '.join(cells + ratios)} |")
    return "\n".join(out)


def cpu_table(figures: list[tuple[str, Figure]]) -> str:
    """CPU% per process role (100% = one core) during each test, averaged over its runs."""
    out = [
        "| test | target | client | upstream | proxy | machine busy | other | steal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, fig in figures:
        for target in fig.runs:
            cpu = dict(fig.cpu(target))
            if "machine" in cpu:
                ours = sum(cpu.get(r, 0.0) for r in ("client", "upstream", "proxy"))
                cpu["other"] = max(0.0, cpu["machine"] - ours)
            cells = [
                "—" if role not in cpu else f"{cpu[role]:.0f}%"
                for role in ("client", "upstream", "proxy", "machine", "other", "steal")
            ]
            out.append(f"| {name} | {target} | {' | '.join(cells)} |")
    return "\n".join(out)


# --- profiles --------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: one entry per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/upgradeproxy/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/upgradeproxy/":
                path = "upgradeproxy/" + path
            break
    return f"{name} ({path})" if path else name


@dataclass
class Profile:
    """py-spy's raw (collapsed) output: `frame;frame;...;leaf COUNT` per line.

    Self time counts the leaf; inclusive time counts every function once per stack it is in.
    """

    samples: int = 0
    own: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    incl: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    files: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @classmethod
    def parse(cls, text: str) -> Profile:
        prof = cls()
        for line in text.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            frames = [_frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            count = int(count_text)
            prof.samples += count
            prof.own[frames[-1]] += count
            prof.files[frames[-1].rpartition(" (")[2].rstrip(")")] += count
            for name in set(frames):
                prof.incl[name] += count
        return prof

    def top_self(self, n: int = 15) -> list[tuple[str, float, float]]:
        """[(function, self share, inclusive share)], largest self share first."""
        ranked = sorted(self.own, key=lambda k: self.own[k], reverse=True)[:n]
        return [(k, self.own[k] / self.samples, self.incl[k] / self.samples) for k in ranked]

    def top_inclusive(self, n: int = 15, below: float = 0.9) -> list[tuple[str, float]]:
        """[(function, inclusive share)], skipping the roots every stack passes through."""
        ranked = sorted(self.incl, key=lambda k: self.incl[k], reverse=True)
        out = [(k, self.incl[k] / self.samples) for k in ranked]
        return [(k, share) for k, share in out if share < below][:n]

    def top_files(self, n: int = 12) -> list[tuple[str, float]]:
        ranked = sorted(self.files, key=lambda k: self.files[k], reverse=True)[:n]
        return [(k, self.files[k] / self.samples) for k in ranked]

    def markdown(self, title: str) -> str:
        if not self.samples:
            return f"#### {title}\n\nno samples"
        lines = [f"#### {title} ({self.samples} samples, busy time only)", ""]
        lines += ["| function, by self time | self | inclusive |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {s:.1%} | {i:.1%} |" for k, s, i in self.top_self()]
        lines += ["", "| function, by inclusive time | inclusive |", "|---|---:|"]
        lines += [f"| `{k}` | {i:.1%} |" for k, i in self.top_inclusive()]
        lines += ["", "| file, by self time | share |", "|---|---:|"]
        lines += [f"| `{k}` | {share:.1%} |" for k, share in self.top_files()]
        return "\n".join(lines)
