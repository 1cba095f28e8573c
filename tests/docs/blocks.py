"""The fenced code blocks of README.md and docs/, with the marker comment in front of each.

A block's marker is an HTML comment on the line before its fence (blank lines allowed in
between): `<!-- fragment -->`, `<!-- invalid -->`, `<!-- run: embedding -->`. The contract,
docs/interface.md, is verbatim and carries no markers, so it is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONTRACT = DOCS / "interface.md"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<marker>.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every page under docs/ but the verbatim contract."""
    pages = sorted(p for p in DOCS.rglob("*.md") if p != CONTRACT)
    return [ROOT / "README.md", *pages]


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path`, in order, dedented by its fence's indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        blocks.append(
            Block(path, i + 1, opening["lang"], "\n".join(body) + "\n", _marker(lines, i))
        )
        i = end + 1
    return blocks


def all_blocks(*langs: str) -> list[Block]:
    return [b for path in doc_files() for b in code_blocks(path) if b.lang in langs]


def _marker(lines: list[str], fence: int) -> str | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    found = _MARKER.match(lines[j]) if j >= 0 else None
    return found["marker"] if found else None


def write_tls_files(config_text: str, base: Path, ca: trustme.CA) -> None:
    """Create every `*.pem` file a config names under `base`: CAs, and cert/key pairs
    (`X.pem` with `X-key.pem`), so a documented config loads as `run` would load it."""
    names = set(re.findall(r"[\w./-]+\.pem", config_text))
    for name in sorted(names):
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = name.removesuffix(".pem")
        if stem.endswith("-key"):
            continue  # written with its certificate
        if "ca" in Path(stem).name.split("-"):
            ca.cert_pem.write_to_path(str(path))
            continue
        leaf = ca.issue_cert(f"{Path(stem).name}.example.com")
        leaf.cert_chain_pems[0].write_to_path(str(path))
        leaf.private_key_pem.write_to_path(str(base / f"{stem}-key.pem"))
