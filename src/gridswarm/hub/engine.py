"""The round engine: one pure transition function, (snapshot, rules, event, clock) -> (snapshot',
effects), for a round's life: the nodes' asks, uploads and leaves, and what the hub decides on
its own clock.

    Asked         a node asks for work: the seat rule (`rounds.may_take_seat`), the trust
                  admission verdict, the energy policy's share and the inner-step plan
                  (`scheduler.plan_inner_steps`) give a wait, or the round opens (pending ->
                  open) and the node is assigned its inner steps
    Arrived       a contribution arrives (a plain upload or a SecAgg advertisement): the
                  acceptance checks (`hub/acceptance.py`) give a typed refusal, or the
                  contribution is recorded and its assignment is submitted
    Left          nodes leave (or their keys register again): their outstanding assignments
                  are released (`left_effects`: every run's, so the hub needs no snapshot)
    Tick          node liveness and the deadline: lost nodes' assignments are missed; the round
                  waits, is re-planned (deadline without quorum), or is due to close (CLOSE:
                  the hub screens its contributions next); in a SecAgg run a round due to
                  close opens its secure aggregation instead (OpenSecAgg: outstanding work
                  missed, the participants fixed, round open -> secagg)
    SecAggProgress  where the SecAgg stage stands (`secagg_stages.decide_stage`): the round
                  waits, its session moves to the next stage (AdvanceStage), fails (FailSecAgg:
                  the attempt's work discarded, back to pending as attempt + 1), or, at the
                  unmask stage with enough answers, the hub is to unmask the sum now
                  (`Step.unmask`)
    SecAggRecovered the hub unmasked the sum: the contributions missing from it are dropped,
                  the session is done, and the round is due to close (CLOSE: screened next)
    SecAggFailed  the unmask failed: as a failed stage (FailSecAgg)
    Screened      audits and usefulness screening have judged the contributions: the round is
                  re-planned if those left no longer make the quorum, else it is to be published
    Published     the new version is computed and its row written: the round closes, the run's
                  version and tokens move on, and the run either finishes (round, token or
                  privacy budget) or opens its next round

The engine composes the rules of `hub/rounds.py` (`may_take_seat`, `lost_assignments`,
`decide`, `decide_after_screening`, `budget_reason`), `hub/secagg_stages.py` (`decide_stage`),
`hub/scheduler.py` and `hub/acceptance.py`; it holds no SQL, no model and no I/O, so the hub
(`Asks._decide_ask`, `Uploads._store_contribution`, `Membership.leave`, `Ticker.advance` /
`_close`, and `HubPrivacy.advertise` / `advance_secagg`, which apply the effects with
`hub/store/rounds.py` in the transaction that read the facts) and the simulator
(`sim/swarm.py`, on a virtual clock, without SecAgg) take the same decisions. The heavy work
between the events (screening, aggregation, the outer step, settlement, SecAgg's crypto: its
session config, the stage messages and the unmask) stays with the hub: an event reports what
it found.

Facts that need SQL or another component (the trust admission verdict, the energy policy's
work share, the nodes' speeds, the seat counts, an upload's claim rules and energy figures) are
gathered by the caller and carried in the event, as `Screened` carries the screening. So that
the caller pays for them only when they matter, the cheap refusals come first as pure checks
the caller asks before gathering: `run_wait` and `round_wait` (once per batch of asks),
`seat_refusal` (before the admission verdict), `place_refusal` (before an upload's claims).
The step applies the same checks again, so an event decides alone whatever the caller asked.

An event that does not fit the snapshot (a `Published` before a CLOSE `Screened`, a version
that does not follow the round's base) is a bug in the caller, never a client's fault:
`IllegalEvent`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from gridswarm.hub.acceptance import (
    AssignmentFacts,
    ClaimFacts,
    ClaimRules,
    EnergyFacts,
    RunFacts,
    UploadRefused,
    check_claims,
    check_place,
)
from gridswarm.hub.lifecycle import HOLDING, RunState
from gridswarm.hub.rounds import (
    ARRIVING_GRACE_S,
    AssignmentState,
    Decision,
    RoundRules,
    RoundState,
    Screening,
    budget_reason,
    decide,
    decide_after_screening,
    lost_assignments,
    may_take_seat,
)
from gridswarm.hub.scheduler import plan_inner_steps
from gridswarm.hub.secagg_stages import NEXT_STAGE, StageAction, StageProgress, decide_stage
from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus, RoundStatus

# ------------------------------------------------------------------------------------ snapshot


@dataclass(frozen=True)
class RunSnapshot:
    """The run's side of a round's decisions."""

    status: RunState
    version: int  # the latest published version
    tokens_total: int  # tokens trained into it, over all closed rounds
    rounds_budget: int | None = None  # `budget.rounds`
    tokens_budget: int | None = None  # `budget.tokens`
    id: str = ""  # the run's id and why it is in its status: the words of a refusal
    status_reason: str | None = None


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
    # a summary (hub/store/rounds.py at scale): `assignments` lists only the outstanding ones of
    # nodes silent for `liveness_s`, and these count the rest (`rounds.RoundState`)
    outstanding: int | None = None
    submitted: int | None = None
    arriving: int = 0  # uploads the hub received by the deadline and is still deciding
    accepted: int = 0  # contributions accepted (all attempts): what a re-plan keeps
    screening: Screening | None = None  # set by a CLOSE `Screened`: the round is to publish
    # a `secagg` round's session stage (share | mask | unmask | done), None otherwise
    secagg_stage: str | None = None
    # a summary: the earliest last-seen time (unix s) of the nodes of all its outstanding
    # assignments, listed or not (when the first of them can go silent); None if not read
    outstanding_seen_at: float | None = None

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
    ASKED = "asked"
    ARRIVED = "arrived"
    LEFT = "left"
    TICK = "tick"
    SCREENED = "screened"
    PUBLISHED = "published"
    SECAGG_PROGRESS = "secagg_progress"
    SECAGG_RECOVERED = "secagg_recovered"
    SECAGG_FAILED = "secagg_failed"


@dataclass(frozen=True)
class SeatFacts:
    """The round's places as the caller counts them (the hub: `asks.Seats`, kept current
    through a batch of asks): whether the asking node holds one (assigned or submitted), how
    many are taken, and how many nodes are live, the asking one included."""

    has_seat: bool
    taken: int
    live: int


@dataclass(frozen=True)
class PlanRules:
    """The run's training settings an inner-step plan reads."""

    tokens_per_step: int  # seq_len x batch_size
    inner_steps: int  # a full round's steps (`train.inner_steps`)
    min_inner_steps: int  # fewer than this is no use (`train.min_inner_steps`)


