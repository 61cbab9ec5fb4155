"""bench/close_memory.py: both ways of aggregating a round give the same bits, and each side's
peak memory above its payloads is measured (from /proc, after resetting the peak)."""

from __future__ import annotations

import math

from tests.benches import load_bench


def test_both_ways_agree_and_are_measured() -> None:
    bench = load_bench("close_memory")
    stacked = bench.one_side("stacked", 200_000, 3)
    columns = bench.one_side("columns", 200_000, 3)
    assert stacked["checksum"] == columns["checksum"]  # the same bits
    for side in (stacked, columns):
        assert math.isfinite(side["above_mib"]) and side["above_mib"] >= 0
        assert side["wall_s"] > 0
