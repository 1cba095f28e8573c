"""docs/testing.md's index from each contract rule to its tests names files that exist, and
has a row for every numbered rule and every "Operations additions" item of the contract."""

from __future__ import annotations

import re

from tests.docs.blocks import CONTRACT, DOCS, ROOT

INDEX_HEADING = "## Which tests check which rule"


def index_rows() -> list[tuple[str, str]]:
    """(rule, tests) for each row of the index table."""
    text = (DOCS / "testing.md").read_text(encoding="utf-8")
    table = text[text.index(INDEX_HEADING) :].split("\n## ")[0]
    rows = [line.strip().strip("|").split("|") for line in table.splitlines() if line[:2] == "| "]
    return [(rule.strip(), tests.strip()) for rule, tests in rows[1:]]


def contract_rules() -> list[int]:
    return [int(n) for n in re.findall(r"^(\d+)\. \*\*", CONTRACT.read_text(), flags=re.M)]


def operations_items() -> list[str]:
    text = CONTRACT.read_text(encoding="utf-8")
    section = text[text.index("## Operations additions") :].split("\n## ")[0]
    return re.findall(r"^- ", section, flags=re.M)


def test_every_named_test_file_exists() -> None:
    named = [f for _, tests in index_rows() for f in re.findall(r"`([\w/.-]+\.py)`", tests)]
    assert len(named) > 50
    missing = [f for f in named if not (ROOT / "tests" / f).is_file()]
    assert not missing, f"docs/testing.md names test files that do not exist: {missing}"


def test_every_numbered_rule_has_a_row() -> None:
    numbered = {
        int(m[1]): tests for rule, tests in index_rows() if (m := re.match(r"(\d+)\.", rule))
    }
    assert sorted(numbered) == contract_rules()
    for number, tests in numbered.items():
        # A TODO only where the feature's own tests have not landed yet.
        assert tests.startswith("`") or (number >= 16 and tests.startswith("TODO:")), number


def test_every_operations_item_has_a_row() -> None:
    rows = [rule for rule, _ in index_rows() if rule.startswith("Operations:")]
    assert len(rows) == len(operations_items())