@dataclass(frozen=True)
class WorkFacts:
    """How fast the asking node is and what the run's energy policy gives it (hub/energy.py
    `decide_work`): its share of a full round (0: wait `retry_after_s`), and the seconds its
    energy window leaves it (None: no window)."""

    tokens_per_s: float  # the node's speed on this run's model
    fastest_tokens_per_s: float | None  # the fastest live node's, None if none known
    share: float
    window_s: float | None
    retry_after_s: float


@dataclass(frozen=True)
class Asked:
    """A node asks for work. `admission`: the trust verdict (`HubTrust.admission`: a reason to
    wait, or None), asked by the caller only once `seat_refusal` found a place; `work`: gathered
    only once both let the node in (a step that needs them without them is the caller's bug)."""

    node_id: str
    seat: SeatFacts
    plan: PlanRules
    admission: str | None = None
    work: WorkFacts | None = None
    kind: EventKind = EventKind.ASKED


@dataclass(frozen=True)
class ContributionRow:
    """What an accepted contribution's row holds besides its assignment: its id (the body's
    sha256), the node's claims (`ContributionMeta` fields), its size, and the hub's own
    columns (carbon)."""

    digest: str
    claims: Mapping[str, Any]
    bytes_up: int
    columns: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Arrived:
    """A contribution arrives from `node_id` for its assignment `assignment_id` (the row's
    facts in `place`). `rules` and `energy` are read by the caller only once `place_refusal`
    found the upload still wanted (a run's settings are read only then)."""

    assignment_id: str
    node_id: str
    place: AssignmentFacts
    claim: ClaimFacts
    row: ContributionRow
    rules: ClaimRules | None = None
    energy: EnergyFacts | None = None
    kind: EventKind = EventKind.ARRIVED


@dataclass(frozen=True)
class Left:
    """Nodes leave the hub (or register their keys again): their work is given up."""

    node_ids: tuple[str, ...]
    kind: EventKind = EventKind.LEFT


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


