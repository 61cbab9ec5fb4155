"""Balances as a fold over ledger entries (pure): funding in, rewards out, slashes back, payouts.

All amounts are integers in the reward token's smallest unit (`*_units`). Payloads read:

- fund    {"amount_units": int}                 sponsor adds to the run's pool
- reward  {"round": int, "pool_units": int,     the hub splits one round's pool;
           "shares": {account: int},            sum(shares) + carried_units == pool_units
           "carried_units": int}                (what nobody earned stays in the pool)
- slash   {"account": str, "amount_units": int, "reason": str}   forfeit back to the pool
- payout  {"account": str, "amount_units": int}  paid out (embedded settlement / on-chain claim)

A log that breaks these sums (reward beyond the pool, slash or payout beyond what the account holds)
is reported with the seq of the offending entry. Other kinds do not move money and are skipped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gridswarm.ledger.chain import Entry, LedgerError

MONEY_KINDS = frozenset({"fund", "reward", "slash", "payout"})


def _units(payload: Mapping[str, Any], key: str, seq: int) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LedgerError(f"entry {seq}: {key} must be an integer >= 0, got {value!r}")
    return value


@dataclass
class Balances:
    """The run's money after folding the log."""

    funded_units: int = 0
    rewarded_units: int = 0
    forfeited_units: int = 0
    paid_units: int = 0
    earned: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    slashed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    paid: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def pool_units(self) -> int:
        """Funded but not (or no longer) owed to anyone."""
        return self.funded_units - self.rewarded_units + self.forfeited_units

    def entitled(self, account: str) -> int:
        """Cumulative amount the account may ever withdraw (what EVM epoch roots carry)."""
        return self.earned.get(account, 0) - self.slashed.get(account, 0)

    def available(self, account: str) -> int:
        """Entitled minus what was already paid out."""
        return self.entitled(account) - self.paid.get(account, 0)

    @property
    def accounts(self) -> list[str]:
        return sorted(set(self.earned) | set(self.slashed) | set(self.paid))

    def apply(self, e: Entry) -> None:
        """Fold one entry in (raises LedgerError naming the entry if the sums break)."""
        if e.kind not in MONEY_KINDS:
            return
        p = e.payload
        if e.kind == "fund":
            self.funded_units += _units(p, "amount_units", e.seq)
        elif e.kind == "reward":
            pool = _units(p, "pool_units", e.seq)
            carried = _units(p, "carried_units", e.seq)
            shares = p.get("shares")
            if not isinstance(shares, dict):
                raise LedgerError(f"entry {e.seq}: reward shares must be an object")
            paid = {a: _units(shares, a, e.seq) for a in shares}
            if sum(paid.values()) + carried != pool:
                raise LedgerError(
                    f"entry {e.seq}: reward shares {sum(paid.values())} + carried {carried} "
                    f"!= pool {pool}"
                )
            if sum(paid.values()) > self.pool_units:
                raise LedgerError(
                    f"entry {e.seq}: reward of {sum(paid.values())} units exceeds the funded pool "
                    f"of {self.pool_units}"
                )
            for account, units in paid.items():
                self.earned[account] += units
            self.rewarded_units += sum(paid.values())
        else:
            account = p.get("account")
            if not isinstance(account, str) or not account:
                raise LedgerError(f"entry {e.seq}: {e.kind} needs an account")
            units = _units(p, "amount_units", e.seq)
            if units > self.available(account):
                raise LedgerError(
                    f"entry {e.seq}: {e.kind} of {units} units exceeds {account}'s available "
                    f"{self.available(account)}"
                )
            if e.kind == "slash":
                self.slashed[account] += units
                self.forfeited_units += units
            else:
                self.paid[account] += units
                self.paid_units += units


def fold_balances(entries: Iterable[Entry]) -> Balances:
    """Balances after applying `entries` in order."""
    balances = Balances()
    for e in entries:
        balances.apply(e)
    return balances


@dataclass(frozen=True)
class RunEscrow:
    """One run's share of the ledger's money: what its sponsor put in, what rounds paid out, and
    what slashes returned. Entries name their run in `payload["run_id"]`."""

    run_id: str
    funded_units: int = 0
    rewarded_units: int = 0
    forfeited_units: int = 0

    @property
    def available_units(self) -> int:
        """What later rounds of this run may still pay."""
        return self.funded_units - self.rewarded_units + self.forfeited_units


def run_escrow(entries: Iterable[Entry], run_id: str) -> RunEscrow:
    """Fold the money entries of one run (fund, reward, slash); other runs' entries are skipped.

    Sums are checked by `fold_balances` over the whole log; this only attributes them to a run.
    """
    funded = rewarded = forfeited = 0
    for e in entries:
        if e.kind not in MONEY_KINDS:
            continue
        p = e.payload
        if p.get("run_id") != run_id:
            continue
        if e.kind == "fund":
            funded += _units(p, "amount_units", e.seq)
        elif e.kind == "reward":
            shares = p.get("shares") or {}
            rewarded += sum(_units(shares, a, e.seq) for a in shares)
        elif e.kind == "slash":
            forfeited += _units(p, "amount_units", e.seq)
    return RunEscrow(run_id, funded, rewarded, forfeited)


def epoch_cumulative(
    balances: Balances, address_of: Mapping[str, str], previous: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Cumulative amounts per EVM address for the next epoch root.

    `address_of` maps ledger accounts (node ids) to payout addresses. An amount never goes below
    what an earlier root already granted (`previous`): a root, once posted, can be claimed, so a
    later slash cannot claw it back on chain; it only reduces what is granted afterwards.
    """
    fresh: dict[str, int] = defaultdict(int)
    for account in balances.accounts:
        if account in address_of:
            fresh[address_of[account]] += balances.entitled(account)
    amounts: dict[str, int] = dict(previous or {})
    for address, units in fresh.items():
        amounts[address] = max(amounts.get(address, 0), units)
    return {a: v for a, v in amounts.items() if v > 0}
