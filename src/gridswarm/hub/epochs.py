"""The hub posts reward epochs on chain on its own clock: `gridswarm hub --epoch-every-s S`
with the chain options (`--rpc`, `--token`, `--escrow`, `--eth-key`).

Every S seconds the hub holding the ticker lease (one replica, hub/replicas.py) posts the next
epoch's Merkle root of cumulative rewards to the run escrow and anchors the ledger's new
checkpoint roots (`ledger/ops.py` `post_epoch`, `anchor_checkpoints`: what `gridswarm ledger
post-epoch` does by hand), so contributors can claim what they earned without an operator in
the loop. An epoch is posted only when it grants something the last one did not
(`ops.epoch_due`): an idle hub spends no gas. The chain is an outside service: its calls run on
the ticker thread outside every lock a request waits on, and a failure (the node unreachable,
a reverted transaction) is logged and tried again at the next interval; rounds go on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gridswarm.ledger.chain import Entry
    from gridswarm.ledger.log import Ledger

log = logging.getLogger(__name__)

MIN_EVERY_S = 10.0  # a bound: at most one epoch transaction per 10 s
MAX_EVERY_S = 366 * 86400.0


@dataclass(frozen=True)
class EpochChain:
    """Where and how often the hub posts epochs: the chain's JSON-RPC URL, the RewardToken and
    RunEscrow contract addresses, the file of the hub's EVM account key, the interval."""

    rpc: str
    token: str
    escrow: str
    eth_key: Path
    every_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.every_s) and MIN_EVERY_S <= self.every_s <= MAX_EVERY_S):
            raise ValueError(
                f"--epoch-every-s must be between {MIN_EVERY_S:.0f} and {MAX_EVERY_S:.0f} s, "
                f"got {self.every_s}"
            )


class EpochPoster:
    """Posts an epoch when one is due (`maybe_post`, called by the hub's ticker)."""

    def __init__(self, chain: EpochChain, ledger: Ledger, clock: Callable[[], float]) -> None:
        from gridswarm.ledger.cli import load_eth_account  # web3 and eth_account: only here

        self.chain, self.ledger, self.clock = chain, ledger, clock
        self.account = load_eth_account(chain.eth_key)
        self._settlement: Any = None
        self._next_s = clock() + chain.every_s

    def maybe_post(self) -> Entry | None:
        """The epoch entry posted now, or None: not yet time, nothing new, or the chain failed
        (logged; tried again at the next interval)."""
        from gridswarm.ledger.evm import EvmSettlement
        from gridswarm.ledger.ops import anchor_checkpoints, epoch_due, payout_addresses, post_epoch

        now = self.clock()
        if now < self._next_s:
            return None
        self._next_s = now + self.chain.every_s
        try:
            addresses = payout_addresses(self.ledger)
            if not epoch_due(self.ledger, addresses):
                return None
            if self._settlement is None:
                c = self.chain
                self._settlement = EvmSettlement.connect(c.rpc, c.token, c.escrow)
            entry = post_epoch(self.ledger, self._settlement, self.account, addresses)
            anchored = anchor_checkpoints(self.ledger, self._settlement, self.account)
        except Exception as exc:  # an outside service: whatever it raises, the rounds go on
            log.warning("posting the reward epoch failed (tried again in %.0f s): %s",
                        self.chain.every_s, exc)  # fmt: skip
            return None
        p = entry.payload
        log.info(
            "epoch %d posted: %d units to %d address(es), %d checkpoint(s) anchored",
            p["epoch"],
            p["total_units"],
            len(p["cumulative_units"]),
            len(anchored),
        )
        return entry
