"""`timeouts.drain_delay` and `timeouts.upgrade_grace`: durations where 0 means none."""

from __future__ import annotations

import pytest

from tests.support.config_text import complete, problems_of
from upgradeproxy.config.loader import parse_config
from upgradeproxy.config.model import Timeouts


def test_defaults_are_no_delay_and_an_hour_of_grace() -> None:
    timeouts = parse_config(complete("")).timeouts
    assert (timeouts.drain_delay, timeouts.upgrade_grace) == (0.0, 3600.0)


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("{drain_delay: 0, upgrade_grace: 0}", (0.0, 0.0)),
        ("{drain_delay: '0s', upgrade_grace: '0ms'}", (0.0, 0.0)),
        ("{drain_delay: 15, upgrade_grace: '2h'}", (15.0, 7200.0)),
        ("{drain_delay: '2.5s', upgrade_grace: '1m30s'}", (2.5, 90.0)),
    ],
)
def test_zero_and_positive_durations_are_accepted(
    snippet: str, expected: tuple[float, float]
) -> None:
    timeouts = parse_config(complete(f"timeouts: {snippet}\n")).timeouts
    assert (timeouts.drain_delay, timeouts.upgrade_grace) == expected
    assert timeouts.drain == Timeouts().drain  # the others keep their defaults


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-1", "expected a duration of zero or more, found the number -1"),
        ("-0.5", "expected a duration of zero or more, found the number -0.5"),
        ("'-5s'", "expected a duration of zero or more, found the string '-5s'"),
        ("5M", "units are case-sensitive: did you mean '5m'?"),
        ("5x", "found the string '5x'"),
        ("true", "found the boolean true"),
        ("[5]", "found a list"),
        ("", "found nothing (null)"),
    ],
)
@pytest.mark.parametrize("key", ["drain_delay", "upgrade_grace"])
def test_invalid_values_are_problems_with_file_and_line(key: str, value: str, why: str) -> None:
    problems = problems_of(complete(f"timeouts:\n  {key}: {value}\n"))
    assert [(p.file, p.field, p.line) for p in problems] == [("proxy.yaml", f"timeouts.{key}", 2)]
    assert why in problems[0].why, problems[0].why


def test_other_timeouts_still_must_be_above_zero() -> None:
    problems = problems_of(complete("timeouts:\n  drain: 0\n"))
    assert [p.field for p in problems] == ["timeouts.drain"]
    assert "greater than zero" in problems[0].why
