"""Whether the hub accepts an upload: one pure decision for every way a contribution arrives.

A plain upload (`Uploads.submit`) and a SecAgg advertisement (`HubPrivacy.advertise`) are the
same thing to the round engine: a node's claim of work done for one of its assignments. Both go
through `check_upload` (`check_place`, then `check_claims`), so neither path can skip a check the
other applies (a SecAgg upload used to skip the energy floor and the false-claim record). The
round engine composes them (hub/engine.py `Arrived`: `place_refusal`, then `check_claims`); the
hub reads the facts from its rows (`Uploads.accept_upload`); a refusal becomes a `HubError`
with its typed reason, and one with `strike` set also goes on the ledger (a verdict, a strike,
a forfeit: `HubTrust.refuse_upload`).

No check here depends on the time: a contribution is judged by its assignment, its run and its
claims, never by when it arrives (the round's deadline is the round engine's business, not a
reason to refuse work that is still wanted).

What needs the update itself (decoding it, finite values, the signed claim over its digest, a
replayed update) stays with the plain path: under SecAgg the hub never sees one node's update.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.states import AssignmentStatus, RoundStatus
from gridswarm.protocol import ContributionMeta, Refusal
from gridswarm.trust.claims import claimed_work_error
from gridswarm.trust.policy import check_energy, energy_floor_time_s


@dataclass(frozen=True)
class AssignmentFacts:
    """The assignment an upload names (its row)."""

    status: AssignmentStatus  # hub/states.py
    round: int
    inner_steps: int


@dataclass(frozen=True)
class RunFacts:
    """The run the upload is for and its current round."""

    id: str
    status: RunState
    status_reason: str | None
    round: int  # the run's current round number
    round_status: RoundStatus  # the current round's status


@dataclass(frozen=True)
class ClaimRules:
    """The run settings the claims are judged by (read only once the run is known to be
    active: a run whose stored settings no longer parse is refused as stale first)."""

    expected_codec: str  # the run's comm.codec, or the SecAgg wire codec
    tokens_per_step: int  # seq_len x batch_size
    batch_size: int
    energy_min_fraction: float  # trust.energy_min_fraction (0 turns the floor off)


@dataclass(frozen=True)
class ClaimFacts:
    """What the node claims about its work (the `ContributionMeta` fields the checks read)."""

    codec: str
    steps: int
    tokens: int
    train_time_s: float
    threads: int
    micro_batch_size: int | None
    energy_wh: float | None

    @classmethod
    def of(cls, meta: ContributionMeta) -> ClaimFacts:
        return cls(
            meta.codec,
            meta.steps,
            meta.tokens,
            meta.train_time_s,
            meta.threads,
            meta.micro_batch_size,
            meta.energy_wh,
        )


@dataclass(frozen=True)
class EnergyFacts:
    """What the energy floor compares a report with: the node's CPU power per core (from its
    reported hardware) and the fastest tokens/s another node of the run achieved, if any."""

    w_per_core: float
    fastest_tokens_per_s: float | None


@dataclass(frozen=True)
class UploadRefused:
    """Why an upload is refused: HTTP status, typed reason and words. `strike`: the node is
    held to it (the ledger records a verdict and a strike); `mark_late`: its assignment was
    still outstanding for a round that has moved on, and is now `late`."""

    status: int
    reason: Refusal
    detail: str
    strike: bool = False
    mark_late: bool = False

    @property
    def ledger_reason(self) -> str:
        """The verdict's reason on the ledger."""
        return f"false claim: {self.detail}" if self.reason is Refusal.FALSE_CLAIM else self.detail


def check_upload(
    assignment: AssignmentFacts,
    run: RunFacts,
    claim: ClaimFacts,
    rules: ClaimRules,
    energy: EnergyFacts,
) -> UploadRefused | None:
    """None if the upload may be stored, else why not: `check_place`, then `check_claims`.
    The order is fixed, so a retried upload learns `duplicate` before anything else, and a late
    one `stale` before its claims are judged: only an upload the round still wants can earn a
    strike."""
    return check_place(assignment, run) or check_claims(assignment, claim, rules, energy)


def check_place(assignment: AssignmentFacts, run: RunFacts) -> UploadRefused | None:
    """Does the round still want this assignment's upload? Duplicate, or stale (the run is not
    active, the assignment is not outstanding, or its round is not the run's open round)."""
    if assignment.status == AssignmentStatus.SUBMITTED:
        return UploadRefused(
            409, Refusal.DUPLICATE, "duplicate: this assignment already has a contribution"
        )
    if run.status != RunState.ACTIVE:
        why = f": {run.status_reason}" if run.status_reason else ""
        return UploadRefused(409, Refusal.STALE, f"stale: run {run.id} is {run.status}{why}")
    current = assignment.round == run.round
    if (
        assignment.status != AssignmentStatus.ASSIGNED
        or not current
        or run.round_status != RoundStatus.OPEN
    ):
        late = assignment.status == AssignmentStatus.ASSIGNED and not current
        return UploadRefused(
            409,
            Refusal.STALE,
            f"stale: assignment for round {assignment.round} is "
            f"{'late' if late else assignment.status}; the run is at round {run.round} "
            f"({run.round_status}); late contributions are rejected",
            mark_late=late,
        )
    return None


def check_claims(
    assignment: AssignmentFacts, claim: ClaimFacts, rules: ClaimRules, energy: EnergyFacts
) -> UploadRefused | None:
    """Are the node's claims possible? Its codec, steps and tokens for the assignment (a false
    work claim is a strike), micro-batch size, and an energy report not under the floor of the
    meter model (a strike)."""
    if claim.codec != rules.expected_codec:
        return UploadRefused(
            400,
            Refusal.MALFORMED,
            f"codec {claim.codec!r} does not match the run's {rules.expected_codec!r}",
        )
    work_error = claimed_work_error(
        claim.steps, claim.tokens, assignment.inner_steps, rules.tokens_per_step
    )
    if work_error:
        return UploadRefused(400, Refusal.FALSE_CLAIM, work_error, strike=True)
    if claim.micro_batch_size is not None and claim.micro_batch_size > rules.batch_size:
        return UploadRefused(
            400,
            Refusal.MALFORMED,
            f"micro_batch_size {claim.micro_batch_size} exceeds the run's batch_size "
            f"{rules.batch_size}",
        )
    compute_s = energy_floor_time_s(claim.train_time_s, claim.tokens, energy.fastest_tokens_per_s)
    floor = check_energy(
        claim.energy_wh, claim.threads, energy.w_per_core, compute_s, rules.energy_min_fraction
    )
    if floor:
        return UploadRefused(400, Refusal.ENERGY_FLOOR, floor, strike=True)
    return None
