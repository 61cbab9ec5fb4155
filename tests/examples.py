"""How many examples a property test draws: all of them in the full suite, a fifth in the fast lane.

tests/conftest.py loads a hypothesis profile before any test module is imported: `fast` when the
run deselects the slow tests (`pytest -m "not slow"`, the fast lane), `full` otherwise (the whole
suite, as CI runs it); `GRIDSWARM_HYPOTHESIS_PROFILE=fast|full` overrides the choice. Property
tests name their full-suite count through `examples()`, so the fast lane runs the same properties
on fewer draws and the full suite keeps every one.
"""

from __future__ import annotations

import math
import os

from hypothesis import settings

PROFILE_ENV = "GRIDSWARM_HYPOTHESIS_PROFILE"
PROFILES = ("fast", "full")
FAST_LANE_SHARE = 0.2  # of each test's full-suite examples, in the fast lane
FAST_LANE_MIN_EXAMPLES = 3

settings.register_profile("full")  # hypothesis' defaults; each test names its own count
settings.register_profile("fast", max_examples=20)  # tests without a count: a fifth of 100


def choose_profile(markexpr: str) -> str:
    """The profile for a pytest run with marker expression `markexpr` (`-m`): the environment's
    choice if set, else `fast` when the run leaves out the slow tests."""
    chosen = os.environ.get(PROFILE_ENV, "").strip()
    if chosen:
        if chosen not in PROFILES:
            raise ValueError(f"{PROFILE_ENV} must be one of {PROFILES}, got {chosen!r}")
        return chosen
    return "fast" if "not slow" in " ".join(markexpr.split()) else "full"


def examples(full: int) -> int:
    """`full` in the full suite; in the fast lane a fifth of it, at least 3 (or `full` if less)."""
    if settings.get_current_profile_name() != "fast":
        return full
    return min(full, max(FAST_LANE_MIN_EXAMPLES, math.ceil(full * FAST_LANE_SHARE)))
