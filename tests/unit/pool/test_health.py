"""pool/health.py: the health state machine (healthy_after, unhealthy_after) and slow start."""

from __future__ import annotations

import pytest

from upgradeproxy.pool.health import SLOW_START_FLOOR, Health, observe, slow_start_weight

UP, DOWN = Health(True, 0), Health(False, 0)

HEALTH = [
    # (state, results, healthy_after, unhealthy_after, expected)
    pytest.param(UP, "f", 2, 3, Health(True, 1), id="one-failure-stays-up"),
    pytest.param(UP, "fff", 2, 3, DOWN, id="three-failures-go-down"),
    pytest.param(UP, "ffpff", 2, 3, Health(True, 2), id="a-pass-breaks-the-streak"),
    pytest.param(UP, "f", 2, 1, DOWN, id="unhealthy-after-1"),
    pytest.param(DOWN, "p", 2, 3, Health(False, 1), id="one-pass-stays-down"),
    pytest.param(DOWN, "pp", 2, 3, UP, id="two-passes-come-up"),
    pytest.param(DOWN, "pfp", 2, 3, Health(False, 1), id="a-failure-breaks-the-pass-streak"),
    pytest.param(UP, "ppp", 2, 3, UP, id="passes-keep-up"),
    pytest.param(DOWN, "fff", 2, 3, DOWN, id="failures-keep-down"),
    pytest.param(UP, "fffpp", 2, 3, UP, id="down-and-back"),
]


@pytest.mark.parametrize(("state", "results", "up_after", "down_after", "expected"), HEALTH)
def test_health_state_machine(
    state: Health, results: str, up_after: int, down_after: int, expected: Health
) -> None:
    for result in results:
        state = observe(state, result == "p", up_after, down_after)
    assert state == expected


def test_servers_start_up() -> None:
    assert Health().up


SLOW_START = [
    # (weight, since, now, duration, expected)
    pytest.param(10, 0.0, 0.0, 30.0, 10 * SLOW_START_FLOOR, id="just-up-floor"),
    pytest.param(10, 0.0, 1.0, 30.0, 10 * SLOW_START_FLOOR, id="below-floor"),
    pytest.param(10, 0.0, 15.0, 30.0, 5.0, id="half-way"),
    pytest.param(10, 0.0, 27.0, 30.0, 9.0, id="nearly-there"),
    pytest.param(10, 0.0, 30.0, 30.0, 10, id="ramp-over"),
    pytest.param(10, 0.0, 99.0, 30.0, 10, id="long-after"),
    pytest.param(4, 100.0, 5.0, 30.0, 4 * SLOW_START_FLOOR, id="clock-before-since"),
    pytest.param(3, 0.0, 0.0, 0.0, 3, id="no-slow-start"),
    pytest.param(3, float("-inf"), 0.0, 30.0, 3, id="never-ramped"),
]


@pytest.mark.parametrize(("weight", "since", "now", "duration", "expected"), SLOW_START)
def test_slow_start_weight(
    weight: int, since: float, now: float, duration: float, expected: float
) -> None:
    assert slow_start_weight(weight, since, now, duration) == pytest.approx(expected)