@dataclass(frozen=True)
class SecAggProgress:
    """Where the round's current SecAgg stage stands (who was expected to answer, who did, who
    is lost), as the hub read it from the stage messages and the nodes' heartbeats."""

    progress: StageProgress
    kind: EventKind = EventKind.SECAGG_PROGRESS


@dataclass(frozen=True)
class SecAggRecovered:
    """The hub unmasked the round's sum (after a `Step.unmask`): `survivors` are the nodes in
    it, `dropped` the participants it was recovered without (at most t)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    kind: EventKind = EventKind.SECAGG_RECOVERED


@dataclass(frozen=True)
class SecAggFailed:
    """The hub could not unmask the round's sum (after a `Step.unmask`): `error` says why."""

    error: str
    kind: EventKind = EventKind.SECAGG_FAILED


Event = (
    Asked
    | Arrived
    | Left
    | Tick
    | Screened
    | Published
    | SecAggProgress
    | SecAggRecovered
    | SecAggFailed
)

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


@dataclass(frozen=True)
class OpenRound:
    """The pending round opens at `opened_at` for its first node: its deadline is set."""

    opened_at: float
    deadline_at: float


@dataclass(frozen=True)
class Assign:
    """A new outstanding assignment of the round (attempt `attempt`) for `node_id`."""

    node_id: str
    attempt: int
    base_version: int
    inner_steps: int
    created_at: float
    deadline_at: float


@dataclass(frozen=True)
class RecordContribution:
    """An accepted contribution's row for assignment `assignment_id`, stored at `created_at`."""

    assignment_id: str
    row: ContributionRow
    created_at: float


@dataclass(frozen=True)
class MarkSubmitted:
    """The outstanding assignment `assignment_id` has its contribution."""

    assignment_id: str


@dataclass(frozen=True)
class MarkLate:
    """The outstanding assignment `assignment_id` of a round that moved on is `late`: an
    upload came for it after its round."""

    assignment_id: str


@dataclass(frozen=True)
class ReleaseOutstanding:
    """The outstanding assignments of `node_ids`, in every run, are `released`."""

    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class OpenSecAgg:
    """The round's training is over (a SecAgg run's round due to close): round `open ->
    secagg`, and its session row opened for `attempt` at the `share` stage, due by
    `stage_deadline_at`. The participants (the accepted contributions' nodes) and their
    `SecAggConfig` are the caller's: the crypto's `make_config`, passed to the applier."""

    attempt: int
    opened_at: float
    stage_deadline_at: float


@dataclass(frozen=True)
class AdvanceStage:
    """The round's SecAgg session moves on to `stage`, due by `deadline_at`."""

    stage: str
    deadline_at: float


@dataclass(frozen=True)
class FailSecAgg:
    """The round's SecAgg attempt failed at `failed_at` for `reason`: every contribution of
    the round is `discarded`, so is every assignment that holds a place, and the session
    counts the failure (the stage messages are the caller's to delete). A `Replan` to
    `pending` follows: the round is retrained with fresh keys."""

    reason: str
    failed_at: float


@dataclass(frozen=True)
class FinishSecAgg:
    """The round's sum is recovered at `finished_at`: the accepted contributions of nodes
    not in `survivors` are `dropped` (never in the sum: no tokens, no reward), and the
    session is `done` with its counts (the sum's blob is the caller's)."""

    survivors: tuple[str, ...]
    dropped: int
    finished_at: float


Effect = (
    MarkMissed
    | MissOutstanding
    | Replan
    | CloseRound
    | AdvanceRun
    | FinishRun
    | OpenNextRound
    | OpenRound
    | Assign
    | RecordContribution
    | MarkSubmitted
    | MarkLate
    | ReleaseOutstanding
    | OpenSecAgg
    | AdvanceStage
    | FailSecAgg
    | FinishSecAgg
)


@dataclass(frozen=True)
class AskWait:
    """No work for an asking node now. `retry_after_s`: what the answer tells the node;
    `changes_after_s`: when asking again could answer otherwise (None: only a change of the
    run's round, which the hub signals: a long-poll sleeps until then); `reason`: the words the
    answer carries (the run's status), `cause`: why, for logs and tests only (a node learns
    nothing about the others from a full round); `finished`: the run is over."""

    retry_after_s: float
    changes_after_s: float | None
    reason: str | None = None
    cause: str | None = None
    finished: bool = False


