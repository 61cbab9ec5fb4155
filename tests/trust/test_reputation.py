"""Reputation from audits, usefulness and liveness."""

from __future__ import annotations

import pytest

from gridswarm.trust.reputation import (
    Reputation,
    ReputationPolicy,
    RoundOutcome,
    selection_weight,
    update_reputation,
)


def run(outcomes: list[RoundOutcome], rep: Reputation | None = None) -> Reputation:
    rep = rep or Reputation()
    for o in outcomes:
        rep = update_reputation(rep, o)
    return rep


GOOD = RoundOutcome(delivered=True, audit_passed=True, usefulness=1.0)


def test_clean_audits_build_reputation() -> None:
    scores = [run([GOOD] * n).score for n in (1, 5, 20)]
    assert 0 < scores[0] < scores[1] < scores[2] < 1
    rep = run([GOOD] * 20)
    assert rep.consecutive_valid == rep.audits_passed == 20 and rep.strikes == 0


def test_failed_audit_or_rejection_resets_and_strikes() -> None:
    good = run([GOOD] * 20)
    failed = update_reputation(good, RoundOutcome(delivered=True, audit_passed=False))
    assert failed.consecutive_valid == 0 and failed.strikes == 1 and failed.audits_failed == 1
    assert failed.score == 0.0
    recovered = run([GOOD] * 20, failed)
    assert recovered.score < 0.15 * good.score  # the strike stays
    rejected = update_reputation(good, RoundOutcome(delivered=True, rejected=True))
    assert rejected.strikes == 1 and rejected.audits_failed == 0


def test_liveness_and_usefulness_matter() -> None:
    base = run([GOOD] * 10)
    missing = run([RoundOutcome(delivered=False)] * 3, base)
    assert missing.score < base.score and missing.liveness < base.liveness
    useless = run([RoundOutcome(delivered=True, audit_passed=True, usefulness=0.0)] * 10)
    assert useless.score < base.score
    unaudited = update_reputation(base, RoundOutcome(delivered=True))
    assert unaudited.consecutive_valid == base.consecutive_valid


def test_selection_weight_gives_newcomers_a_chance_but_not_cheaters() -> None:
    assert selection_weight(Reputation()) == 0.1
    cheater = update_reputation(Reputation(), RoundOutcome(delivered=True, rejected=True))
    assert selection_weight(cheater) == 0.0
    assert selection_weight(run([GOOD] * 20)) > 0.5


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="finite"):
        update_reputation(Reputation(), RoundOutcome(delivered=True, usefulness=float("nan")))
    with pytest.raises(ValueError, match="smoothing"):
        ReputationPolicy(smoothing=0)
