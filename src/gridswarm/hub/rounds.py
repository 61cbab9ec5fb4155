"""The round state machine, as pure functions of (round state, rules, clock).

A round is *pending* until its first assignment, *open* while nodes train, *secagg* while a
SecAgg run recovers the sum, and *closed* once aggregated (hub/states.py `RoundStatus`). It
closes when every assignment is in (and the quorum is met), or at its deadline with a quorum
(once the uploads that reached the hub by then are decided, for at most ARRIVING_GRACE_S). At
the deadline without a quorum it is re-planned: outstanding assignments are marked missed,
accepted contributions are kept, and the deadline moves on, so a run never gets stuck.
Assignments of nodes that stopped sending heartbeats count as missed at once.

Closing is decided in two steps: `decide` from the assignments, then, once audits and usefulness
screening have judged the contributions, `decide_after_screening`: a contribution rejected there
does not count towards the quorum, so a round left with fewer accepted contributions than its
quorum is re-planned (the accepted ones kept), never closed on too few.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus, RoundStatus

# how long past its deadline a round waits for uploads that reached the hub by the deadline and
# are still queued in it (a hub at 10,000 nodes takes tens of seconds to decide a round's
# uploads): the deadline is the nodes', not the hub's queue's; bounded, so that a stream of
# uploads cannot hold a round open
ARRIVING_GRACE_S = 30.0


class Decision(StrEnum):
    WAIT = "wait"
    CLOSE = "close"
    REPLAN = "replan"


@dataclass(frozen=True)
class RoundRules:
    quorum: int
    min_nodes: int
    max_nodes: int
    deadline_s: float
    liveness_s: float = 20.0
    # a SecAgg run's `privacy.secagg.stage_timeout_s`; None: the run does not use SecAgg (a
    # round due to close is screened at once, not opened for secure aggregation)
    secagg_stage_timeout_s: float | None = None


@dataclass(frozen=True)
class AssignmentState:
    node_id: str
    status: AssignmentStatus  # hub/states.py
    node_last_seen_at: float


@dataclass(frozen=True)
class RoundState:
    """A round's status and assignments. A *summary* (`outstanding` and `submitted` set, as
    hub/store/rounds.py reads it for 10,000-node rounds) lists only the outstanding assignments
    whose nodes have been silent for at least `liveness_s` (the only ones a rule may find lost)
    and counts the others; a full state lists them all (counts None)."""

    status: RoundStatus
    deadline_at: float | None
    assignments: tuple[AssignmentState, ...]
    outstanding: int | None = None  # assignments `assigned`; None: counted from `assignments`
    submitted: int | None = None  # assignments `submitted`; None: counted from `assignments`
    # uploads the hub received by the deadline and is still deciding (its own queue)
    arriving: int = 0

    @property
    def n_submitted(self) -> int:
        if self.submitted is not None:
            return self.submitted
        return sum(a.status == AssignmentStatus.SUBMITTED for a in self.assignments)

    @property
    def n_outstanding(self) -> int:
        if self.outstanding is not None:
            return self.outstanding
        return sum(a.status == AssignmentStatus.ASSIGNED for a in self.assignments)


def lost_assignments(state: RoundState, rules: RoundRules, now_s: float) -> list[str]:
    """Nodes whose assignment is outstanding but who have not been heard from within liveness_s."""
    return [
        a.node_id
        for a in state.assignments
        if a.status == AssignmentStatus.ASSIGNED and now_s - a.node_last_seen_at > rules.liveness_s
    ]


def decide(state: RoundState, rules: RoundRules, now_s: float) -> Decision:
    """What the hub should do with an open round now."""
    if state.status != RoundStatus.OPEN:
        return Decision.WAIT
    quorum_met = state.n_submitted >= rules.quorum
    if quorum_met and not state.n_outstanding:
        return Decision.CLOSE
    if state.deadline_at is not None and now_s >= state.deadline_at:
        if state.arriving and now_s < state.deadline_at + ARRIVING_GRACE_S:
            return Decision.WAIT  # work that reached the hub in time is still being decided
        return Decision.CLOSE if quorum_met else Decision.REPLAN
    return Decision.WAIT


@dataclass(frozen=True)
class Screening:
    """A round's contributions of this attempt after screening, just before it would close."""

    accepted: int  # still accepted: they would be aggregated
    rejected: int  # rejected by audits or usefulness screening (now or by pre-screening)
    dropped: int = 0  # SecAgg: advertised but missing from the recovered sum (within t)


def decide_after_screening(screening: Screening, rules: RoundRules) -> Decision:
    """The last step of a CLOSE decision: CLOSE only if the contributions that survived
    screening still make the quorum, else REPLAN. SecAgg dropouts within the protocol's
    tolerance count as the quorum they were when the round's participants were fixed: the
    sum is recovered without them by design, and a re-plan would throw it away."""
    if screening.accepted + screening.dropped >= rules.quorum:
        return Decision.CLOSE
    return Decision.REPLAN


def budget_reason(
    rounds_budget: int | None, tokens_budget: int | None, version: int, tokens_total: int
) -> str | None:
    """Why the run is finished once `version` is published with `tokens_total` trained (the
    run's `budget.rounds` / `budget.tokens`), None to go on. The privacy budget is the other
    reason a run finishes (hub/privacy.py `stop_reason`)."""
    if rounds_budget is not None and version >= rounds_budget:
        return f"budget.rounds reached: {version} of {rounds_budget} rounds"
    if tokens_budget is not None and tokens_total >= tokens_budget:
        return f"budget.tokens reached: {tokens_total} of {tokens_budget} tokens"
    return None


def may_assign(
    state: RoundState, rules: RoundRules, node_id: str, live_nodes: int, now_s: float
) -> str | None:
    """None if `node_id` may get an assignment in this round now, else the reason it may not
    (from a full state: a summary does not list who holds a place)."""
    if state.outstanding is not None or state.submitted is not None:
        raise ValueError("may_assign needs the round's full state, not a summary")
    mine = any(a.node_id == node_id and a.status in HOLDS_PLACE for a in state.assignments)
    active = sum(a.status in HOLDS_PLACE for a in state.assignments)
    return may_take_seat(state.status, mine, active, rules, live_nodes)


def may_take_seat(
    status: RoundStatus, has_seat: bool, active: int, rules: RoundRules, live_nodes: int
) -> str | None:
    """`may_assign` from counts: the round's status, whether the node already holds a place
    (assigned or submitted), how many places are taken, how many nodes are live. The hub asks
    this on every request for work, so it reads two counts instead of the round's rows."""
    if status == RoundStatus.CLOSED:
        return "round closed"
    if has_seat:
        return "already assigned this round"
    if active >= rules.max_nodes:
        return "round is full"
    if status == RoundStatus.PENDING and live_nodes < rules.min_nodes:
        return f"waiting for {rules.min_nodes} live nodes ({live_nodes} now)"
    return None
