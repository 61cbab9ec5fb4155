"""The one acceptance decision every upload passes, plain or SecAgg (hub/acceptance.py): each
refusal with its typed reason, in the fixed order, and only the ones a node is held to as
strikes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gridswarm.hub.acceptance import (
    AssignmentFacts,
    ClaimFacts,
    ClaimRules,
    EnergyFacts,
    RunFacts,
    check_upload,
)
from gridswarm.protocol import Refusal

TOKENS_PER_STEP = 256
ASSIGNMENT = AssignmentFacts(status="assigned", round=3, inner_steps=10)
RUN = RunFacts(id="r1", status="active", status_reason=None, round=3, round_status="open")
CLAIM = ClaimFacts(
    codec="int8",
    steps=10,
    tokens=10 * TOKENS_PER_STEP,
    train_time_s=100.0,
    threads=4,
    micro_batch_size=None,
    energy_wh=5.0,
)
RULES = ClaimRules(
    expected_codec="int8", tokens_per_step=TOKENS_PER_STEP, batch_size=8, energy_min_fraction=0.02
)
ENERGY = EnergyFacts(w_per_core=10.0, fastest_tokens_per_s=None)


def check(assignment=ASSIGNMENT, run=RUN, claim=CLAIM, rules=RULES, energy=ENERGY):
    return check_upload(assignment, run, claim, rules, energy)


def test_an_honest_upload_for_the_open_round_is_accepted():
    assert check() is None
    assert check(claim=replace(CLAIM, energy_wh=None)) is None  # no report: nothing to judge
    assert check(claim=replace(CLAIM, micro_batch_size=8)) is None


@pytest.mark.parametrize(
    ("change", "reason", "status", "strike"),
    [
        ({"assignment": replace(ASSIGNMENT, status="submitted")}, Refusal.DUPLICATE, 409, False),
        ({"run": replace(RUN, status="paused")}, Refusal.STALE, 409, False),
        ({"assignment": replace(ASSIGNMENT, status="missed")}, Refusal.STALE, 409, False),
        ({"run": replace(RUN, round=4)}, Refusal.STALE, 409, False),
        ({"run": replace(RUN, round_status="secagg")}, Refusal.STALE, 409, False),
        ({"claim": replace(CLAIM, codec="fp32")}, Refusal.MALFORMED, 400, False),
        ({"claim": replace(CLAIM, steps=11)}, Refusal.FALSE_CLAIM, 400, True),
        ({"claim": replace(CLAIM, tokens=CLAIM.tokens * 2)}, Refusal.FALSE_CLAIM, 400, True),
        ({"claim": replace(CLAIM, micro_batch_size=9)}, Refusal.MALFORMED, 400, False),
        ({"claim": replace(CLAIM, energy_wh=1e-6)}, Refusal.ENERGY_FLOOR, 400, True),
    ],
)
def test_each_refusal_has_its_typed_reason(change, reason, status, strike):
    refused = check(**change)
    assert refused is not None
    assert (refused.reason, refused.status, refused.strike) == (reason, status, strike)


def test_the_order_is_fixed_duplicate_then_stale_then_claims():
    everything_wrong = replace(CLAIM, steps=99, energy_wh=1e-9, codec="fp32")
    retried = replace(ASSIGNMENT, status="submitted")
    assert check(assignment=retried, claim=everything_wrong).reason is Refusal.DUPLICATE
    stale = replace(RUN, round=4)
    refused = check(run=stale, claim=everything_wrong)
    assert refused.reason is Refusal.STALE and not refused.strike  # late work earns no strike
    assert refused.mark_late and "is late" in refused.detail
    assert not check(assignment=replace(ASSIGNMENT, status="missed"), run=stale).mark_late


def test_a_stopped_run_says_why_and_the_ledger_reason_names_a_false_claim():
    refused = check(run=replace(RUN, status="finished", status_reason="epsilon budget: ..."))
    assert "r1 is finished: epsilon budget" in refused.detail
    false = check(claim=replace(CLAIM, steps=11))
    assert false.ledger_reason == f"false claim: {false.detail}"
    floor = check(claim=replace(CLAIM, energy_wh=1e-6))
    assert floor.ledger_reason == floor.detail and "energy under-reported" in floor.detail


def test_the_energy_floor_counts_compute_at_the_fastest_peer_speed_and_can_be_off():
    # 4 threads x 10 W x 100 s = 1.11 Wh; 2 % of it is 0.022 Wh
    assert check(claim=replace(CLAIM, energy_wh=0.03)) is None
    assert check(claim=replace(CLAIM, energy_wh=0.02)).reason is Refusal.ENERGY_FLOOR
    # a peer did the same tokens in 10 s: the node may have idled, 0.0022 Wh is enough
    fast_peer = EnergyFacts(10.0, fastest_tokens_per_s=CLAIM.tokens / 10.0)
    assert check(claim=replace(CLAIM, energy_wh=0.003), energy=fast_peer) is None
    off = replace(RULES, energy_min_fraction=0.0)
    assert check(claim=replace(CLAIM, energy_wh=0.0), rules=off) is None
