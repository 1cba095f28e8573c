"""Server health as a pure state machine, and the slow-start weight (interface.md rules 10, 11).

A server starts up. While up, `unhealthy_after` failed checks in a row take it down; while
down, `healthy_after` passes in a row bring it back. A result that agrees with the current
state resets the opposite streak, so only an unbroken run of results changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The share a server gets the moment it comes (back) up under slow_start: small, but not zero,
# so a returning server is tried at once and a bad one is found out quickly.
SLOW_START_FLOOR: Final = 0.1


@dataclass(frozen=True, slots=True)
class Health:
    up: bool = True
    streak: int = 0  # consecutive results against the current state


def observe(state: Health, passed: bool, healthy_after: int, unhealthy_after: int) -> Health:
    """The state after one check result."""
    if passed == state.up:
        return Health(state.up, 0)
    streak = state.streak + 1
    if streak >= (healthy_after if passed else unhealthy_after):
        return Health(passed, 0)
    return Health(state.up, streak)


def slow_start_weight(weight: int, since: float, now: float, duration: float) -> float:
    """The weight a server has at `now` when it came (back) up at `since`.

    Linear from `SLOW_START_FLOOR x weight` to `weight` over `duration` seconds, like nginx's
    and HAProxy's `slowstart`; the full weight once the ramp is over (or with no ramp).
    """
    if duration <= 0 or now >= since + duration:
        return weight
    share = max(SLOW_START_FLOOR, (now - since) / duration)
    return weight * share
