"""Ledger operations behind the CLI: `ledger show/verify`, `run fund`, `node balance/claim`, and
the hub's epoch posting and checkpoint anchoring. Thin glue over log.py, balances.py and evm.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gridswarm.identity import Identity, node_id_from_public_key
from gridswarm.ledger.balances import epoch_cumulative
from gridswarm.ledger.chain import (
    SCOPE_CLAIM,
    Entry,
    LedgerError,
    SignedClaim,
    VerifyReport,
    sign_claim,
)
from gridswarm.ledger.log import Ledger
from gridswarm.ledger.merkle import RewardClaim, RewardTree

# web3, vyper and eth_account cost a hub ~1 s to import; only settlement needs them
if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from gridswarm.ledger.evm import EvmSettlement, TxResult


@dataclass(frozen=True)
class NodeBalance:
    """One account's money: on the ledger, and (with EVM settlement) on chain."""

    account: str
    earned_units: int
    slashed_units: int
    paid_units: int
    available_units: int
    address: str | None = None
    claimed_onchain_units: int | None = None
    token_balance_units: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ledger_show(
    ledger: Ledger, *, start_seq: int = 0, limit: int = 50, kind: str | None = None
) -> list[dict[str, Any]]:
    """Up to `limit` entries from `start_seq` (optionally one kind), as JSON-ready dicts."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rows = []
    for entry in ledger.entries(start_seq, kind=kind, chunk=min(limit, 5000)):
        rows.append(entry.to_dict())
        if len(rows) >= limit:
            break
    return rows


def ledger_verify(
    ledger: Ledger,
    *,
    hub_public_key: bytes | None = None,
    settlement: EvmSettlement | None = None,
) -> VerifyReport:
    """Re-check the whole chain; with `settlement`, also against the checkpoint roots on chain."""
    anchors = settlement.anchored_roots() if settlement is not None else {}
    return ledger.verify(hub_public_key=hub_public_key, anchors=anchors)


def fund_claim(
    sponsor: Identity,
    amount_units: int,
    *,
    tx_hash: str | None = None,
    run_id: str | None = None,
    nonce: str | None = None,
) -> SignedClaim:
    """The sponsor's signed "fund" entry (sent to the hub; `tx_hash` of the escrow deposit).

    `run_id` names the run whose escrow it fills; `nonce` makes two equal deposits two distinct
    claims (the ledger refuses a claim it already holds, so a captured one cannot be replayed).
    """
    if not isinstance(amount_units, int) or isinstance(amount_units, bool) or amount_units <= 0:
        raise ValueError(f"amount_units must be a positive integer, got {amount_units!r}")
    payload: dict[str, Any] = {"amount_units": amount_units}
    if tx_hash is not None:
        payload["tx"] = tx_hash
    if run_id is not None:
        payload["run_id"] = run_id
    if nonce is not None:
        payload["nonce"] = nonce
    return sign_claim(sponsor, "fund", payload)


def run_fund(
    ledger: Ledger,
    sponsor: Identity,
    amount_units: int,
    *,
    settlement: EvmSettlement | None = None,
    sponsor_account: LocalAccount | None = None,
) -> Entry:
    """Fund a run: deposit into the escrow when settling on chain, then record it on the ledger."""
    tx_hash = None
    if settlement is not None:
        if sponsor_account is None:
            raise ValueError("funding through EVM settlement needs the sponsor's account")
        tx_hash = settlement.fund(sponsor_account, amount_units).tx_hash
    return ledger.append_claim(fund_claim(sponsor, amount_units, tx_hash=tx_hash))


def node_balance(
    ledger: Ledger,
    account: str,
    *,
    settlement: EvmSettlement | None = None,
    address: str | None = None,
) -> NodeBalance:
    """An account's earned/slashed/paid/available units, plus on-chain figures on EVM."""
    b = ledger.balances()
    claimed = token = None
    if settlement is not None and address is not None:
        claimed = settlement.claimed_units(address)
        token = settlement.token_balance(address)
    return NodeBalance(
        account=account,
        earned_units=b.earned.get(account, 0),
        slashed_units=b.slashed.get(account, 0),
        paid_units=b.paid.get(account, 0),
        available_units=b.available(account),
        address=address,
        claimed_onchain_units=claimed,
        token_balance_units=token,
    )