@dataclass(frozen=True)
class Step:
    """What one event did: the snapshot after it, the effects to apply (in order, in one
    transaction), and the decision it amounts to (WAIT: nothing to do; CLOSE after a Tick:
    screen the round next; CLOSE after a Screened: publish it next; REPLAN: re-planned). A
    node's event is always WAIT (the ticker decides the close); its answer is `wait` for an
    ask with no work, `refused` for an upload refused (with MarkLate as its only possible
    effect), neither when the effects assign the work or record the contribution. A SecAgg
    step is WAIT while the stages run, REPLAN when one fails (the round is pending again: the
    hub wakes the nodes waiting for work) and CLOSE once the sum is recovered (screen the
    round next); `unmask` asks the caller for the heavy work between two events."""

    snapshot: RoundSnapshot
    effects: tuple[Effect, ...]
    decision: Decision
    wait: AskWait | None = None
    refused: UploadRefused | None = None
    unmask: bool = False  # a SecAggProgress: unmask the sum now, then step what it gave
    # a Tick's step: the earliest time (unix s) at which a Tick on the same snapshot, with no
    # event between, could decide otherwise (`tick_wake_at`); None for other events. Derived
    # from the rest, so left out of a step's equality (what the step decided)
    wake_at: float | None = field(default=None, compare=False)


class IllegalEvent(RuntimeError):
    """An event the snapshot cannot take: a bug in the caller."""


# ---------------------------------------------------------------------------------- transition


def step(snapshot: RoundSnapshot, rules: RoundRules, event: Event, now_s: float) -> Step:
    """The one transition function of a round (see the module docstring)."""
    if isinstance(event, Asked):
        return _asked(snapshot, rules, event, now_s)
    if isinstance(event, Arrived):
        return arrival(snapshot, event, now_s)
    if isinstance(event, Left):
        return _left(snapshot, event)
    if isinstance(event, Tick):
        return _tick(snapshot, rules, now_s)
    if isinstance(event, Screened):
        return _screened(snapshot, rules, event.screening, now_s)
    if isinstance(event, Published):
        return _published(snapshot, event, now_s)
    if isinstance(event, SecAggProgress):
        return _secagg_progress(snapshot, rules, event.progress, now_s)
    if isinstance(event, SecAggRecovered):
        return _secagg_recovered(snapshot, event, now_s)
    if isinstance(event, SecAggFailed):
        _secagg_at(snapshot, "unmask")
        return _fail_secagg(snapshot, f"secure aggregation failed to unmask: {event.error}", now_s)
    raise IllegalEvent(f"unknown event {event!r}")


# ---------------------------------------------------------------------------------------- asks


def run_wait(run: RunSnapshot) -> AskWait | None:
    """No work while the run is not active: a paused or stalled run may resume (ask again in
    5 s), any other is over. The same for every ask of a batch: the caller asks it once."""
    if run.status == RunState.ACTIVE:
        return None
    reason = f"run {run.id} is {run.status}" + (
        f": {run.status_reason}" if run.status_reason else ""
    )
    if run.status in HOLDING:
        return AskWait(5.0, 5.0, reason, cause=reason)
    return AskWait(1.0, None, reason, cause=reason, finished=True)


def round_wait(snap: RoundSnapshot) -> AskWait | None:
    """`run_wait`, then no new work while the round's secure aggregation runs (ask again in
    1 s). The same for every ask of a batch: the caller asks it before counting seats."""
    waiting = run_wait(snap.run)
    if waiting is None and snap.status == RoundStatus.SECAGG:
        return AskWait(1.0, 1.0, cause="the round's secure aggregation runs")
    return waiting


def seat_refusal(snap: RoundSnapshot, rules: RoundRules, seat: SeatFacts) -> str | None:
    """Why the node may not take a place in the round (`rounds.may_take_seat`: closed, already
    held, full, too few live nodes to open it), None if it may: the caller asks the trust
    admission only then."""
    return may_take_seat(snap.status, seat.has_seat, seat.taken, rules, seat.live)


