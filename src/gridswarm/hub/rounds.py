"""The round state machine, as pure functions of (round state, rules, clock).

A round is *pending* until its first assignment, *open* while nodes train, and *closed* once
aggregated. It closes when every assignment is in (and the quorum is met), or at its deadline with
a quorum. At the deadline without a quorum it is re-planned: outstanding assignments are marked
missed, accepted contributions are kept, and the deadline moves on, so a run never gets stuck.
Assignments of nodes that stopped sending heartbeats count as missed at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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


@dataclass(frozen=True)
class AssignmentState:
    node_id: str
    status: str  # assigned | submitted | missed | released | late
    node_last_seen_at: float


@dataclass(frozen=True)
class RoundState:
    status: str  # pending | open | closed
    deadline_at: float | None
    assignments: tuple[AssignmentState, ...]

    @property
    def n_submitted(self) -> int:
        return sum(a.status == "submitted" for a in self.assignments)


def lost_assignments(state: RoundState, rules: RoundRules, now_s: float) -> list[str]:
    """Nodes whose assignment is outstanding but who have not been heard from within liveness_s."""
    return [
        a.node_id
        for a in state.assignments
        if a.status == "assigned" and now_s - a.node_last_seen_at > rules.liveness_s
    ]


def decide(state: RoundState, rules: RoundRules, now_s: float) -> Decision:
    """What the hub should do with an open round now."""
    if state.status != "open":
        return Decision.WAIT
    outstanding = [a for a in state.assignments if a.status == "assigned"]
    quorum_met = state.n_submitted >= rules.quorum
    if quorum_met and not outstanding:
        return Decision.CLOSE
    if state.deadline_at is not None and now_s >= state.deadline_at:
        return Decision.CLOSE if quorum_met else Decision.REPLAN
    return Decision.WAIT


def may_assign(
    state: RoundState, rules: RoundRules, node_id: str, live_nodes: int, now_s: float
) -> str | None:
    """None if `node_id` may get an assignment in this round now, else the reason it may not."""
    mine = any(
        a.node_id == node_id and a.status in ("assigned", "submitted") for a in state.assignments
    )
    active = sum(a.status in ("assigned", "submitted") for a in state.assignments)
    return may_take_seat(state.status, mine, active, rules, live_nodes)


def may_take_seat(
    status: str, has_seat: bool, active: int, rules: RoundRules, live_nodes: int
) -> str | None:
    """`may_assign` from counts: the round's status, whether the node already holds a place
    (assigned or submitted), how many places are taken, how many nodes are live. The hub asks
    this on every request for work, so it reads two counts instead of the round's rows."""
    if status == "closed":
        return "round closed"
    if has_seat:
        return "already assigned this round"
    if active >= rules.max_nodes:
        return "round is full"
    if status == "pending" and live_nodes < rules.min_nodes:
        return f"waiting for {rules.min_nodes} live nodes ({live_nodes} now)"
    return None
