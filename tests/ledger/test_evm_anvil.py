"""EVM settlement on a real anvil node (127.0.0.1): fund, rewards, epoch roots, claims, anchors."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete
from web3 import Web3

from gridswarm.identity import Identity
from gridswarm.ledger import evm
from gridswarm.ledger.anvil import funded_account
from gridswarm.ledger.evm import EvmSettlement, SettlementError, compile_contract
from gridswarm.ledger.log import TABLE, Ledger
from gridswarm.ledger.merkle import RewardTree
from gridswarm.ledger.ops import (
    anchor_checkpoints,
    ledger_show,
    ledger_verify,
    node_balance,
    node_claim,
    post_epoch,
    reward_claim_for,
    run_fund,
)
from gridswarm.trust.rewards import ContributionScore, split_round_pool


@pytest.fixture
def settled(w3: Web3, ledger: Ledger):
    hub_account, sponsor_account = funded_account(w3), funded_account(w3)
    settlement, gas = EvmSettlement.deploy(
        w3, hub_account, hub_address=hub_account.address, sponsor_address=sponsor_account.address
    )
    assert gas["deploy_token"] > 100_000 and gas["deploy_escrow"] > 100_000
    settlement.mint(hub_account, sponsor_account.address, 10**6)
    nodes = {f"node{i}": funded_account(w3) for i in range(3)}
    return settlement, hub_account, sponsor_account, nodes


def reward_round(ledger: Ledger, round_index: int, pool: int, tokens: dict[str, int]) -> None:
    scores = [ContributionScore(a, t, usefulness=1.0) for a, t in tokens.items()]
    ledger.append("reward", split_round_pool(round_index, pool, scores).ledger_payload())


@pytest.mark.anvil
def test_fund_post_claim_end_to_end(settled, ledger: Ledger) -> None:
    settlement, hub_account, sponsor_account, nodes = settled
    sponsor = Identity.from_seed(b"sponsor")
    fund = run_fund(ledger, sponsor, 9_000, settlement=settlement, sponsor_account=sponsor_account)
    assert fund.author == sponsor.public_key and fund.payload["tx"].startswith("0x")
    assert settlement.state().funded_units == 9_000
    assert settlement.token_balance(settlement.escrow.address) == 9_000

    reward_round(ledger, 0, 3_000, {"node0": 100, "node1": 200, "node2": 300})
    address_of = {name: acct.address for name, acct in nodes.items()}
    epoch0 = post_epoch(ledger, settlement, hub_account, address_of)
    assert epoch0.payload["total_units"] == 3_000 and epoch0.payload["gas_used"] > 40_000
    assert settlement.epoch_root(0).hex() == epoch0.payload["root"].removeprefix("0x")

    claim = reward_claim_for(ledger, nodes["node1"].address)
    assert claim is not None and claim.cumulative_units == 1_000
    assert settlement.verify_claim(claim)
    node_claim(settlement, nodes["node1"], claim)
    assert settlement.token_balance(nodes["node1"].address) == 1_000
    with pytest.raises(SettlementError, match="nothing to claim"):
        node_claim(settlement, nodes["node1"], claim)

    reward_round(ledger, 1, 3_000, {"node0": 1, "node1": 1, "node2": 1})
    ledger.append("slash", {"account": "node2", "amount_units": 500, "reason": "audit mismatch"})
    post_epoch(ledger, settlement, hub_account, address_of)
    for name in ("node0", "node1", "node2"):
        c = reward_claim_for(ledger, nodes[name].address)
        assert c is not None and c.epoch == 1
        node_claim(settlement, nodes[name], c)
    balances = ledger.balances()
    for name in ("node0", "node1", "node2"):
        assert settlement.token_balance(nodes[name].address) == balances.entitled(name)
    state = settlement.state()
    assert state.claimed_units == state.allocated_units == 6_000 - 500
    assert settlement.token_balance(settlement.escrow.address) == 9_000 - 5_500

    nb = node_balance(ledger, "node2", settlement=settlement, address=nodes["node2"].address)
    assert nb.earned_units == 2_500 and nb.slashed_units == 500
    assert nb.claimed_onchain_units == nb.token_balance_units == 2_000
    assert [r["kind"] for r in ledger_show(ledger, kind="epoch")] == ["epoch", "epoch"]


@pytest.mark.anvil
def test_anchored_checkpoints_catch_truncation(settled, ledger: Ledger) -> None:
    settlement, hub_account, _, _ = settled
    for i in range(20):
        ledger.append("round", {"round": i})
    anchored = anchor_checkpoints(ledger, settlement, hub_account)
    assert [a.payload["checkpoint_seq"] for a in anchored] == [8, 17]
    assert anchor_checkpoints(ledger, settlement, hub_account) == []  # idempotent
    report = ledger_verify(ledger, settlement=settlement)
    assert report.ok and report.anchors_checked == 2
    with ledger.engine.begin() as c:  # drop the tail, including the anchor records themselves
        c.execute(delete(TABLE).where(TABLE.c.seq >= 12))
    assert ledger.verify().ok
    report = ledger_verify(ledger, settlement=settlement)
    assert not report.ok and report.first_bad_seq == 12 and "seq 17 is missing" in report.reason


@pytest.mark.anvil
def test_reverts_are_reported(settled) -> None:
    settlement, _, sponsor_account, nodes = settled
    with pytest.raises(SettlementError, match="only owner"):
        settlement.mint(nodes["node0"], nodes["node0"].address, 1)
    with pytest.raises(ValueError, match="amount_units must be > 0"):
        settlement.fund(sponsor_account, 0)
    with pytest.raises(SettlementError, match="only hub"):
        settlement.anchor_checkpoint(sponsor_account, 8, b"\x01" * 32)


def test_compile_cache_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDSWARM_CACHE_DIR", str(tmp_path))
    compile_contract.cache_clear()
    try:
        first = compile_contract("RunEscrow")
        cached = list((tmp_path / "vyper").glob("RunEscrow-*.json"))
        assert len(cached) == 1
        compile_contract.cache_clear()
        calls = []
        monkeypatch.setattr(evm.vyper, "compile_code", lambda *a, **k: calls.append(a))
        assert compile_contract("RunEscrow") == first and calls == []
        with pytest.raises(ValueError, match="unknown contract"):
            compile_contract("Nope")
    finally:
        compile_contract.cache_clear()


@pytest.mark.anvil
def test_pipelined_claims_pay_and_report_reverts(settled) -> None:
    settlement, hub_account, sponsor_account, nodes = settled
    settlement.fund(sponsor_account, 1_000)
    accounts = list(nodes.values())
    tree = RewardTree(0, {a.address: 100 * (i + 1) for i, a in enumerate(accounts)})
    settlement.post_epoch_root(hub_account, tree)
    results = settlement.claim_many([(a, tree.claim(a.address)) for a in accounts])
    assert len({r.tx_hash for r in results}) == len(accounts)
    assert all(40_000 < r.gas_used < 200_000 for r in results)
    for i, a in enumerate(accounts):
        assert settlement.token_balance(a.address) == 100 * (i + 1)
    with pytest.raises(SettlementError, match="reverted"):
        settlement.claim_many([(accounts[0], tree.claim(accounts[0].address))])
