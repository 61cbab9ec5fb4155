"""The round engine: one pure transition function, (snapshot, rules, event, clock) -> (snapshot',
effects), for the part of a round's life the hub decides on its own clock.

    Tick          node liveness and the deadline: lost nodes' assignments are missed; the round
                  waits, is re-planned (deadline without quorum), or is due to close (CLOSE:
                  the hub screens its contributions next)
    Screened      audits and usefulness screening have judged the contributions: the round is
                  re-planned if those left no longer make the quorum, else it is to be published
    Published     the new version is computed and its row written: the round closes, the run's
                  version and tokens move on, and the run either finishes (round, token or
                  privacy budget) or opens its next round

The engine composes the rules of `hub/rounds.py` (`lost_assignments`, `decide`,
`decide_after_screening`, `budget_reason`); it holds no SQL, no model and no I/O, so the hub
(`HubService._advance` / `_close`, which turn each effect into its UPDATE or INSERT in the
transaction that read the snapshot) and the simulator (`sim/swarm.py`, on a virtual clock) take
the same decisions. The heavy work between the events (screening, aggregation, the outer step,
settlement, SecAgg stages) stays with the hub: an event reports what it found.

An event that does not fit the snapshot (a `Published` before a CLOSE `Screened`, a version
that does not follow the round's base) is a bug in the caller, never a client's fault:
`IllegalEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.rounds import (
    AssignmentState,
    Decision,
    RoundRules,
    RoundState,
    Screening,
    budget_reason,
    decide,
    decide_after_screening,
    lost_assignments,
)
from gridswarm.hub.states import AssignmentStatus, RoundStatus

# ------------------------------------------------------------------------------------ snapshot


@dataclass(frozen=True)
class RunSnapshot:
    """The run's side of a round's decisions."""

    status: RunState
    version: int  # the latest published version
    tokens_total: int  # tokens trained into it, over all closed rounds
    rounds_budget: int | None = None  # `budget.rounds`
    tokens_budget: int | None = None  # `budget.tokens`


@dataclass(frozen=True)
class RoundSnapshot:
    """One round of a run as the engine sees it: the round row, its assignments with their
    nodes' liveness, and its contributions by status."""

    run: RunSnapshot
    number: int
    base_version: int  # the version this round trains from: it publishes base_version + 1
    status: RoundStatus
    attempt: int  # re-plans so far
    deadline_at: float | None  # unix s; None while pending
    assignments: tuple[AssignmentState, ...] = ()
    # a summary (hub/round_store.py at scale): `assignments` lists only the outstanding ones of
    # nodes silent for `liveness_s`, and these count the rest (`rounds.RoundState`)
    outstanding: int | None = None
    submitted: int | None = None
    arriving: int = 0  # uploads the hub received by the deadline and is still deciding
    accepted: int = 0  # contributions accepted (all attempts): what a re-plan keeps
    screening: Screening | None = None  # set by a CLOSE `Screened`: the round is to publish

    def round_state(self) -> RoundState:
        """The view `hub/rounds.py`'s rules take."""
        return RoundState(
            self.status,
            self.deadline_at,
            self.assignments,
            self.outstanding,
            self.submitted,
            self.arriving,
        )


# -------------------------------------------------------------------------------------- events


class EventKind(StrEnum):
    TICK = "tick"
    SCREENED = "screened"
    PUBLISHED = "published"


@dataclass(frozen=True)
class Tick:
    """The clock moved on (the hub's ticker, or the simulator's next instant of interest)."""

    kind: EventKind = EventKind.TICK


@dataclass(frozen=True)
class Screened:
    """Audits and usefulness screening judged the round's contributions (`trust.screen_round`)."""

    screening: Screening
    kind: EventKind = EventKind.SCREENED


class FinishSource(StrEnum):
    BUDGET = "budget"  # budget.rounds or budget.tokens (`rounds.budget_reason`)
    PRIVACY = "privacy"  # the epsilon budget (`HubPrivacy.stop_reason`)


@dataclass(frozen=True)
class Published:
    """The round's new version is computed and stored (blobs, version row, settlement).
    `privacy_stop`: why one more round would pass the run's privacy budget, None to go on."""

    version: int
    tokens_total: int  # the run's tokens including this round's
    privacy_stop: str | None = None
    kind: EventKind = EventKind.PUBLISHED


Event = Tick | Screened | Published

# ------------------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class MarkMissed:
    """These nodes' outstanding (`assigned`) assignments in the round become `missed`: the
    nodes went silent for longer than `liveness_s`."""

    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class MissOutstanding:
    """Every outstanding assignment of the round becomes `missed` (re-plan or close)."""


@dataclass(frozen=True)
class Replan:
    """The round tries again as `attempt`: by `deadline_at` with the accepted contributions
    kept, or, with none kept (`deadline_at` None), back to `pending` for its first node."""

    attempt: int
    deadline_at: float | None


@dataclass(frozen=True)
class CloseRound:
    """The round is closed at `closed_at`: "all-in" before its deadline, else "deadline"."""

    reason: str
    closed_at: float


@dataclass(frozen=True)
class AdvanceRun:
    """The run's latest version and its tokens."""

    version: int
    tokens_total: int


@dataclass(frozen=True)
class FinishRun:
    """The run is finished (`lifecycle` active -> finished) for `reason`."""

    reason: str
    source: FinishSource
    finished_at: float


@dataclass(frozen=True)
class OpenNextRound:
    """A new pending round `number` that trains from `base_version`."""

    number: int
    base_version: int