def payout_address_claim(node: Identity, address: str, *, nonce: str | None = None) -> SignedClaim:
    """A node's signed statement of the EVM address its rewards go to (`nonce`: lets it name an
    address it used before again without repeating an old claim)."""
    payload: dict[str, Any] = {"address": address}
    if nonce is not None:
        payload["nonce"] = nonce
    return sign_claim(node, "payout_address", payload)


def payout_addresses(ledger: Ledger) -> dict[str, str]:
    """Node id -> payout address, from the nodes' own signed claims (the latest one wins)."""
    out: dict[str, str] = {}
    for entry in ledger.entries(kind="payout_address"):
        if entry.scope == SCOPE_CLAIM:
            out[node_id_from_public_key(entry.author)] = entry.payload["address"]
    return out


def latest_epoch(ledger: Ledger) -> Entry | None:
    last = None
    for last in ledger.entries(kind="epoch"):  # noqa: B007 - we want the last one
        pass
    return last


def epoch_due(ledger: Ledger, address_of: Mapping[str, str]) -> bool:
    """Whether the next epoch root would grant anything the latest posted one does not: some
    address's cumulative amount grew (a new reward, or a node's first payout address)."""
    previous = latest_epoch(ledger)
    prev_amounts = {} if previous is None else previous.payload["cumulative_units"]
    amounts = epoch_cumulative(ledger.balances(), address_of, prev_amounts)
    return bool(amounts) and amounts != prev_amounts


def post_epoch(
    ledger: Ledger,
    settlement: EvmSettlement,
    hub_account: LocalAccount,
    address_of: Mapping[str, str],
) -> Entry:
    """Hub: post the next epoch root of cumulative rewards on chain and record it on the ledger.

    The ledger entry carries every account's cumulative amount, so anyone holding the ledger can
    rebuild the tree and the proof for any account (`reward_claim_for`).
    """
    previous = latest_epoch(ledger)
    epoch = 0 if previous is None else previous.payload["epoch"] + 1
    prev_amounts = {} if previous is None else previous.payload["cumulative_units"]
    amounts = epoch_cumulative(ledger.balances(), address_of, prev_amounts)
    if not amounts:
        raise LedgerError("no rewards to post: every account's cumulative amount is 0")
    tree = RewardTree(epoch, amounts)
    tx = settlement.post_epoch_root(hub_account, tree)
    return ledger.append(
        "epoch",
        {
            "epoch": epoch,
            "root": "0x" + tree.root.hex(),
            "total_units": tree.total_units,
            "cumulative_units": tree.cumulative_units,
            "tx": tx.tx_hash,
            "gas_used": tx.gas_used,
        },
    )


def reward_claim_for(ledger: Ledger, address: str) -> RewardClaim | None:
    """The claim (amount + proof) for `address` in the latest posted epoch, or None."""
    entry = latest_epoch(ledger)
    if entry is None:
        return None
    p = entry.payload
    tree = RewardTree(p["epoch"], p["cumulative_units"])
    if tree.root.hex() != p["root"].removeprefix("0x"):
        raise LedgerError(f"epoch entry {entry.seq}: amounts do not hash to the recorded root")
    try:
        return tree.claim(address)
    except KeyError:
        return None


def node_claim(
    settlement: EvmSettlement, node_account: LocalAccount, claim: RewardClaim
) -> TxResult:
    """Node: claim its cumulative reward on chain (pays cumulative − already claimed)."""
    return settlement.claim(node_account, claim)


def anchor_checkpoints(
    ledger: Ledger, settlement: EvmSettlement, hub_account: LocalAccount
) -> list[Entry]:
    """Hub: anchor every checkpoint root not yet on chain; records an "anchor" entry for each."""
    done = {e.payload["checkpoint_seq"] for e in ledger.entries(kind="anchor")}
    recorded = []
    for checkpoint in list(ledger.entries(kind="checkpoint")):
        if checkpoint.seq in done:
            continue
        root = bytes.fromhex(checkpoint.payload["merkle_root"])
        tx = settlement.anchor_checkpoint(hub_account, checkpoint.seq, root)
        recorded.append(
            ledger.append(
                "anchor",
                {"checkpoint_seq": checkpoint.seq, "root": root.hex(), "tx": tx.tx_hash},
            )
        )
    return recorded
