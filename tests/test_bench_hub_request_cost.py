"""bench/hub_request_cost.py against a real hub process: every phase of a round answers for
every node, and the per-request figures are measured (finite, the hub's CPU counted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.benches import load_bench


@pytest.mark.slow
def test_every_phase_of_a_round_is_measured(tmp_path: Path) -> None:
    bench = load_bench("hub_request_cost")
    result = bench.measure(None, 6, tmp_path)
    assert list(result) == list(bench.PHASES)
    for phase, figures in result.items():
        assert math.isfinite(figures["cpu_ms"]) and figures["cpu_ms"] >= 0, phase
        assert figures["wall_ms"] > 0, phase
    assert sum(f["cpu_ms"] for f in result.values()) > 0  # the hub's own CPU, read from /proc
    text = bench.markdown(
        {"command": "x", "nodes": 6, "load_average": "0", "results": {"this": result}}
    )
    assert all(f"| {phase} |" in text for phase in bench.PHASES)
    node_round = sum(result[p]["cpu_ms"] for p in bench.ROUND)
    assert f"| this | {node_round:.2f} |" in text  # the node-round beside its floors
