"""Trust in live rounds: the hub's ledger, replay audits, usefulness, reputation and rewards.

The I/O side of `gridswarm.trust` (pure rules) and `gridswarm.ledger` (the log), called by
`HubService` inside its own transaction and lock, so a ledger entry commits together with the
state change it records (or not at all):

- `open_round`         a round opens: commit to a secret audit seed (sha256 on the ledger)
- `admission`          before work is assigned: caught cheaters (and keys no longer invited) are
                       excluded; nodes that have worked go first, then by reputation; never-
                       worked nodes hold at most `round.max_newcomer_share` of the places
- `energy_facts`       an upload arrives (plain or SecAgg): what the energy floor of
                       hub/acceptance.py compares its report with (the round engine decides)
- `refuse_upload`      the round engine refused it: a false work claim (tokens, steps) or an
                       under-reported energy goes on the ledger with its reason, and costs a
                       strike
- `screen_submission`  a plain upload: the node's signed claim must be its own and say what the
                       upload says; no replayed update. Refusals go on the ledger, with a strike
- `record_submission`  the upload is stored: the node's claim goes on the ledger as it signed it
- `screen_round`       before aggregation: replay the seed-chosen share p of contributions bit for
                       bit, score usefulness on held-out data; mismatches are rejected, excluded
                       from aggregation, recorded and slashed
- `settle_round`       with the new version: reveal the seed, record verdicts, split the round's
                       pool from the run's escrow, update reputations (one read of the round's
                       facts, `trust/settlement.py` `settle` decides, one write of its result)

Under secure aggregation the hub never sees one node's update, so neither audits nor usefulness
apply per node there: contributions are paid by tokens alone (said in each verdict).

The statements on the hub's tables are `hub/store/trust.py`'s (settlement's read and write
among them); this module decides, and keeps the ledger, the replays and the requests.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Annotated, Any, NoReturn

import torch
from fastapi import Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gridswarm.blobs import LocalBlobStore
from gridswarm.config import RunConfig
from gridswarm.energy.meter import lookup_cpu_power
from gridswarm.hub import models as m
from gridswarm.hub.acceptance import EnergyFacts, UploadRefused
from gridswarm.hub.errors import HubError
from gridswarm.hub.limits import check_sponsor
from gridswarm.hub.openapi import RunIdParam, openapi_body
from gridswarm.hub.registration import check_invited
from gridswarm.hub.rounds import Screening
from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus, ContributionStatus, RoundStatus
from gridswarm.hub.store.contributions import assignment_row, assignments_by_id, run_contributions
from gridswarm.hub.store.locks import lock_run
from gridswarm.hub.store.nodes import node_row
from gridswarm.hub.store.registration import newcomers_placed, proven_nodes
from gridswarm.hub.store.runs import round_row, run_row
from gridswarm.hub.store.trust import (
    add_trust_round,
    apply_settlement,
    contribution_facts,
    contributions_by_id,
    flush_verdicts,
    others_recent_speeds,
    read_reputation,
    read_reputations,
    read_settlement,
    round_contributions,
    trust_round,
    unaudited_contributions,
    write_reputation,
)
from gridswarm.hub.store.versions import version_row
from gridswarm.hub.upload_facts import ENERGY_WINDOW, EnergyWindow, ReplayIndex
from gridswarm.identity import Identity, node_id_from_public_key
from gridswarm.ledger.balances import RunEscrow, run_escrow
from gridswarm.ledger.chain import Entry, LedgerError, SignedClaim
from gridswarm.ledger.log import DuplicateClaimError, HubItem, Ledger
from gridswarm.ledger.ops import ledger_show, node_balance, payout_addresses, reward_claim_for
from gridswarm.protocol import (
    API,
    MAX_ESCROW_UNITS,
    MAX_FUND_UNITS,
    MAX_JSON_BYTES,
    NODE_ID_PATTERN,
    Refusal,
    SignedClaimBody,
    describe_errors,
)
from gridswarm.train.codecs import make_codec
from gridswarm.train.device import device_class
from gridswarm.train.params import unpack, unpack_vector
from gridswarm.train.workload import Workload
from gridswarm.trust.audit import is_audited, seed_commitment
from gridswarm.trust.claims import (
    ClaimError,
    check_claim,
    claim_payload,
)
from gridswarm.trust.policy import (
    EXCLUDED,
    audit_probability,
    audit_skip_reason,
    check_harm,
    may_select,
    newcomer_places,
    newcomer_refusal,
    secure_aggregation,
)
from gridswarm.trust.reputation import Reputation, RoundOutcome, update_reputation
from gridswarm.trust.settlement import (
    reputation_payload,
    settle,
    settlement_policy,
    verdict_payload,
)
from gridswarm.trust.tolerance import (
    Calibration,
    ReplayMatch,
    judge,
    relative_l2,
    replay_match,
    tolerance,
)

log = logging.getLogger("gridswarm.hub.trust")
MAX_REPLAY_THREADS = 64
PRESCREEN_BATCH = 32  # contributions `prescreen` reads at a time
# a pending round is left to nodes that have worked for this long after the previous close (or
# the run's creation) when enough of them wait for a place; then anyone may open it
PENDING_GRACE_S = 15.0
PAYOUT_KIND = "payout_address"
KIND_CALIBRATION = "audit_calibration"  # honest rerun distances per (run, device class)
# Session.info keys: what one transaction of asks learnt for the newcomer cap (`admission`)
_INFO_WORKED = "gridswarm.trust.worked"  # node id -> has worked on this hub
_INFO_NEWCOMERS_FULL = "gridswarm.trust.newcomers_full"  # (run, round) -> newcomers placed


@dataclass(frozen=True)
class Screened:
    """What `screen_submission` learnt about an upload it let through."""

    update_sha256: str
    claim: SignedClaim | None


@dataclass(frozen=True)
class Examination:
    """What auditing and scoring one contribution found (`reason`: why it is rejected)."""

    audit_rate: float
    audited: bool
    audit_passed: bool | None
    loss_drop: float | None
    reason: str | None
    note: str | None = None  # how it passed, or why it was not audited (for the verdict)
    calibration: Calibration | None = None  # extended by this audit's honest rerun pair


class HubTrust:
    """The hub's trust machinery over its database, blob store and signing key."""

    def __init__(
        self,
        engine: Engine,
        blobs: LocalBlobStore,
        identity: Identity,
        lock: threading.RLock | None = None,
        clock: Callable[[], float] = time.time,
        sponsors: frozenset[str] | None = None,
        node_invites: frozenset[str] | None = None,
    ) -> None:
        self.identity = identity
        self.sponsors = sponsors  # who may fund runs (hub/limits.py); None: anyone
        self.node_invites = node_invites  # who may work (hub/registration.py); None: anyone
        self.ledger = Ledger(engine, identity)
        self.blobs = blobs
        self.lock = lock or threading.RLock()
        self.clock = clock
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._calibrations: dict[str, dict[str, Calibration]] = {}  # run -> device -> calibration
        self._device_workloads: dict[tuple[str, str], Workload] = {}  # replays on accelerators

    # ------------------------------------------------------------------ ledger plumbing

    def append(self, s: Session, items: Iterable[HubItem | SignedClaim]) -> list[Entry]:
        """Append in the caller's transaction (claims in `items` are already checked)."""
        sealed = self.ledger.append_many(items, conn=s.connection(), signatures_checked=True)
        return [e for e in sealed if e.kind not in ("genesis", "checkpoint")]

    def ensure_genesis(self) -> None:
        """Write the genesis entry (naming the hub key) if the ledger is empty."""
        with self.lock, self.sessions() as s:
            if self.ledger.head() is None:
                self.append(s, [("hub", {"hub": self.identity.public_key.hex(), "event": "start"})])
                s.commit()

    # ------------------------------------------------------------------ reputation

    def _update_reputation(
        self, s: Session, node_id: str, outcome: RoundOutcome
    ) -> tuple[Reputation, Reputation]:
        before = read_reputation(s, node_id)
        after = update_reputation(before, outcome)
        write_reputation(s, node_id, after, self.clock())
        return before, after

    def _forfeit_items(
        self, run_id: str, node_id: str, reason: str, cfg: RunConfig
    ) -> list[HubItem]:
        """A caught node loses what it earned and has not yet been paid (docs/ledger.md)."""
        if not cfg.trust.forfeit_on_strike:
            return []
        available = self.ledger.balances().available(node_id)
        if available <= 0:
            return []
        return [
            (
                "slash",
                {"run_id": run_id, "account": node_id, "amount_units": available, "reason": reason},
            )
        ]

    # ------------------------------------------------------------------ rounds open

    def open_round(self, s: Session, run: m.Run, rnd: m.Round) -> None:
        """A round opens: draw its secret audit seed once and put its sha256 on the ledger."""
        row = trust_round(s, run.id, rnd.number)
        if row is None:
            seed = secrets.token_bytes(32)
            row = add_trust_round(
                s, run.id, rnd.number, seed.hex(), seed_commitment(seed), self.clock()
            )
        payload = {
            "run_id": run.id,
            "round": rnd.number,
            "event": "open",
            "attempt": rnd.attempt,
            "base_version": rnd.base_version,
            "audit_commitment": row.commitment,
        }
        self.append(s, [("round", payload)])

    def admission(
        self,
        s: Session,
        node_id: str,
        rnd: m.Round,
        slots_left: int,
        n_competitors: int,
        competitor_ids: Callable[[], Sequence[str]],
    ) -> str | None:
        """None if `node_id` may take one of `slots_left` places in round `rnd`, a reason to
        wait otherwise; raises HubError(403) for a node excluded for cheating, or one no longer
        on the hub's invite list.

        Competitors are the other live nodes without a place yet (`n_competitors` of them).
        Nodes that have worked on this hub go before never-worked ones, then by reputation
        (trust/policy.py `may_select`). A pending round admits anyone not excluded, so a round
        always gets started, except that for its first PENDING_GRACE_S a never-worked node
        leaves it to the worked nodes waiting for a place (they are woken by the close and
        ask at once; a flood of new keys would otherwise win the race for the opening seat).
        While fewer nodes compete than places are left nobody can outrank the node, so only
        its own record is read (the common case: no per-request work that grows with the
        swarm).

        Then the newcomer cap (`round.max_newcomer_share`, `_newcomer_wait`): a never-worked
        node waits while the round's never-worked places are all taken; a node that has worked
        is never held back by it."""
        if self.node_invites is not None:
            node = node_row(s, node_id)
            check_invited(self.node_invites, node.public_key if node else "")
        pending = rnd.status != RoundStatus.OPEN
        competitors: list[str] = []
        worked: set[str] = set()
        self_worked: bool | None = None  # read only where a rule needs it
        if n_competitors >= slots_left:
            # a pending round: anyone may open it, but in its grace a never-worked node waits
            # for the worked ones
            grace = pending and self._pending_since_s(s, rnd) is not None
            if grace:
                self_worked = self._worked(s, node_id)
            if not (pending and (not grace or self_worked)):
                competitors = [n for n in competitor_ids() if n != node_id]
                worked = proven_nodes(s, [node_id, *competitors])
                self_worked = node_id in worked
                if pending:
                    competitors = [n for n in competitors if n in worked]
        reps = read_reputations(s, [node_id, *competitors])
        reason = may_select(
            reps[node_id],
            [reps[n] for n in competitors],
            slots_left,
            worked=node_id in worked,
            competitors_worked=[n in worked for n in competitors],
        )
        if reason == EXCLUDED:
            raise HubError(403, f"node {node_id} is {EXCLUDED}", Refusal.EXCLUDED)
        if reason is None:
            reason = self._newcomer_wait(s, node_id, rnd, slots_left, self_worked)
        return reason

    @staticmethod
    def _worked(s: Session, node_id: str) -> bool:
        """Whether `node_id` has worked on this hub (`_worked_many`)."""
        return HubTrust._worked_many(s, [node_id])[0]

    @staticmethod
    def _worked_many(s: Session, node_ids: Sequence[str]) -> list[bool]:
        """Whether each of `node_ids` has worked on this hub, each read once per transaction
        (`Session.info`; one query for those not known yet): a node's record changes only when
        a round closes, in another transaction."""
        known: dict[str, bool] = s.info.setdefault(_INFO_WORKED, {})
        unknown = [n for n in dict.fromkeys(node_ids) if n not in known]
        if unknown:
            proven = proven_nodes(s, unknown)
            known.update((n, n in proven) for n in unknown)
        return [known[n] for n in node_ids]

    def _newcomer_wait(
        self, s: Session, node_id: str, rnd: m.Round, slots_left: int, worked: bool | None
    ) -> str | None:
        """Why `node_id` waits under the run's newcomer cap (trust/policy.py `newcomer_places`,
        `newcomer_refusal`), else None.

        Cheap first: nothing is read while fewer places are taken than newcomers may hold
        (always so with the default share 1.0), nor for a node that has worked. Otherwise one
        count of the round's stored places held by never-worked nodes, plus those this
        transaction gave and has not flushed (a batch of asks, hub/asks.py
        `_decide_asks`, writes its assignments at commit). Within one transaction of asks the
        count only grows (asks take places, never free them), so once the newcomer places are
        full the later newcomers of the batch wait without a read (`Session.info`)."""
        run = run_row(s, rnd.run_id)  # loaded and locked by the caller: no read
        cfg = run.settings()  # parsed once per process
        places = newcomer_places(cfg.round.max_newcomer_share, cfg.round.max_nodes)
        if cfg.round.max_nodes - slots_left < places:
            return None
        if worked is None:
            worked = self._worked(s, node_id)
        else:
            s.info.setdefault(_INFO_WORKED, {})[node_id] = worked
        if worked:
            return None
        full: dict[tuple[str, int], int] = s.info.setdefault(_INFO_NEWCOMERS_FULL, {})
        key = (rnd.run_id, rnd.number)
        placed = full.get(key)
        if placed is None:
            unflushed = [
                a.node_id
                for a in s.new
                if isinstance(a, m.Assignment)
                and a.run_id == rnd.run_id
                and a.round == rnd.number
                and a.status in HOLDS_PLACE
            ]
            placed = newcomers_placed(s, rnd.run_id, rnd.number)
            placed += sum(not w for w in self._worked_many(s, unflushed))
        reason = newcomer_refusal(False, placed, places)
        if reason is not None:
            full[key] = placed
            log.debug("run %s round %d: %s waits: %s", rnd.run_id, rnd.number, node_id, reason)
        return reason

    def _pending_since_s(self, s: Session, rnd: m.Round) -> float | None:
        """Seconds the pending round `rnd` has waited for its first node (since the previous
        round closed, or the run was created), or None once that is PENDING_GRACE_S or more."""
        before = round_row(s, rnd.run_id, rnd.number - 1) if rnd.number > 0 else None
        if before is not None and before.closed_at is not None:
            since = before.closed_at
        else:
            run = run_row(s, rnd.run_id)
            since = run.created_at if run is not None else 0.0
        waited_s = self.clock() - since
        return waited_s if 0 <= waited_s < PENDING_GRACE_S else None

    # ------------------------------------------------------------------ submissions

    def refuse_upload(
        self,
        s: Session,
        run: m.Run,
        cfg: RunConfig | None,
        node_id: str,
        assignment: m.Assignment,
        refused: UploadRefused,
    ) -> NoReturn:
        """An upload the round engine refused (hub/engine.py `Arrived`, by the checks of
        hub/acceptance.py): a refusal that is a strike goes on the ledger (a verdict, a strike,
        a forfeit) and is committed with it; then the refusal is raised, typed. The caller
        holds the service lock and its transaction `s` (with the engine's MarkLate written,
        if any)."""
        if refused.strike and cfg is not None:  # a strike is a claim's: the settings are read
            # commits the verdict and the strike with the refusal
            with suppress(HubError):
                self.refuse(
                    s,
                    run,
                    cfg,
                    node_id,
                    assignment,
                    refused.status,
                    refused.ledger_reason,
                    refused.reason,
                )
        raise HubError(refused.status, refused.detail, refused.reason)

    @staticmethod
    def energy_facts(
        s: Session, run: m.Run, node: m.Node, window: EnergyWindow | None = None
    ) -> EnergyFacts:
        """The node's CPU power per core (its reported hardware) and the fastest tokens/s of
        the run's other nodes over their last ENERGY_WINDOW contributions: from `window` (the
        run's newest contributions, read once for a batch of uploads, hub/upload_facts.py)
        when it can tell, else by a query of its own."""
        cpu = json.loads(node.hardware_json or "{}").get("cpu", "unknown")
        w_per_core, _ = lookup_cpu_power(str(cpu))
        known, fastest = window.fastest_other(node.id) if window is not None else (False, None)
        if not known:
            others = others_recent_speeds(s, run.id, node.id, ENERGY_WINDOW)
            fastest = max((t / d for t, d in others if d > 0), default=None)
        return EnergyFacts(w_per_core, fastest)

    def screen_submission(
        self,
        s: Session,
        run: m.Run,
        cfg: RunConfig,
        node: m.Node,
        assignment: m.Assignment,
        meta: dict[str, Any],
        digest: str,
        zero: bool,
        replays: ReplayIndex | None = None,
    ) -> Screened:
        """After the round engine accepted it (`Arrived`), what only a plain upload can show:
        the node's signed claim over the update's digest (`claims.update_sha256`, computed by
        the caller outside any lock), and no replayed update (an all-zero update, `zero`, may
        repeat); refuse (on the ledger) or pass. `replays`: the run's contributions with the
        batch's update digests, read once for a batch of uploads (hub/upload_facts.py);
        None: queried here."""
        claim = None
        if meta.get("claim") is not None:
            expected = claim_payload(run.id, assignment.round, assignment.id, digest, meta)
            try:
                claim = check_claim(meta["claim"], bytes.fromhex(node.public_key), expected)
            except ClaimError as exc:
                status = 403 if exc.forged else 400
                self.refuse(s, run, cfg, node.id, assignment, status, str(exc), Refusal.BAD_CLAIM)
        if not zero:
            if replays is None:
                replays = ReplayIndex.read(s, run.id, [digest])
            prior = replays.replayed(digest, node.id, assignment.round)
            if prior is not None:
                self.refuse(
                    s,
                    run,
                    cfg,
                    node.id,
                    assignment,
                    409,
                    f"replay: the same update as contribution {prior.id[:16]} of node "
                    f"{prior.node_id} in round {prior.round}",
                    Refusal.REPLAYED_UPDATE,
                )
        return Screened(digest, claim)

    def refuse(
        self,
        s: Session,
        run: m.Run,
        cfg: RunConfig,
        node_id: str,
        assignment: m.Assignment,
        status: int,
        reason: str,
        code: Refusal,
    ) -> None:
        """Record a refused upload on the ledger (verdict, strike, forfeit), commit, raise."""
        _, after = self._update_reputation(s, node_id, RoundOutcome(delivered=True, rejected=True))
        items: list[HubItem] = [
            (
                "verdict",
                {
                    "run_id": run.id,
                    "round": assignment.round,
                    "node": node_id,
                    "assignment_id": assignment.id,
                    "stage": "submit",
                    "accepted": False,
                    "reason": reason,
                },
            ),
            (
                "reputation",
                {
                    "run_id": run.id,
                    "round": assignment.round,
                    "nodes": {node_id: reputation_payload(after)},
                },
            ),
        ]
        items += self._forfeit_items(run.id, node_id, reason, cfg)
        self.append(s, items)
        s.commit()
        raise HubError(status, reason, code)

    def record_submission(self, s: Session, screened: Screened) -> dict[str, Any]:
        """The node's claim of an accepted upload on the ledger (in `s`'s transaction, before
        the upload's row is written), and the columns trust adds to that row
        (`store.rounds.apply_effects`' `contribution_columns`): its update digest, and the
        claim's ledger seq."""
        columns: dict[str, Any] = {"update_sha256": screened.update_sha256}
        if screened.claim is not None:
            try:
                (entry,) = self.append(s, [screened.claim])
            except DuplicateClaimError as exc:
                raise HubError(409, f"replay: {exc}", Refusal.REPLAYED_UPDATE) from exc
            columns["claim_seq"] = entry.seq
        return columns

    # ------------------------------------------------------------------ rounds close

    def _round_seed(self, s: Session, run: m.Run, rnd: m.Round) -> m.TrustRound:
        row = trust_round(s, run.id, rnd.number)
        if row is None:  # a round opened before the trust tables existed
            self.open_round(s, run, rnd)
            row = trust_round(s, run.id, rnd.number)
        return row

    def forget_cached(self) -> None:
        """Drop what was read from the ledger once (calibrations): another replica may have
        written more since (called when this replica takes over the ticker)."""
        self._calibrations.clear()

    def _calibration(self, run_id: str, device: str) -> Calibration:
        """The stored calibration of replays on `device` for this run (from the ledger once)."""
        if run_id not in self._calibrations:
            found: dict[str, Calibration] = {}
            for e in self.ledger.entries(kind=KIND_CALIBRATION):
                data = json.loads(e.payload_json)
                if data.get("run_id") == run_id:
                    found[data["device"]] = Calibration(
                        data["device"], float(data["honest_max"]), int(data["pairs"])
                    )
            self._calibrations[run_id] = found
        return self._calibrations[run_id].get(device, Calibration(device))

    @staticmethod
    def _replay_device(device: str) -> torch.device | None:
        """Where this hub can replay work done on `device`: the same class, or nowhere."""
        if device == "cpu":
            return torch.device("cpu")
        for i in range(torch.cuda.device_count()):
            if device_class(torch.device("cuda", i)) == device:
                return torch.device("cuda", i)
        return None

    def _workload_on(self, workload: Workload, run_id: str, device: torch.device) -> Workload:
        if device.type == "cpu":
            return workload
        key = (run_id, str(device))
        if key not in self._device_workloads:
            self._device_workloads[key] = Workload.from_config(workload.cfg).to(device)
        return self._device_workloads[key]

    def _rerun(
        self,
        workload: Workload,
        a: m.Assignment,
        node_id: str,
        theta: torch.Tensor,
        threads: int,
        micro_batch_size: int | None,
    ) -> torch.Tensor:
        """The assignment's pseudo-gradient as the run's codec delivers it, on `threads`."""
        cfg = workload.cfg
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, min(threads, MAX_REPLAY_THREADS)))
        try:
            result = workload.train(
                theta, a.round, node_id, a.inner_steps, a.attempt, None, micro_batch_size
            )
        finally:
            torch.set_num_threads(before)
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        return codec.decode(codec.encode(result.pseudo_gradient), result.pseudo_gradient.numel())

    def _replay(
        self,
        workload: Workload,
        cfg: RunConfig,
        c: m.Contribution,
        a: m.Assignment,
        theta: torch.Tensor,
        stored: dict[str, torch.Tensor],
        meta: dict[str, Any],
    ) -> tuple[str | None, str | None, Calibration | None]:
        """Redo the assignment from its version, slice and micro-batch size on the node's device
        class: bit for bit (CPU, with the node's thread count), or within the calibrated
        tolerance (trust/tolerance.py). Returns (why it fails or None, a note on how it passed,
        the calibration if this audit extended it)."""
        device = str(meta.get("device", "cpu"))
        micro = meta.get("micro_batch_size")
        micro = micro if isinstance(micro, int) and 0 < micro <= cfg.train.batch_size else None
        match = replay_match(cfg.trust.replay_match, device)
        where = (
            f"replay from version {a.base_version}, slice (round {a.round}, attempt {a.attempt}), "
            f"{a.inner_steps} steps on {device}"
        )
        on = self._workload_on(workload, c.run_id, self._replay_device(device))
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        threads = c.threads if match is ReplayMatch.EXACT else torch.get_num_threads()
        try:
            replay = self._rerun(on, a, c.node_id, theta, threads, micro)
        except FloatingPointError as exc:
            return f"audit failed: the replay diverged ({exc}), the upload did not", None, None
        upload = codec.decode(stored, replay.numel())
        if match is ReplayMatch.EXACT:
            differ = int((upload != replay).sum())
            if differ:
                return (
                    f"audit failed: {where}, {c.threads} thread(s), does not reproduce the update "
                    f"bit for bit ({differ} of {replay.numel()} values differ)",
                    None,
                    None,
                )
            return None, None, None
        cal = self._calibration(c.run_id, device)
        extended = None
        if not cal.settled:  # an honest rerun pair on this device class: other threads on a CPU
            other = 1 if threads > 1 else 2
            again = self._rerun(on, a, c.node_id, theta, other, micro)
            cal = extended = cal.with_pair(relative_l2(again, replay))
        t = cfg.trust
        distance = relative_l2(upload, replay)
        reason = judge(distance, cal, t.replay_tolerance_k, t.replay_tolerance_floor)
        if reason is not None:
            return f"audit failed: {where}: {reason}", None, extended
        limit = tolerance(cal, t.replay_tolerance_k, t.replay_tolerance_floor)
        return None, f"audited: within tolerance ({distance:.3g} <= {limit:.3g})", extended

    def _weights(self, digest: str) -> Callable[[], torch.Tensor]:
        """The flat weights in blob `digest`, read (and hash-checked) on the first call only."""
        loaded: list[torch.Tensor] = []

        def weights() -> torch.Tensor:
            if not loaded:
                loaded.append(unpack_vector(self.blobs.get(digest)))
            return loaded[0]

        return weights

    def _examine(
        self,
        cfg: RunConfig,
        numel: int,
        workload: Workload,
        base: m.Version,
        theta: Callable[[], torch.Tensor],
        c: m.Contribution,
        a: m.Assignment,
        rep: Reputation,
        seed: bytes,
        forced: bool,
    ) -> Examination:
        """Audit (if the seed picks it, or `forced`) and score one contribution; no writes.
        `theta`: the base version's weights, loaded on first call. The upload and the weights
        are read only when something needs them (a replay, its device, the usefulness score):
        a run that neither audits nor scores reads neither (two model-sized reads and hashes per
        upload, on the hub's cores while the other uploads arrive)."""
        skip = audit_skip_reason(cfg)
        stored: dict[str, torch.Tensor] = {}
        meta: dict[str, object] = {}
        if skip is None or cfg.trust.usefulness:
            stored, meta = unpack(self.blobs.get(c.id))
        device = str(meta.get("device", "cpu"))
        if skip is None and self._replay_device(device) is None:
            skip = f"no {device} device on the hub to replay on"
        rate = 1.0 if forced else audit_probability(rep, cfg.trust)
        audited = skip is None and (forced or is_audited(seed, c.id, rate))
        reason = passed = loss_drop = note = calibration = None
        if audited:
            reason, note, calibration = self._replay(workload, cfg, c, a, theta(), stored, meta)
            passed = reason is None
            if reason and forced:
                reason += "; the same update was uploaded by another node (a copy)"
        elif skip is not None and audit_skip_reason(cfg) is None:
            note = f"not audited: {skip}"
        if reason is None and cfg.trust.usefulness:
            codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
            fragment = workload.fragment(c.round)  # Streaming DiLoCo: the round's slice only
            if fragment is None:
                update = codec.decode(stored, numel)
            else:
                update = torch.zeros(numel)
                update[fragment[0] : fragment[1]] = codec.decode(stored, fragment[1] - fragment[0])
            loss_drop = base.val_loss - workload.evaluate(theta() - update)
            reason = check_harm(loss_drop, cfg.trust.harm_tolerance_nats)
        return Examination(
            0.0 if skip else rate, audited, passed, loss_drop, reason, note, calibration
        )

    def _apply(
        self,
        s: Session,
        run: m.Run,
        cfg: RunConfig,
        c: m.Contribution,
        a: m.Assignment | None,
        ex: Examination,
    ) -> None:
        c.audit_rate, c.audited, c.audit_passed = ex.audit_rate, ex.audited, ex.audit_passed
        c.loss_drop = ex.loss_drop
        if ex.calibration is not None:
            cal = ex.calibration
            self._calibrations.setdefault(run.id, {})[cal.device] = cal
            payload = {"run_id": run.id, "device": cal.device, "honest_max": cal.honest_max}
            self.append(s, [(KIND_CALIBRATION, payload | {"pairs": cal.pairs})])
        if ex.note is not None:
            c.verdict_reason = ex.note
        if ex.reason is not None:
            self._reject(s, run, cfg, c, a, ex.reason)

    def prescreen(self, workload_for: Callable[[str, str], Workload], budget_s: float = 2.0) -> int:
        """Audit and score contributions as they arrive (the hub's ticker calls this outside
        the service lock), so a round's close rarely waits for replays. Returns how many.

        A batch at a time: its rows read in one session (each run, round seed, base version
        and its weights once for the batch, not once per contribution), each contribution
        examined outside any lock within `budget_s`, then the verdicts written in one
        transaction under the lock. A batch ends at a rejection or an extended tolerance
        calibration: the next examinations judge by the node's reputation and the device's
        calibration, so they wait for the next tick's fresh reads. A contribution whose
        examination or writing fails is left for `screen_round` at close; the others go on."""
        started = time.monotonic()
        with self.sessions() as s:
            pending = unaudited_contributions(s, PRESCREEN_BATCH)
            if not pending:
                return 0
            assignments = {
                a.id: a for a in assignments_by_id(s, {c.assignment_id for c in pending})
            }
            reputations = read_reputations(s, sorted({c.node_id for c in pending}))
            runs = {c.run_id: run_row(s, c.run_id) for c in pending}
            seeds = {(c.run_id, c.round): trust_round(s, c.run_id, c.round) for c in pending}
            bases = {
                (c.run_id, c.base_version): version_row(s, c.run_id, c.base_version)
                for c in pending
            }
        weights = {key: self._weights(v.weights_blob) for key, v in bases.items() if v is not None}
        examined: list[tuple[m.Contribution, RunConfig, Examination]] = []
        for c in pending:
            if time.monotonic() - started > budget_s:
                break
            run, seed_row = runs[c.run_id], seeds[(c.run_id, c.round)]
            base = bases[(c.run_id, c.base_version)]
            try:
                cfg = run.settings()
                if secure_aggregation(cfg) or seed_row is None or base is None:
                    continue  # left to screen_round at close
                ex = self._examine(
                    cfg,
                    run.numel,
                    workload_for(run.id, run.config_json),
                    base,
                    weights[(c.run_id, c.base_version)],
                    c,
                    assignments[c.assignment_id],
                    reputations[c.node_id],
                    bytes.fromhex(seed_row.audit_seed),
                    False,
                )
            except Exception:  # never stall the ticker: screen_round redoes it at close
                log.exception("pre-screening contribution %s failed", c.id)
                continue
            examined.append((c, cfg, ex))
            if ex.calibration is not None or ex.reason is not None:
                break  # a reputation or a tolerance calibration changes: the next judged anew
        return self._write_prescreened(examined) if examined else 0

    def _write_prescreened(
        self, examined: list[tuple[m.Contribution, RunConfig, Examination]]
    ) -> int:
        """Write `prescreen`'s verdicts in one transaction; should that fail, each is written
        again in its own, so a contribution whose verdict cannot be written fails alone (it
        stays unaudited: `screen_round` judges it at close). Returns how many were written."""
        try:
            return self._write_verdicts(examined)
        except Exception:
            if len(examined) == 1:
                log.exception("writing the pre-screening of %s failed", examined[0][0].id)
                return 0
            done = 0
            for one in examined:
                try:
                    done += self._write_verdicts([one])
                except Exception:
                    log.exception("writing the pre-screening of %s failed", one[0].id)
            return done

    def _write_verdicts(self, examined: list[tuple[m.Contribution, RunConfig, Examination]]) -> int:
        """Under the lock, with the runs' rows locked: each contribution still accepted and
        not yet audited (a close, perhaps a replica's, may have screened it meanwhile) gets its
        verdict (`_apply`); one commit. Returns how many were written."""
        with self.lock, self.sessions() as s:
            # locked in id order (`replicas.lock_runs`): a close of these waits, or is done
            runs = {
                run_id: lock_run(s, run_id) for run_id in sorted({c.run_id for c, _, _ in examined})
            }
            fresh = {c.id: c for c in contributions_by_id(s, [c.id for c, _, _ in examined])}
            # held: the identity map keeps rows only while they are referred to
            rows = list(assignments_by_id(s, {c.assignment_id for c in fresh.values()}))
            done = 0
            for c, cfg, ex in examined:
                row = fresh.get(c.id)
                if (
                    row is None
                    or row.status != ContributionStatus.ACCEPTED
                    or row.audited is not None
                ):
                    continue  # a close (perhaps a replica's) screened it meanwhile
                self._apply(s, runs[row.run_id], cfg, row, assignment_row(s, row.assignment_id), ex)
                done += 1
            s.commit()
            del rows
        return done

    def screen_round(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        cfg: RunConfig,
        workload: Workload,
        base: m.Version,
    ) -> Screening:
        """Before aggregation: audit and score what `prescreen` has not yet; reject the bad.
        Identical updates from different nodes are all audited: the replay tells the author
        from the copier.

        Returns what is left of the round's contributions (`rounds.decide_after_screening`
        decides whether that still makes the quorum).
        """
        contributions = round_contributions(s, run.id, rnd.number)
        if secure_aggregation(cfg):
            for c in contributions:
                if c.audited is None:
                    c.audited, c.audit_rate = False, 0.0
                    c.verdict_reason = f"not audited: {audit_skip_reason(cfg)}"
            return self._screening(contributions)
        copies = Counter(c.update_sha256 for c in contributions if c.update_sha256)
        todo = [
            c
            for c in contributions
            if c.status == ContributionStatus.ACCEPTED
            and (c.audited is None or (copies[c.update_sha256] > 1 and not c.audited))
        ]
        if todo:
            seed = bytes.fromhex(self._round_seed(s, run, rnd).audit_seed)
            reps = read_reputations(s, [c.node_id for c in todo])
            theta = self._weights(base.weights_blob)
        for c in todo:
            a = assignment_row(s, c.assignment_id)
            forced = copies[c.update_sha256] > 1
            ex = self._examine(
                cfg, run.numel, workload, base, theta, c, a, reps[c.node_id], seed, forced
            )
            self._apply(s, run, cfg, c, a, ex)
        flush_verdicts(s)
        return self._screening(contributions)

    @staticmethod
    def _screening(contributions: Sequence[m.Contribution]) -> Screening:
        """Counts of the round's contributions by what screening (and SecAgg) left of them:
        accepted ones of earlier attempts are kept by a re-plan and count; a failed SecAgg
        attempt's are `discarded` and do not."""
        counts = Counter(c.status for c in contributions)
        return Screening(
            counts[ContributionStatus.ACCEPTED],
            counts[ContributionStatus.REJECTED],
            counts[ContributionStatus.DROPPED],
        )

    def _reject(
        self,
        s: Session,
        run: m.Run,
        cfg: RunConfig,
        c: m.Contribution,
        a: m.Assignment | None,
        reason: str,
    ) -> None:
        """Exclude a contribution from aggregation and pay: verdict, strike, forfeit."""
        c.status, c.verdict_reason = ContributionStatus.REJECTED, reason
        if a is not None:
            a.status = AssignmentStatus.REJECTED
        outcome = RoundOutcome(
            delivered=True, audit_passed=False if c.audited else None, rejected=True
        )
        _, after = self._update_reputation(s, c.node_id, outcome)
        items: list[HubItem] = [
            ("verdict", self._verdict(run, c) | {"reason": reason, "stage": "audit"}),
            (
                "reputation",
                {
                    "run_id": run.id,
                    "round": c.round,
                    "nodes": {c.node_id: reputation_payload(after)},
                },
            ),
        ]
        items += self._forfeit_items(run.id, c.node_id, reason, cfg)
        self.append(s, items)

    @staticmethod
    def _verdict(run: m.Run, c: m.Contribution) -> dict[str, Any]:
        return verdict_payload(run.id, contribution_facts(c))

    def escrow(self, run_id: str) -> RunEscrow:
        """The run's funding, payouts and returns, folded from the ledger."""
        kinds = ("fund", "reward", "slash")
        return run_escrow(chain(*(self.ledger.entries(kind=k) for k in kinds)), run_id)

    def settle_round(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        cfg: RunConfig,
        version: m.Version,
    ) -> None:
        """With the new version: verdicts, the reward split, reputations, the seed revealed.

        One read (`store.trust.read_settlement`), the pure decision (`trust/settlement.py`
        `settle`), one write (`store.trust.apply_settlement`), then the ledger items, all in the
        caller's transaction."""
        rows, seed_row, facts = read_settlement(
            s,
            run,
            rnd,
            cfg,
            version,
            lambda: self.escrow(run.id),
            lambda: self._round_seed(s, run, rnd),
        )
        settlement = settle(facts, settlement_policy(cfg))
        apply_settlement(s, rows, seed_row, settlement, self.clock)
        self.append(s, settlement.items)

    # ------------------------------------------------------------------ reads and requests

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's trust facts for `run_status` (key "trust")."""
        with self.sessions() as s:
            cfg = self._run(s, run_id).settings()
            rows = run_contributions(s, run_id)
            node_ids = sorted({c.node_id for c in rows})
            reps = read_reputations(s, node_ids)
        escrow = self.escrow(run_id)
        nodes: dict[str, dict[str, Any]] = {}
        for node_id in node_ids:
            mine = [c for c in rows if c.node_id == node_id]
            nodes[node_id] = {
                "earned_units": sum(c.reward_units or 0 for c in mine),
                "accepted": sum(c.status == ContributionStatus.ACCEPTED for c in mine),
                "rejected": sum(c.status == ContributionStatus.REJECTED for c in mine),
                "audited": sum(bool(c.audited) for c in mine),
                "reputation": round(reps[node_id].score, 4),
                "strikes": reps[node_id].strikes,
            }
        return {
            "audits": audit_skip_reason(cfg)
            or f"replay ({cfg.trust.replay_match}: bit-exact on "
            "CPU, within a calibrated tolerance on GPUs)",
            "audited": sum(bool(c.audited) for c in rows),
            "audits_failed": sum(c.audit_passed is False for c in rows),
            "rejected": sum(c.status == ContributionStatus.REJECTED for c in rows),
            "rejections": {
                c.id: c.verdict_reason for c in rows if c.status == ContributionStatus.REJECTED
            },
            "funded_units": escrow.funded_units,
            "rewarded_units": escrow.rewarded_units,
            "forfeited_units": escrow.forfeited_units,
            "escrow_units": escrow.available_units,
            "nodes": nodes,
        }

    @staticmethod
    def _run(s: Session, run_id: str) -> m.Run:
        run = run_row(s, run_id)
        if run is None:
            raise HubError(404, f"run {run_id} not found")
        return run

    @staticmethod
    def _parse_claim(data: Any, kind: str, requester_key: bytes) -> SignedClaim:
        if not isinstance(data, dict):
            raise HubError(422, f"malformed {kind} claim: expected a JSON object")
        try:
            claim = SignedClaim.from_dict(data)
            claim.check()
        except LedgerError as exc:
            raise HubError(400, f"{kind} claim refused: {exc}") from exc
        if claim.kind != kind:
            raise HubError(400, f"expected a {kind!r} claim, got {claim.kind!r}")
        if claim.author != requester_key:
            raise HubError(
                403,
                f"{kind} claim signed by {node_id_from_public_key(claim.author)}, "
                f"not by the requester {node_id_from_public_key(requester_key)}",
            )
        return claim

    def _append_claim(self, s: Session, claim: SignedClaim) -> Entry:
        try:
            (entry,) = self.append(s, [claim])
        except DuplicateClaimError as exc:
            raise HubError(409, f"replay: {exc}", Refusal.REPLAYED_REQUEST) from exc
        s.commit()
        return entry

    def fund(self, run_id: str, requester_key: bytes, data: Any) -> dict[str, Any]:
        """The run's sponsor puts its signed `fund` claim on the ledger (fills the escrow)."""
        check_sponsor(self.sponsors, requester_key)
        claim = self._parse_claim(data, "fund", requester_key)
        payload = claim.payload
        amount = payload.get("amount_units")
        if (
            not isinstance(amount, int)
            or isinstance(amount, bool)
            or not 0 < amount <= MAX_FUND_UNITS
        ):
            raise HubError(
                422, f"amount_units must be an integer in [1, {MAX_FUND_UNITS}], got {amount!r}"
            )
        if payload.get("run_id") != run_id:
            raise HubError(422, f"fund claim names run {payload.get('run_id')!r}, not {run_id}")
        with self.lock, self.sessions() as s:
            lock_run(s, run_id)  # two replicas funding at once: the escrow check sees both
            run = self._run(s, run_id)
            if run.sponsor_key != requester_key.hex():
                raise HubError(
                    403, f"only the sponsor of run {run_id} may fund it", Refusal.NOT_SPONSOR
                )
            funded = self.escrow(run_id).funded_units
            if funded + amount > MAX_ESCROW_UNITS:  # sums of rewards must fit 64-bit columns
                raise HubError(
                    422, f"run {run_id} would hold {funded + amount} units, over {MAX_ESCROW_UNITS}"
                )
            entry = self._append_claim(s, claim)
        return {"entry": entry.to_dict(), "escrow_units": self.escrow(run_id).available_units}

    def set_payout_address(self, requester_key: bytes, data: Any) -> dict[str, Any]:
        """A node names (signed) the EVM address its rewards are paid to."""
        from eth_utils import is_address, to_checksum_address

        claim = self._parse_claim(data, PAYOUT_KIND, requester_key)
        address = claim.payload.get("address")
        if not isinstance(address, str) or not is_address(address):
            raise HubError(422, f"address {address!r} is not an EVM address")
        if to_checksum_address(address) != address:
            raise HubError(422, f"address must be checksummed: {to_checksum_address(address)}")
        with self.lock, self.sessions() as s:
            node_id = node_id_from_public_key(requester_key)
            if node_row(s, node_id) is None:
                raise HubError(403, f"node {node_id} is not registered", Refusal.NOT_REGISTERED)
            entry = self._append_claim(s, claim)
        return {"entry": entry.to_dict()}

    def balance(self, node_id: str) -> dict[str, Any]:
        """A node's money on the ledger, its payout address and reputation."""
        addresses = payout_addresses(self.ledger)
        out = node_balance(self.ledger, node_id).to_dict()
        out["address"] = addresses.get(node_id)
        with self.sessions() as s:
            out["reputation"] = asdict(read_reputations(s, [node_id])[node_id])
        return out

    def show(self, start_seq: int, limit: int, kind: str | None) -> list[dict[str, Any]]:
        try:
            return ledger_show(self.ledger, start_seq=start_seq, limit=limit, kind=kind)
        except ValueError as exc:
            raise HubError(422, str(exc)) from exc

    def verify(self) -> dict[str, Any]:
        report = self.ledger.verify(hub_public_key=self.identity.public_key)
        return report.to_dict() | {"hub": self.identity.public_key.hex()}

    def reward_claim(self, address: str) -> dict[str, Any]:
        try:
            claim = reward_claim_for(self.ledger, address)
        except (LedgerError, ValueError) as exc:
            raise HubError(422, str(exc)) from exc
        if claim is None:
            raise HubError(404, f"no posted epoch pays {address}")
        return claim.to_dict()


