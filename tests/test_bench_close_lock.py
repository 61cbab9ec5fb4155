"""bench/close_lock.py: one round of uploads closes, and the close's time under the hub's lock
and outside it are both measured."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benches import load_bench


def test_a_round_closes_and_both_parts_are_timed(tmp_path: Path) -> None:
    spent = load_bench("close_lock").one(tmp_path, 4)
    assert set(spent) == {"locked", "unlocked"}
    for ms in spent.values():
        assert math.isfinite(ms) and ms > 0
