"""Replay audits within a calibrated tolerance: honest nondeterminism (another thread count)
passes, an update perturbed by more is caught; the calibration goes on the ledger."""

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from gridswarm.identity import Identity
from gridswarm.trust.tolerance import Calibration, judge, relative_l2, replay_match
from tests.conftest import tiny_run, wait_for
from tests.trust.cheaters import REGISTRATION, InProcessNode, scaled


@dataclass(eq=False)
class LocalNode(InProcessNode):
    """An InProcessNode talking to the in-process hub."""

    connect: Any = None

    def __post_init__(self) -> None:
        self.client = self.connect(self.identity)
        self.client.register(REGISTRATION)
        self._workloads = {}


def test_rule_is_k_times_the_honest_spread_with_a_floor():
    cal = Calibration("cuda/X").with_pair(1e-4).with_pair(3e-4)
    assert (cal.honest_max, cal.pairs) == (3e-4, 2)
    assert judge(1.2e-3, cal, k=4, floor=1e-6) is None
    assert "exceeds the tolerance" in judge(1.3e-3, cal, k=4, floor=1e-6)
    assert judge(5e-7, Calibration("cpu"), k=4, floor=1e-6) is None  # nothing seen: the floor
    assert replay_match("auto", "cpu") == "exact" and replay_match("auto", "cuda/X") == "tolerance"
    assert relative_l2(torch.ones(4), torch.ones(4)) == 0.0


def _train_with_threads(node: LocalNode, a, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return node.train(a)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("match", ["tolerance", "auto"])
def test_other_threads_pass_and_a_larger_perturbation_is_caught(in_process_hub, match):
    service, connect = in_process_hub()
    sponsor = connect(Identity.generate())
    config = tiny_run(
        trust={"replay_match": match},
        round={"deadline_s": 600, "quorum": 2},
        train={"seq_len": 32, "batch_size": 8, "inner_steps": 6, "min_inner_steps": 2},
    )
    run_id = sponsor.create_run(config).run_id
    honest, cheat = LocalNode("", connect=connect), LocalNode("", connect=connect)
    a, b = honest.assignment(run_id), cheat.assignment(run_id)
    honest.submit(run_id, honest.build(a, _train_with_threads(honest, a, 2), threads=2))
    cheat.submit(run_id, cheat.build(b, tamper=scaled(1.01), threads=1))

    torch.set_num_threads(1)  # the hub replays on 1 thread; tolerance calibrates on 2

    def screened():  # the hub's ticker audits uploads as they arrive
        trust = sponsor.run_status(run_id)["trust"]
        return trust if trust["audited"] == 2 else None

    trust = wait_for(screened, 60, "both uploads audited")
    assert trust["audited"] == 2 and trust["audits_failed"] == 1
    (reason,) = trust["rejections"].values()
    assert trust["nodes"][cheat.node_id]["rejected"] == 1
    calibrations = [
        json.loads(e.payload_json) for e in service.trust.ledger.entries(kind="audit_calibration")
    ]
    if match == "auto":  # CPU work: bit for bit with the node's own thread count
        assert "bit for bit" in reason and calibrations == []
        return
    assert "exceeds the tolerance" in reason
    assert [c["pairs"] for c in calibrations] == [1, 2]
    assert calibrations[-1]["device"] == "cpu"
    assert 0 < calibrations[-1]["honest_max"] < 1e-2  # threads do change the bits, a little
