"""A run's lifecycle as a pure state machine: (state, event) -> new state, or a typed refusal
(`TransitionRefusal`; the hub answers it as 409 `protocol.Refusal.CONFLICT` with the detail).

    active --pause--> paused --resume--> active
    active --stall--> stalled --resume--> active      (the hub: too many node failures)
    active | paused | stalled --stop--> stopped        (the sponsor; final)
    active --finish--> finished                        (round/token/epsilon budget; final)

Only `active` runs hand out work. `paused` and `stalled` keep every round, version and
contribution as it is, so `resume` continues where the run was. `stop` and `finish` are final;
a stopped run's unspent escrow stays on the ledger as the sponsor's (`run_escrow`). The hub
(`HubService.change_run_state`) applies the result and writes a `lifecycle` ledger entry in the
same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RunState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    STALLED = "stalled"
    STOPPED = "stopped"
    FINISHED = "finished"


class RunEvent(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    STALL = "stall"
    FINISH = "finish"


class TransitionRefusal(StrEnum):
    """Why an event does not apply to a run in its state."""

    ALREADY_ENDED = "already-ended"  # stopped or finished: nothing more happens to it
    NOT_ACTIVE = "not-active"  # pause, stall and finish need a running run
    NOT_HELD = "not-held"  # resume needs a paused or stalled run


FINAL = frozenset({RunState.STOPPED, RunState.FINISHED})
HOLDING = frozenset({RunState.PAUSED, RunState.STALLED})
# active, paused or stalled: may still change (the replicas watch these runs)
NOT_ENDED = frozenset(RunState) - FINAL
# events a sponsor may send; `stall` and `finish` are the hub's own
SPONSOR_EVENTS = frozenset({RunEvent.PAUSE, RunEvent.RESUME, RunEvent.STOP})
# the node failures (POST .../failures) that mark a run stalled when no round closes between them
STALL_AFTER_FAILURES = 3


@dataclass(frozen=True)
class Refused:
    reason: TransitionRefusal
    state: RunState
    event: RunEvent

    @property
    def detail(self) -> str:
        return f"cannot {self.event} a run that is {self.state} ({self.reason})"


def transition(state: RunState, event: RunEvent) -> RunState | Refused:
    """The state after `event`, or why `event` is refused (nothing changes then)."""
    if state in FINAL:
        return Refused(TransitionRefusal.ALREADY_ENDED, state, event)
    if event is RunEvent.STOP:
        return RunState.STOPPED
    if event is RunEvent.RESUME:
        return (
            RunState.ACTIVE
            if state in HOLDING
            else Refused(TransitionRefusal.NOT_HELD, state, event)
        )
    if state is not RunState.ACTIVE:
        return Refused(TransitionRefusal.NOT_ACTIVE, state, event)
    return {
        RunEvent.PAUSE: RunState.PAUSED,
        RunEvent.STALL: RunState.STALLED,
        RunEvent.FINISH: RunState.FINISHED,
    }[event]


def should_stall(
    failures_since_progress: int, working_assignments: int, limit: int = STALL_AFTER_FAILURES
) -> bool:
    """True once `limit` node failures arrived with no round closed since (nor since resume)
    while no other node is training or has delivered in the current round: one broken node
    among working ones does not stall a run."""
    return failures_since_progress >= limit and working_assignments == 0