Effect = MarkMissed | MissOutstanding | Replan | CloseRound | AdvanceRun | FinishRun | OpenNextRound


@dataclass(frozen=True)
class Step:
    """What one event did: the snapshot after it, the effects to apply (in order, in one
    transaction), and the decision it amounts to (WAIT: nothing to do; CLOSE after a Tick:
    screen the round next; CLOSE after a Screened: publish it next; REPLAN: re-planned)."""

    snapshot: RoundSnapshot
    effects: tuple[Effect, ...]
    decision: Decision


class IllegalEvent(RuntimeError):
    """An event the snapshot cannot take: a bug in the caller."""


# ---------------------------------------------------------------------------------- transition


def step(snapshot: RoundSnapshot, rules: RoundRules, event: Event, now_s: float) -> Step:
    """The one transition function of a round (see the module docstring)."""
    if isinstance(event, Tick):
        return _tick(snapshot, rules, now_s)
    if isinstance(event, Screened):
        return _screened(snapshot, rules, event.screening, now_s)
    if isinstance(event, Published):
        return _published(snapshot, event, now_s)
    raise IllegalEvent(f"unknown event {event!r}")


def _tick(snap: RoundSnapshot, rules: RoundRules, now_s: float) -> Step:
    if snap.run.status != RunState.ACTIVE or snap.screening is not None:
        return Step(snap, (), Decision.WAIT)  # a run on hold, or a close under way
    effects: list[Effect] = []
    lost = lost_assignments(snap.round_state(), rules, now_s)
    if lost:
        gone = set(lost)
        snap = replace(
            snap,
            assignments=tuple(
                replace(a, status=AssignmentStatus.MISSED)
                if a.node_id in gone and a.status == AssignmentStatus.ASSIGNED
                else a
                for a in snap.assignments
            ),
            outstanding=None if snap.outstanding is None else snap.outstanding - len(gone),
        )
        effects.append(MarkMissed(tuple(lost)))
    decision = decide(snap.round_state(), rules, now_s)
    if decision is Decision.REPLAN:
        snap, replan = _replan(snap, rules, now_s)
        effects += replan
    return Step(snap, tuple(effects), decision)


def _screened(snap: RoundSnapshot, rules: RoundRules, screening: Screening, now_s: float) -> Step:
    if snap.status not in (RoundStatus.OPEN, RoundStatus.SECAGG) or snap.screening is not None:
        raise IllegalEvent(f"round {snap.number} is {snap.status}: nothing to screen")
    snap = replace(snap, accepted=screening.accepted)
    if decide_after_screening(screening, rules) is Decision.REPLAN:
        snap, replan = _replan(snap, rules, now_s)  # audits left fewer than the quorum
        return Step(snap, tuple(replan), Decision.REPLAN)
    return Step(replace(snap, screening=screening), (), Decision.CLOSE)


def _published(snap: RoundSnapshot, event: Published, now_s: float) -> Step:
    if snap.screening is None:
        raise IllegalEvent(f"round {snap.number} was not screened to close: nothing to publish")
    if event.version != snap.base_version + 1 or event.version != snap.run.version + 1:
        raise IllegalEvent(
            f"round {snap.number} trains from version {snap.base_version} (run at "
            f"{snap.run.version}): it cannot publish version {event.version}"
        )
    if event.tokens_total < snap.run.tokens_total:
        raise IllegalEvent("a published version cannot hold fewer tokens than its base")
    deadline = snap.deadline_at if snap.deadline_at is not None else now_s
    reason = "all-in" if now_s < deadline else "deadline"
    effects: list[Effect] = [
        MissOutstanding(),
        CloseRound(reason, now_s),
        AdvanceRun(event.version, event.tokens_total),
    ]
    run = replace(snap.run, version=event.version, tokens_total=event.tokens_total)
    finished = budget_reason(
        snap.run.rounds_budget, snap.run.tokens_budget, event.version, event.tokens_total
    )
    if finished:
        effects.append(FinishRun(finished, FinishSource.BUDGET, now_s))
    elif event.privacy_stop:
        effects.append(FinishRun(event.privacy_stop, FinishSource.PRIVACY, now_s))
    else:
        effects.append(OpenNextRound(snap.number + 1, event.version))
    if isinstance(effects[-1], FinishRun):
        run = replace(run, status=RunState.FINISHED)
    closed = replace(
        snap,
        run=run,
        status=RoundStatus.CLOSED,
        assignments=_missing_outstanding(snap.assignments),
        outstanding=None if snap.outstanding is None else 0,
        screening=None,
    )
    return Step(closed, tuple(effects), Decision.CLOSE)


def _replan(
    snap: RoundSnapshot, rules: RoundRules, now_s: float
) -> tuple[RoundSnapshot, list[Effect]]:
    """Drop the outstanding work, keep what was accepted, try again."""
    attempt = snap.attempt + 1
    if snap.accepted:
        deadline_at: float | None = now_s + rules.deadline_s
        status = snap.status
    else:
        deadline_at, status = None, RoundStatus.PENDING
    after = replace(
        snap,
        attempt=attempt,
        deadline_at=deadline_at,
        status=status,
        assignments=_missing_outstanding(snap.assignments),
        outstanding=None if snap.outstanding is None else 0,
        screening=None,
    )
    return after, [MissOutstanding(), Replan(attempt, deadline_at)]


def _missing_outstanding(assignments: tuple[AssignmentState, ...]) -> tuple[AssignmentState, ...]:
    return tuple(
        replace(a, status=AssignmentStatus.MISSED) if a.status == AssignmentStatus.ASSIGNED else a
        for a in assignments
    )
