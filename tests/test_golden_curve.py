"""Proof of value for hub refactors: the fixed-seed in-process swarm (tests/harness.py) publishes
exactly the committed loss curve and weights, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import PORTABLE_NUMERICS

GOLDEN = Path(__file__).parent / "data" / "golden_curve.json"
REPO = Path(__file__).resolve().parent.parent


def test_fixed_seed_swarm_reproduces_the_committed_curve_bit_for_bit():
    """In a fresh process with portable numerics (torch reads them when it loads)."""
    want = json.loads(GOLDEN.read_text())
    env = {**os.environ, **PORTABLE_NUMERICS, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.harness"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got = json.loads(done.stdout)  # the same JSON round trip as the file
    assert got["status"] == "finished"
    assert got["curve"] == want["curve"]
    assert got["weights_sha256"] == want["weights_sha256"]
    assert got["contributions"] == want["contributions"]
    assert got["val_loss"][-1] < got["val_loss"][0] - 1.0  # and it trains
