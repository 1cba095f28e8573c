"""docs/configuration.md cannot drift from the loader and the config model.

The keys each mapping accepts are recorded from the loader itself (every `Checker.mapping`
call while it reads the page's full example), so a key added to the loader and not to the
page, or documented and not accepted, fails here; each documented default is compared with
the model's dataclass default; every key row has its anchor for links.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

import pytest
import trustme
import yaml

from tests.docs.blocks import DOCS, code_blocks, write_tls_files
from upgradeproxy.config import loader, model, values
from upgradeproxy.config.checker import Checker
from upgradeproxy.config.pool import POOL_KEYS

PAGE = DOCS / "configuration.md"
_HEADING = re.compile(r"^#{2,3} (?P<title>.+?) \{#(?P<id>[a-z0-9-]+)\}\s*$")
_ID = re.compile(r'id="([^"]+)"|\{#([a-z0-9-]+)\}')
# Each documented section, and the dataclass its keys become (YAML key -> field where they differ).
MODELS: dict[str, tuple[type, dict[str, str]]] = {
    "": (model.Config, {"listen": "listeners"}),
    "listen[]": (model.Listener, {}),
    "listen[].tls": (model.ListenerTls, {}),
    "listen[].tls.certificates[]": (model.TlsCertificate, {}),
    "admin": (model.Admin, {}),
    "upstreams.NAME": (model.Upstream, {}),
    "upstreams.NAME.servers[]": (model.Server, {}),
    "upstreams.NAME.tls": (model.UpstreamTls, {}),
    "upstreams.NAME.health_check": (model.HealthCheck, {}),
    "upstreams.NAME.discover": (model.Discover, {}),
    "routes[]": (model.Route, {}),
    "routes[].websocket": (model.WebSocketLimits, {}),
    "timeouts": (model.Timeouts, {}),
    "limits": (model.Limits, {}),
    "access_log": (model.AccessLog, {}),
}


@dataclasses.dataclass
class Row:
    section: str
    section_id: str
    key: str
    default: str
    ids: list[str]


def documented() -> list[Row]:
    """The key rows of every section table on the page."""
    rows: list[Row] = []
    section = section_id = None
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if heading := _HEADING.match(line):
            title = heading["title"].strip("`")
            section, section_id = ("" if title == "Top level" else title), heading["id"]
        elif line.startswith("## "):
            section = section_id = None
        elif section is not None and section_id and line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = re.search(r"`([a-z_][a-z0-9_]*)`", cells[0])  # `http2` has a digit
            if key and len(cells) == 4:
                ids = [a or b for a, b in _ID.findall(cells[0])]
                rows.append(Row(section, section_id, key[1], cells[2], ids))
    return rows


def _normalise(field: str) -> str:
    field = re.sub(r"\[\d+\]", "[]", field)
    parts = field.split(".")
    if parts[0] == "upstreams" and len(parts) > 1:
        parts[1] = "NAME"
    return ".".join(parts)


@pytest.fixture(scope="module")
def accepted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Section -> keys the loader accepts there, recorded while it reads the full example."""
    full = [b for b in code_blocks(PAGE) if b.lang == "yaml" and b.marker is None]
    assert len(full) == 1, "configuration.md has one complete example: the full one"
    base = tmp_path_factory.mktemp("reference")
    write_tls_files(full[0].text, base, trustme.CA())
    seen: dict[str, set[str]] = defaultdict(set)
    used: dict[str, set[str]] = defaultdict(set)
    original = Checker.mapping

    def recording(self: Checker, node: Any, field: str, allowed: Any, *args: Any, **kw: Any) -> Any:
        found = original(self, node, field, allowed, *args, **kw)
        if found is not None:
            seen[_normalise(field)].update(allowed)
            used[_normalise(field)].update(found)
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checker, "mapping", recording)
        loader.parse_config(full[0].text, "full example", base_dir=str(base))
    seen["used"] = {f"{section}:{key}" for section, keys in used.items() for key in keys}
    return seen


def test_the_recording_sees_the_loaders_own_lists(accepted: dict[str, set[str]]) -> None:
    assert accepted[""] == set(loader._TOP_KEYS)
    assert set(POOL_KEYS) <= accepted["upstreams.NAME"]


def test_every_section_the_loader_reads_is_documented(accepted: dict[str, set[str]]) -> None:
    sections = {row.section for row in documented()}
    read = set(accepted) - {"used"}
    assert not read - sections, "add these sections (and the full example's use of them)"
    assert not sections - read, "the full example does not reach these documented sections"
    assert sections == set(MODELS), "map each section to its dataclass in MODELS"


def test_every_accepted_key_is_documented_and_every_documented_key_accepted(
    accepted: dict[str, set[str]],
) -> None:
    by_section: dict[str, set[str]] = defaultdict(set)
    for row in documented():
        by_section[row.section].add(row.key)
    for section, keys in by_section.items():
        missing, extra = accepted[section] - keys, keys - accepted[section]
        assert not missing, f"{section or 'top level'}: undocumented keys {sorted(missing)}"
        assert not extra, f"{section or 'top level'}: keys the loader refuses {sorted(extra)}"


def test_the_full_example_uses_every_key(accepted: dict[str, set[str]]) -> None:
    unused = {f"{row.section}:{row.key}" for row in documented()} - accepted["used"]
    assert not unused


def test_every_key_row_has_its_anchor() -> None:
    page = PAGE.read_text(encoding="utf-8")
    ids = {a or b for a, b in _ID.findall(page)}
    for row in documented():
        slug = row.key.replace("_", "-")
        anchor = f"{row.section_id}-{slug}" if row.section else slug
        assert anchor in ids, f"no anchor #{anchor} for {row.section or 'top level'}.{row.key}"


@pytest.mark.parametrize("row", documented(), ids=lambda r: f"{r.section or 'top'}.{r.key}")
def test_documented_default_is_the_models(row: Row) -> None:
    cls, renamed = MODELS[row.section]
    field = {f.name: f for f in dataclasses.fields(cls)}[renamed.get(row.key, row.key)]
    if field.default is not dataclasses.MISSING:
        default: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = dataclasses.MISSING
    text = row.default
    if text.startswith("required"):
        assert default is dataclasses.MISSING, f"{row.key} has a default: {default!r}"
    elif text.startswith("none"):
        assert default in (None, 0, ()), f"{row.key}: {default!r}"
        assert default is not False, f"{row.key}: write the default `false`"
    elif text.startswith("see "):
        assert dataclasses.is_dataclass(default), f"{row.key}: {default!r}"
        assert f"(#{row.key.replace('_', '-')})" in text, f"{row.key}: link its section"
    else:
        written = re.match(r"`([^`]+)`", text)
        assert written, f"{row.key}: a default is required, none, see ..., or `a value`"
        assert _as_model(yaml.safe_load(written[1]), default) == default


def _as_model(value: Any, default: Any) -> Any:
    """A documented YAML value in the model's terms: durations in seconds, lists as tuples."""
    if isinstance(default, float):
        return values.parse_duration(value)
    if isinstance(default, tuple):
        return tuple(value)
    return value
