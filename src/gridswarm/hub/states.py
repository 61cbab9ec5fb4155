"""The statuses of a round, an assignment and a contribution, typed, and the groups of them
the hub asks about. (A run's states are `hub/lifecycle.py` `RunState`.)

Each is a `StrEnum`: a member compares equal to, hashes like and is stored as its string value,
so the database columns (String(16)) and the JSON answers hold the same words as before.

Round (one row per run and round number; `attempt` counts re-plans):

    pending --first assignment--> open --decide: CLOSE--> closed                (plain runs)
    open --decide: CLOSE--> secagg --sum recovered--> closed                    (SecAgg runs)
    open --decide: REPLAN, nothing kept--> pending   (deadline without quorum; with accepted
                                                      contributions kept it stays open)
    secagg --too many dropouts--> pending            (the attempt's work discarded, retrained)

Assignment (a node's place in one attempt of a round):

    assigned --upload accepted--> submitted --screening rejects it--> rejected
    assigned --deadline, node lost, re-plan, SecAgg fixes participants--> missed
    assigned --node left or registered again, run left active--> released
    assigned --node reports a failure--> failed
    assigned --upload refused as too late--> late
    assigned | submitted --SecAgg attempt fails--> discarded

Contribution (an accepted upload):

    (upload) --> accepted --audit or usefulness screening--> rejected
    accepted --SecAgg: missing from the recovered sum--> dropped
    any --SecAgg attempt fails--> discarded      (every contribution of the round's attempts)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class RoundStatus(StrEnum):
    PENDING = "pending"  # no node has started it: created, re-planned empty, or SecAgg failed
    OPEN = "open"  # nodes train: the first assignment opened it, its deadline runs
    SECAGG = "secagg"  # training closed; the SecAgg stages recover the sum (no new work)
    CLOSED = "closed"  # aggregated and its version published (final)


class AssignmentStatus(StrEnum):
    ASSIGNED = "assigned"  # handed out, the node trains: the only state an upload is taken in
    SUBMITTED = "submitted"  # its upload was accepted (plain or SecAgg advertise)
    MISSED = "missed"  # deadline passed, node went silent, or SecAgg fixed the participants
    RELEASED = "released"  # node left or re-registered, or the run left active: place freed
    FAILED = "failed"  # the node reported that its training failed
    LATE = "late"  # an upload came for it after its round or attempt moved on
    REJECTED = "rejected"  # its contribution was rejected by audit or usefulness screening
    DISCARDED = "discarded"  # its SecAgg attempt failed: the work is thrown away


class ContributionStatus(StrEnum):
    ACCEPTED = "accepted"  # passed the acceptance checks; aggregated when its round closes
    REJECTED = "rejected"  # an audit or usefulness screening excluded it: no tokens, no reward
    DROPPED = "dropped"  # SecAgg: advertised but missing from the recovered sum
    DISCARDED = "discarded"  # SecAgg: its attempt failed, the round is retrained


# --- round groups
# a round that takes no more training uploads for its current attempt
ROUND_FINAL = frozenset({RoundStatus.CLOSED})

# --- assignment groups
# holds a place in the round: counts towards max_nodes, and a node holding one gets no second
HOLDS_PLACE = frozenset({AssignmentStatus.ASSIGNED, AssignmentStatus.SUBMITTED})
# nothing more happens to it
ASSIGNMENT_FINAL = frozenset(AssignmentStatus) - HOLDS_PLACE

# --- contribution groups
# what a round's quorum counts after screening (`rounds.decide_after_screening`): SecAgg
# dropouts within the protocol's tolerance count as the participants they were
COUNTS_FOR_QUORUM = frozenset({ContributionStatus.ACCEPTED, ContributionStatus.DROPPED})
# never reached a SecAgg sum: the node's task answers `aborted`
NOT_IN_SUM = frozenset({ContributionStatus.DROPPED, ContributionStatus.DISCARDED})


# --- the transitions (the diagrams above, as data): status -> the statuses it may move to.
# Every ORM write of a status is checked against these (`checked_move`, called by the models'
# validators); the hub's few bulk UPDATEs name their source statuses in their WHERE clause, and
# tests/hub/test_states.py checks each of those moves against the same tables.
ROUND_MOVES: Mapping[RoundStatus, frozenset[RoundStatus]] = {
    RoundStatus.PENDING: frozenset({RoundStatus.OPEN}),
    RoundStatus.OPEN: frozenset({RoundStatus.CLOSED, RoundStatus.SECAGG, RoundStatus.PENDING}),
    RoundStatus.SECAGG: frozenset({RoundStatus.CLOSED, RoundStatus.PENDING}),
    RoundStatus.CLOSED: frozenset(),
}
ASSIGNMENT_MOVES: Mapping[AssignmentStatus, frozenset[AssignmentStatus]] = {
    AssignmentStatus.ASSIGNED: frozenset(AssignmentStatus) - {AssignmentStatus.ASSIGNED},
    AssignmentStatus.SUBMITTED: frozenset({AssignmentStatus.REJECTED, AssignmentStatus.DISCARDED}),
} | {final: frozenset() for final in ASSIGNMENT_FINAL}
CONTRIBUTION_MOVES: Mapping[ContributionStatus, frozenset[ContributionStatus]] = {
    ContributionStatus.ACCEPTED: frozenset(ContributionStatus) - {ContributionStatus.ACCEPTED},
    ContributionStatus.REJECTED: frozenset({ContributionStatus.DISCARDED}),
    ContributionStatus.DROPPED: frozenset({ContributionStatus.DISCARDED}),
    ContributionStatus.DISCARDED: frozenset(),
}
# where a row starts its life
ROUND_START = frozenset({RoundStatus.PENDING})
ASSIGNMENT_START = frozenset({AssignmentStatus.ASSIGNED})
CONTRIBUTION_START = frozenset({ContributionStatus.ACCEPTED})


S = TypeVar("S", bound=StrEnum)


class IllegalMove(RuntimeError):
    """A status change its lifecycle does not have: a bug in the hub, never a client's fault
    (the request fails with 500 and its transaction is rolled back, so nothing is stored)."""

    def __init__(self, kind: str, old: StrEnum | None, new: StrEnum) -> None:
        super().__init__(f"{kind}: {old or '(new)'} -> {new} is not a move of its lifecycle")
        self.kind, self.old, self.new = kind, old, new


def checked_move(
    kind: str,
    moves: Mapping[S, frozenset[S]],
    start: frozenset[S],
    old: S | None,
    new: S,
) -> S:
    """`new` if a row of `kind` in status `old` (None: being created) may move to it, else
    `IllegalMove`. Writing the status a row already has is no move and always allowed."""
    if old is None:
        if new not in start:
            raise IllegalMove(kind, old, new)
    elif new != old and new not in moves[old]:
        raise IllegalMove(kind, old, new)
    return new