def _asked(snap: RoundSnapshot, rules: RoundRules, ev: Asked, now_s: float) -> Step:
    waiting = round_wait(snap)
    if waiting is not None:
        return Step(snap, (), Decision.WAIT, wait=waiting)
    why = seat_refusal(snap, rules, ev.seat) or ev.admission
    if why is not None:
        # a full round, a place already held, a closed round, too few live nodes, a node
        # others go before: only a change of the round changes it (enough live nodes: a
        # registration, or the ticker's count, signals it)
        return Step(snap, (), Decision.WAIT, wait=AskWait(1.0, None, cause=why))
    work = ev.work
    if work is None:
        raise IllegalEvent(f"an ask of {ev.node_id} that may take a place needs its work facts")
    if snap.status == RoundStatus.OPEN:
        if snap.deadline_at is None:
            raise IllegalEvent(f"round {snap.number} is open without a deadline")
        deadline_at = snap.deadline_at
    else:
        deadline_at = now_s + rules.deadline_s
    if work.share <= 0:  # the run's energy policy: not this node, or not now
        cause = "the run's energy policy gives this node no work now"
        waiting = AskWait(work.retry_after_s, work.retry_after_s, cause=cause)
        return Step(snap, (), Decision.WAIT, wait=waiting)
    reserve_s = 0.1 * rules.deadline_s + 1.0
    time_left_s = deadline_at - now_s
    if work.window_s is not None:  # the node's own energy window ends first
        time_left_s = min(time_left_s, work.window_s + reserve_s)
    speed = work.tokens_per_s
    plan = plan_inner_steps(
        tokens_per_s=speed,
        fastest_tokens_per_s=max(work.fastest_tokens_per_s or speed, speed),
        tokens_per_step=ev.plan.tokens_per_step,
        inner_steps=ev.plan.inner_steps,
        min_inner_steps=ev.plan.min_inner_steps,
        time_left_s=time_left_s,
        reserve_s=reserve_s,
        work_share=work.share,
    )
    if plan is None:
        cause = f"not even {ev.plan.min_inner_steps} inner steps fit before the deadline"
        return Step(snap, (), Decision.WAIT, wait=AskWait(2.0, 2.0, cause=cause))
    effects: list[Effect] = []
    if snap.status == RoundStatus.PENDING:
        effects.append(OpenRound(now_s, deadline_at))
    effects.append(
        Assign(ev.node_id, snap.attempt, snap.base_version, plan.inner_steps, now_s, deadline_at)
    )
    after = replace(
        snap,
        status=RoundStatus.OPEN,
        deadline_at=deadline_at,
        assignments=(
            *snap.assignments,
            AssignmentState(ev.node_id, AssignmentStatus.ASSIGNED, now_s),
        )
        if snap.outstanding is None
        else snap.assignments,  # a summary lists only silent nodes: the new one is counted
        outstanding=None if snap.outstanding is None else snap.outstanding + 1,
    )
    return Step(after, tuple(effects), Decision.WAIT)


# ------------------------------------------------------------------------------------- uploads


def place_refusal(snap: RoundSnapshot, place: AssignmentFacts) -> UploadRefused | None:
    """Does the round still want an upload for this assignment (`acceptance.check_place`:
    duplicate, or stale)? The caller reads the claim rules and energy facts only if it does."""
    run = RunFacts(snap.run.id, snap.run.status, snap.run.status_reason, snap.number, snap.status)
    return check_place(place, run)


def arrival(snap: RoundSnapshot, ev: Arrived, now_s: float) -> Step:
    """`step` for an `Arrived`, which reads no round rules (the hub calls it without them):
    the acceptance checks, then the contribution's row and its assignment `submitted`, or the
    typed refusal (with the assignment `late` if its round moved on)."""
    refused = place_refusal(snap, ev.place)
    if refused is None:
        if ev.rules is None or ev.energy is None:
            raise IllegalEvent(f"an upload for {ev.assignment_id} needs its claim rules")
        refused = check_claims(ev.place, ev.claim, ev.rules, ev.energy)
    if refused is not None:
        late = (MarkLate(ev.assignment_id),) if refused.mark_late else ()
        return Step(snap, late, Decision.WAIT, refused=refused)
    effects = (RecordContribution(ev.assignment_id, ev.row, now_s), MarkSubmitted(ev.assignment_id))
    # the node's one outstanding place of the round (a node holds at most one) is submitted;
    # a summary counts it (its listed rows are only silent nodes' outstanding ones)
    after = replace(
        snap,
        assignments=tuple(
            replace(a, status=AssignmentStatus.SUBMITTED, node_last_seen_at=now_s)
            if a.node_id == ev.node_id and a.status == AssignmentStatus.ASSIGNED
            else a
            for a in snap.assignments
        ),
        outstanding=None if snap.outstanding is None else max(snap.outstanding - 1, 0),
        submitted=None if snap.submitted is None else snap.submitted + 1,
        accepted=snap.accepted + 1,
    )
    return Step(after, effects, Decision.WAIT)


