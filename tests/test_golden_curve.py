"""Proof of value for hub refactors: the fixed-seed in-process swarm (tests/harness.py) publishes
exactly the committed loss curve and weights, bit for bit."""

import json
from pathlib import Path

from tests.harness import run_golden

GOLDEN = Path(__file__).parent / "data" / "golden_curve.json"


def test_fixed_seed_swarm_reproduces_the_committed_curve_bit_for_bit(tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(run_golden(tmp_path)))  # the same JSON round trip as the file
    assert got["status"] == "finished"
    assert got["curve"] == want["curve"]
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["contributions"] == want["contributions"]
    assert got["val_loss"][-1] < got["val_loss"][0] - 1.0  # and it trains
