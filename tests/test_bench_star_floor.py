"""bench/star_floor.py: the floor under the data-plane bench moves and accounts what it says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import star_floor  # spawned clients import it by name, from the same path


@pytest.mark.slow  # a server and three client processes per level
@pytest.mark.parametrize("level", ["transport", "durable"])  # durable: verified and more
def test_every_client_moves_its_bytes_each_round(level: str) -> None:
    up_bytes, down_bytes = 300_001, 200_003
    side = star_floor.star_side(3, up_bytes, down_bytes, 2, level)
    for phase, size in (("up", up_bytes), ("down", down_bytes)):
        assert [row["round"] for row in side[phase]] == [0, 1]
        assert all(row["nodes"] == 3 and row["bytes"] == 3 * size for row in side[phase])
        assert all(row["wall_s"] > 0 for row in side[phase])
    costs = side["server_costs"]
    assert (costs["verify_cpu_s"] > 0) == (level != "transport")  # 6 uploads verified
    assert (costs["store_wall_s"] > 0) == (level == "durable")
    assert len(star_floor.medians(side)) == 3