# -------------------------------------------------------------------------------------- leaves


def left_effects(event: Left) -> tuple[Effect, ...]:
    """What nodes leaving changes: their outstanding assignments, in every run, are released
    (so no round waits for them). Needs no snapshot: the hub applies it across runs."""
    return (ReleaseOutstanding(tuple(dict.fromkeys(event.node_ids))),) if event.node_ids else ()


def _left(snap: RoundSnapshot, ev: Left) -> Step:
    """`left_effects`, with the round's listed assignments of those nodes released (a
    summary's `outstanding` drops by the listed ones only: the hub applies a Left without a
    snapshot, through `left_effects`, and its next tick reads the counts again)."""
    gone = set(ev.node_ids)
    released = sum(
        1 for a in snap.assignments if a.node_id in gone and a.status == AssignmentStatus.ASSIGNED
    )
    after = replace(
        snap,
        assignments=tuple(
            replace(a, status=AssignmentStatus.RELEASED)
            if a.node_id in gone and a.status == AssignmentStatus.ASSIGNED
            else a
            for a in snap.assignments
        ),
        outstanding=None if snap.outstanding is None else snap.outstanding - released,
    )
    return Step(after, left_effects(ev), Decision.WAIT)


# ---------------------------------------------------------------------------------------- tick


def _tick(snap: RoundSnapshot, rules: RoundRules, now_s: float) -> Step:
    if snap.run.status != RunState.ACTIVE or snap.screening is not None:
        # a run on hold, or a close under way: only an event changes it
        return Step(snap, (), Decision.WAIT, wake_at=math.inf)
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
    elif decision is Decision.CLOSE and rules.secagg_stage_timeout_s is not None:
        # SecAgg: the participants are fixed (outstanding training no longer awaited) and the
        # stages recover their sum before the round is screened
        effects += [
            MissOutstanding(),
            OpenSecAgg(snap.attempt, now_s, now_s + rules.secagg_stage_timeout_s),
        ]
        snap = replace(
            snap,
            status=RoundStatus.SECAGG,
            assignments=_missing_outstanding(snap.assignments),
            outstanding=None if snap.outstanding is None else 0,
            secagg_stage="share",
        )
        decision = Decision.WAIT
    if effects or decision is not Decision.WAIT:
        return Step(snap, tuple(effects), decision, wake_at=now_s)
    return Step(snap, (), decision, wake_at=tick_wake_at(snap, rules, now_s))


def tick_wake_at(snap: RoundSnapshot, rules: RoundRules, now_s: float) -> float:
    """When a `Tick` on `snap` (one that does nothing at `now_s`) could next decide otherwise
    with no event between: the earliest of the round's deadline (or, with uploads still
    arriving, the end of their grace), and the moment the first outstanding node's silence
    passes `liveness_s`; `math.inf` if only an event can change it (a run on hold, a close
    under way, a pending round). A Tick at any time before it decides what it decides at
    `now_s` (property-tested); at it, it may decide otherwise. The hub's ticker skips a run
    until then unless an event changed its round (`hub/tick_schedule.py`).

    A summary that counts outstanding assignments it does not list (nodes heard from within
    `liveness_s`) needs `outstanding_seen_at`, the earliest of their nodes' last-seen times,
    to tell when the first goes silent; without it the answer is `now_s` (tick again)."""
    if snap.run.status != RunState.ACTIVE or snap.screening is not None:
        return math.inf
    times = [
        _silent_at(a.node_last_seen_at, rules.liveness_s)
        for a in snap.assignments
        if a.status == AssignmentStatus.ASSIGNED
    ]
    if snap.outstanding is not None and snap.outstanding > len(times):
        if snap.outstanding_seen_at is None:
            return now_s  # an outstanding node the summary does not show: when is unknown
        times.append(_silent_at(snap.outstanding_seen_at, rules.liveness_s))
    if snap.status == RoundStatus.OPEN and snap.deadline_at is not None:
        # `rounds.decide`: at the deadline, or once its grace ends while uploads arrive
        if snap.arriving or now_s >= snap.deadline_at:
            times.append(snap.deadline_at + ARRIVING_GRACE_S)
        else:
            times.append(snap.deadline_at)
    return min(times, default=math.inf)


