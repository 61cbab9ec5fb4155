"""CLI-facing ledger operations on the embedded ledger alone (no chain)."""

from __future__ import annotations

import pytest

from gridswarm.identity import Identity
from gridswarm.ledger.chain import LedgerError
from gridswarm.ledger.log import Ledger
from gridswarm.ledger.ops import (
    fund_claim,
    ledger_show,
    ledger_verify,
    node_balance,
    reward_claim_for,
    run_fund,
)
from gridswarm.trust.rewards import ContributionScore, split_round_pool

SPONSOR = Identity.from_seed(b"sponsor")


def test_fund_reward_show_balance_verify(ledger: Ledger, hub: Identity) -> None:
    entry = run_fund(ledger, SPONSOR, 5_000)
    assert entry.kind == "fund" and entry.author == SPONSOR.public_key
    split = split_round_pool(
        0, 1_000, [ContributionScore("n1", 300, 1.0), ContributionScore("n2", 100, 1.0)]
    )
    ledger.append("reward", split.ledger_payload())
    rows = ledger_show(ledger, limit=2)
    assert [r["kind"] for r in rows] == ["genesis", "fund"]
    assert ledger_show(ledger, kind="reward")[0]["payload"]["shares"] == {"n1": 750, "n2": 250}
    assert ledger_show(ledger, start_seq=2, limit=1)[0]["seq"] == 2
    nb = node_balance(ledger, "n1")
    assert (nb.earned_units, nb.available_units, nb.claimed_onchain_units) == (750, 750, None)
    report = ledger_verify(ledger, hub_public_key=hub.public_key)
    assert report.ok and report.checked == 3
    assert reward_claim_for(ledger, "0x" + "11" * 20) is None


def test_bad_arguments(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        fund_claim(SPONSOR, 0)
    with pytest.raises(ValueError, match="sponsor's account"):
        run_fund(ledger, SPONSOR, 10, settlement=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        ledger_show(ledger, limit=0)
    ledger.append("reward", {"round": 0, "pool_units": 5, "shares": {"x": 5}, "carried_units": 0})
    with pytest.raises(LedgerError, match="exceeds the funded pool"):
        node_balance(ledger, "x")


def test_an_epoch_is_due_only_when_it_grants_something_new(ledger: Ledger) -> None:
    """The hub's timer (hub/epochs.py) posts an epoch only when some payout address's
    cumulative amount grew since the last one: an idle hub spends no gas."""
    from gridswarm.ledger.balances import epoch_cumulative
    from gridswarm.ledger.ops import epoch_due

    addresses = {"n1": "0x" + "aa" * 20, "n2": "0x" + "bb" * 20}
    assert not epoch_due(ledger, addresses)  # nothing earned yet
    run_fund(ledger, SPONSOR, 5_000)
    split = split_round_pool(
        0, 1_000, [ContributionScore("n1", 300, 1.0), ContributionScore("n2", 100, 1.0)]
    )
    ledger.append("reward", split.ledger_payload())
    assert not epoch_due(ledger, {})  # earned, but no node has named a payout address
    assert epoch_due(ledger, addresses)
    posted = epoch_cumulative(ledger.balances(), addresses)
    ledger.append("epoch", {"epoch": 0, "cumulative_units": posted})  # as post_epoch records
    assert not epoch_due(ledger, addresses)  # the same amounts again: nothing to post
    again = split_round_pool(1, 1_000, [ContributionScore("n2", 100, 1.0)])
    ledger.append("reward", again.ledger_payload())
    assert epoch_due(ledger, addresses)
