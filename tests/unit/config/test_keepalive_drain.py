"""`timeouts.keepalive_drain`: a duration of zero or more (0: idle connections close at once,
a request whose bytes have arrived is still answered)."""

from __future__ import annotations

import pytest

from tests.support.config_text import complete, problems_of
from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Timeouts


def test_default_is_one_second() -> None:
    assert parse_config(complete("")).timeouts.keepalive_drain == 1.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("0", 0.0, id="zero-closes-at-once"),
        pytest.param("'0s'", 0.0, id="zero-with-unit"),
        pytest.param("2", 2.0, id="number"),
        pytest.param("0.5", 0.5, id="fraction"),
        pytest.param("'250ms'", 0.25, id="milliseconds"),
        pytest.param("'1m'", 60.0, id="minutes"),
    ],
)
def test_durations_of_zero_or_more_are_accepted(value: str, seconds: float) -> None:
    timeouts = parse_config(complete(f"timeouts:\n  keepalive_drain: {value}\n")).timeouts
    assert timeouts.keepalive_drain == seconds
    assert timeouts.drain == Timeouts().drain  # the others keep their defaults


@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param("-1", "expected a duration of zero or more, found the number -1", id="neg"),
        pytest.param("'-5s'", "expected a duration of zero or more", id="negative-string"),
        pytest.param("5M", "units are case-sensitive: did you mean '5m'?", id="unit-case"),
        pytest.param("soon", "found the string 'soon'", id="not-a-duration"),
        pytest.param("true", "found the boolean true", id="boolean"),
        pytest.param("", "found nothing (null)", id="null"),
    ],
)
def test_invalid_values_are_problems_with_file_and_line(value: str, why: str) -> None:
    problems = problems_of(complete(f"timeouts:\n  drain: 5\n  keepalive_drain: {value}\n"))
    assert [(p.file, p.field, p.line) for p in problems] == [
        ("proxy.yaml", "timeouts.keepalive_drain", 3)
    ]
    assert why in problems[0].why, problems[0].why


def test_a_misspelt_key_suggests_keepalive_drain() -> None:
    problems = problems_of(complete("timeouts:\n  keepalive_drian: 1\n"))
    assert [p.field for p in problems] == ["timeouts.keepalive_drian"]
    assert "keepalive_drain" in problems[0].why, problems[0].why