def _silent_at(last_seen_s: float, liveness_s: float) -> float:
    """The first clock reading at which `rounds.lost_assignments` (now - last_seen >
    liveness_s, in floating point) finds a node last seen at `last_seen_s` lost: found by
    stepping an ulp at a time around last_seen + liveness (a few steps at most), so that a
    tick at any earlier reading finds it alive. Bounded: past 64 steps it answers an earlier
    time (an early tick does nothing)."""
    if not (math.isfinite(last_seen_s) and math.isfinite(liveness_s)):
        return -math.inf if math.isinf(last_seen_s) and last_seen_s < 0 else math.inf
    alive = last_seen_s + liveness_s  # the latest reading still alive, once adjusted
    for _ in range(64):
        if alive - last_seen_s <= liveness_s:
            break
        alive = math.nextafter(alive, -math.inf)
    else:
        return alive
    for _ in range(64):
        later = math.nextafter(alive, math.inf)
        if later - last_seen_s > liveness_s:
            return later
        alive = later
    return alive


# -------------------------------------------------------------------------------------- secagg


def _secagg_at(snap: RoundSnapshot, stage: str | None = None) -> None:
    """Refuse a SecAgg event the round cannot take (not in `secagg`, or another stage)."""
    if snap.status != RoundStatus.SECAGG or snap.screening is not None:
        raise IllegalEvent(f"round {snap.number} is {snap.status}: no secure aggregation runs")
    if stage is not None and snap.secagg_stage != stage:
        raise IllegalEvent(
            f"round {snap.number}'s secure aggregation is at {snap.secagg_stage}, not {stage}"
        )


def _secagg_progress(
    snap: RoundSnapshot, rules: RoundRules, progress: StageProgress, now_s: float
) -> Step:
    """`decide_stage`: wait, the next stage, a failure, or (unmask stage) unmask now."""
    _secagg_at(snap, progress.stage)
    if rules.secagg_stage_timeout_s is None:
        raise IllegalEvent(f"round {snap.number}'s run has no SecAgg stage timeout")
    action, reason = decide_stage(progress, now_s)
    if action is StageAction.FAIL:
        return _fail_secagg(snap, reason or "secure aggregation failed", now_s)
    if action is StageAction.WAIT:
        return Step(snap, (), Decision.WAIT)
    if progress.stage == "unmask":
        return Step(snap, (), Decision.WAIT, unmask=True)
    stage = NEXT_STAGE[progress.stage]
    advance = AdvanceStage(stage, now_s + rules.secagg_stage_timeout_s)
    return Step(replace(snap, secagg_stage=stage), (advance,), Decision.WAIT)


def _secagg_recovered(snap: RoundSnapshot, ev: SecAggRecovered, now_s: float) -> Step:
    """The sum is recovered: non-survivors dropped, the session done, the round to close."""
    _secagg_at(snap, "unmask")
    if set(ev.survivors) & set(ev.dropped):
        raise IllegalEvent("a node cannot both be in the recovered sum and dropped from it")
    finish = FinishSecAgg(tuple(sorted(set(ev.survivors))), len(set(ev.dropped)), now_s)
    after = replace(snap, secagg_stage="done", accepted=min(snap.accepted, len(finish.survivors)))
    return Step(after, (finish,), Decision.CLOSE)


def _fail_secagg(snap: RoundSnapshot, reason: str, now_s: float) -> Step:
    """Too many dropouts (or no unmask): discard the attempt's work, retrain with fresh keys."""
    attempt = snap.attempt + 1
    after = replace(
        snap,
        status=RoundStatus.PENDING,
        attempt=attempt,
        deadline_at=None,
        assignments=tuple(
            replace(a, status=AssignmentStatus.DISCARDED) if a.status in HOLDS_PLACE else a
            for a in snap.assignments
        ),
        outstanding=None if snap.outstanding is None else 0,
        submitted=None if snap.submitted is None else 0,
        accepted=0,
        secagg_stage=None,
    )
    effects = (FailSecAgg(reason, now_s), Replan(attempt, None))
    return Step(after, effects, Decision.REPLAN)  # REPLAN: the hub wakes the waiting nodes


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