def add_trust_routes(
    app: Any, service: Any, signed: Callable[..., Any], public_read: Callable[..., Any]
) -> None:
    """The ledger's HTTP API (reads are public, on the public reads' threads: `public_read`;
    writes are signed by whoever they act for)."""
    trust: HubTrust = service.trust

    def body_json(body: bytes) -> Any:
        try:
            return SignedClaimBody.model_validate_json(body).model_dump()
        except ValidationError as exc:
            raise HubError(422, f"malformed claim: {describe_errors(exc.errors())}") from exc

    @app.get(f"{API}/ledger")
    async def ledger_entries(
        start_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=0, le=5000)] = 50,
        kind: Annotated[str | None, Query(max_length=32)] = None,
    ) -> list:
        """Entries in order from `start_seq` (at most `limit`, optionally one kind)."""
        return await public_read(trust.show, start_seq, limit, kind)

    @app.get(f"{API}/ledger/verify")
    async def ledger_verify() -> dict:
        """Re-check the whole chain; `first_bad_seq` and `reason` name the first bad entry."""
        return await public_read(trust.verify)

    @app.get(f"{API}/ledger/reward-claims/{{address}}")
    async def reward_claim(address: Annotated[str, Path(max_length=64)]) -> dict:
        """Amount and Merkle proof for `address` in the latest posted epoch (EVM settlement)."""
        return await public_read(trust.reward_claim, address)

    @app.post(f"{API}/runs/{{run_id}}/fund", openapi_extra=openapi_body(SignedClaimBody))
    async def fund(run_id: RunIdParam, request: Request) -> dict:
        """The sponsor's signed `fund` claim; body: the claim as JSON (ledger.ops.fund_claim)."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        return await run_in_threadpool(trust.fund, run_id, verified.public_key, body_json(body))

    @app.post(f"{API}/nodes/payout-address", openapi_extra=openapi_body(SignedClaimBody))
    async def payout_address(request: Request) -> dict:
        """A node's signed `payout_address` claim (ledger.ops.payout_address_claim)."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        return await run_in_threadpool(
            trust.set_payout_address, verified.public_key, body_json(body)
        )

    @app.get(f"{API}/nodes/{{node_id}}/balance")
    async def balance(node_id: Annotated[str, Path(pattern=NODE_ID_PATTERN)]) -> dict:
        """Earned, slashed, paid and available units, payout address and reputation."""
        return await public_read(trust.balance, node_id)
