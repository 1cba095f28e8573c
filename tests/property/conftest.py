"""Hypothesis profiles for the property tests: bounded by default, longer on request.

`HYPOTHESIS_PROFILE=long pytest tests/property` runs each property with many more examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default-run",
    max_examples=150,
    deadline=None,  # a loaded shared machine must not turn a slow example into a failure
    derandomize=True,  # the default run is reproducible; the long profile explores
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default-run"))
