"""The one way a test waits for something that happens in another thread or process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

WAIT = 10.0  # the bound on every wait; tests pass in a fraction of it
_FIRST_POLL = 0.002
_LAST_POLL = 0.05
T = TypeVar("T")


def eventually(predicate: Callable[[], object], timeout: float = WAIT) -> bool:
    """Poll `predicate` until it is truthy or `timeout` passes; whether it held.

    A predicate that raises ends the wait with its exception (e.g. a process that exited).
    """
    deadline = time.monotonic() + timeout
    pause = _FIRST_POLL
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(pause)  # a poll interval, not a synchronisation: the predicate decides
        pause = min(pause * 2, _LAST_POLL)
    return True


def steady(sample: Callable[[], T], quiet: float = 0.5, timeout: float = WAIT) -> T:
    """`sample()` once it has not changed for `quiet` seconds.

    For a check that something stalls (a writer held back by a reader that does not read),
    where no event marks the stall: the stall is what is measured.
    """
    value, since = sample(), time.monotonic()

    def unchanged() -> bool:
        nonlocal value, since
        now = sample()
        if now != value:
            value, since = now, time.monotonic()
        return time.monotonic() - since >= quiet

    if not eventually(unchanged, timeout):
        raise AssertionError(f"still changing after {timeout} s: {value!r}")
    return value
