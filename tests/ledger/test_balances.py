"""Balances fold (pure) over hand-made entries, and epoch cumulative amounts."""

from __future__ import annotations

import pytest

from gridswarm.identity import Identity
from gridswarm.ledger.balances import epoch_cumulative, fold_balances
from gridswarm.ledger.chain import (
    GENESIS_PREV_HASH,
    Entry,
    LedgerError,
    canonical_json,
    seal_hub_entry,
)

HUB = Identity.from_seed(b"hub")


def chain(*items: tuple[str, dict]) -> list[Entry]:
    entries, prev = [], GENESIS_PREV_HASH
    for seq, (kind, payload) in enumerate(items):
        e = seal_hub_entry(seq, prev, kind, canonical_json(payload), HUB, 0)
        entries.append(e)
        prev = e.entry_hash
    return entries


def reward(
    round_index: int, pool: int, shares: dict[str, int], carried: int = 0
) -> tuple[str, dict]:
    return "reward", {
        "round": round_index,
        "pool_units": pool,
        "shares": shares,
        "carried_units": carried,
    }


def test_fund_reward_slash_payout() -> None:
    b = fold_balances(
        chain(
            ("fund", {"amount_units": 1_000}),
            ("round", {"round": 0}),
            reward(0, 300, {"a": 200, "b": 99}, carried=1),
            reward(1, 300, {"a": 100, "c": 200}),
            ("slash", {"account": "c", "amount_units": 50, "reason": "replay mismatch"}),
            ("payout", {"account": "a", "amount_units": 250}),
        )
    )
    assert b.funded_units == 1_000 and b.rewarded_units == 599
    assert b.pool_units == 1_000 - 599 + 50
    assert (b.earned["a"], b.available("a"), b.entitled("a")) == (300, 50, 300)
    assert b.available("c") == 150 and b.entitled("c") == 150
    assert b.accounts == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ((("fund", {"amount_units": 10}), reward(0, 100, {"a": 100})), "exceeds the funded pool"),
        ((("fund", {"amount_units": 100}), reward(0, 100, {"a": 90})), r"!= pool 100"),
        (
            (("fund", {"amount_units": 100}), ("slash", {"account": "a", "amount_units": 1})),
            "exceeds",
        ),
        ((("fund", {"amount_units": -5}),), "integer >= 0"),
        ((("payout", {"amount_units": 5}),), "needs an account"),
    ],
)
def test_broken_sums_name_the_entry(items, message) -> None:
    with pytest.raises(LedgerError, match=message) as info:
        fold_balances(chain(*items))
    assert f"entry {len(items) - 1}" in str(info.value)


def test_epoch_cumulative_never_shrinks_and_sums_shared_addresses() -> None:
    b = fold_balances(
        chain(
            ("fund", {"amount_units": 1_000}),
            reward(0, 300, {"a": 100, "b": 100, "c": 100}),
            ("slash", {"account": "b", "amount_units": 60}),
        )
    )
    addresses = {"a": "0xA", "b": "0xB", "c": "0xA"}
    assert epoch_cumulative(b, addresses) == {"0xA": 200, "0xB": 40}
    assert epoch_cumulative(b, addresses, previous={"0xB": 100, "0xC": 5}) == {
        "0xA": 200,
        "0xB": 100,
        "0xC": 5,
    }
    assert epoch_cumulative(b, {"a": "0xA"}) == {"0xA": 100}
