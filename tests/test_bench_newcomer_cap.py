"""bench/newcomer_cap_cost.py runs and measures what it says: a capped batch gives the cap."""

from __future__ import annotations

import math

from tests.benches import load_bench


def test_newcomer_cap_cost_bench_gives_the_cap(tmp_path) -> None:
    bench = load_bench("newcomer_cap_cost")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    batch_ms, single_ms, given = bench.one(tmp_path / "a", 20, 20, 0.25, 3)
    assert given == 5 and batch_ms > 0 and single_ms > 0
    _, single_ms, given = bench.one(tmp_path / "b", 20, 20, 1.0, 3)
    assert given == 20 and math.isnan(single_ms)  # nobody waits without a cap
