"""Which runs the round ticker advances on a tick: those whose round an event changed, those
whose round engine wake-up (`engine.tick_wake_at`) has come, and every run at least every
`FULL_TICK_S`; the others' tick would read the run and its round under the lock and decide
nothing (bench/results/hub_round_cpu.md: 16 % of the hub's CPU in 120 s rounds).

Events are *marks*: the service marks a run when it applies an event to it in this process
(an ask that assigns, an upload decided, a leave, a failure report, a sponsor's change of
state, a registration that releases work) and when `RoundWatch` sees another replica change
it. A mark is a counter, never a flag cleared by the ticker: the ticker takes a run's counter
(`begin`) before it reads the round, and the run is quiet only while the counter is still the
one it took, so a mark that lands while a tick reads the round is never lost. The service
marks after the event's writes are visible to the ticker's read (after the commit, or under
the service lock that the ticker's read takes too).

Pre-screening (`HubTrust.prescreen`) is scheduled the same way: it runs while any event
(an upload) came since it last found nothing to examine, and at least every `FULL_TICK_S`.

Pure bookkeeping: no SQL, no clock of its own (the caller passes the service's clock).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

# the longest a run's round goes without a full tick, whatever the events and wake-ups say: a
# bound on any wake-up missed (a change no event path marks); seconds of the service's clock
FULL_TICK_S = 2.0


@dataclass(frozen=True)
class Quiet:
    """A run's last tick: it saw the run's marks up to `marks`, decided nothing, and nothing
    changes before `wake_at` (unix s) unless an event comes; it ran at `ticked_at` with the
    liveness window `liveness_s` (a shorter window can make a node lost sooner)."""

    marks: int
    wake_at: float
    ticked_at: float
    liveness_s: float


class TickSchedule:
    """The ticker's per-run wake-ups and the events' marks (thread-safe)."""

    def __init__(self, full_tick_s: float = FULL_TICK_S) -> None:
        self.full_tick_s = full_tick_s
        self._lock = threading.Lock()
        self._marks: dict[str, int] = {}  # run id -> events so far
        self._all = 0  # marks of every run at once (added to each run's count)
        self._quiet: dict[str, Quiet] = {}
        self._wakes: dict[str, float] = {}  # run id -> wake-up noted by the advance in progress
        self._screen_marks = 0  # every mark, for pre-screening
        self._screened: tuple[int, float] | None = None  # marks seen, at: found nothing

    # ------------------------------------------------------------------ events

    def mark(self, *run_ids: str) -> None:
        """An event changed these runs' rounds (or may have): their next tick advances them,
        and pre-screening runs (an upload may have come). No runs: nothing changed."""
        if not run_ids:
            return
        with self._lock:
            for run_id in run_ids:
                self._marks[run_id] = self._marks.get(run_id, 0) + 1
            self._screen_marks += 1

    def mark_all(self) -> None:
        """Every run's next tick advances it (a change whose runs the caller does not know)."""
        with self._lock:
            self._all += 1
            self._screen_marks += 1

    def forget(self) -> None:
        """Advance every run at its next tick, and pre-screen then (the ticker lease was taken
        over: what was decided elsewhere meanwhile is unknown here)."""
        with self._lock:
            self._quiet.clear()
            self._screened = None

    # ------------------------------------------------------------------ the ticker

    def due(self, run_id: str, now_s: float, liveness_s: float) -> bool:
        """Whether the tick at `now_s` must advance `run_id`: unknown, marked since its last
        tick, its wake-up come, its liveness window shorter than then, or its last full tick
        `full_tick_s` ago."""
        with self._lock:
            quiet = self._quiet.get(run_id)
            if quiet is None or quiet.marks != self._count(run_id):
                return True
        return (
            not now_s < quiet.wake_at  # NaN-safe: a wake-up that is not a number is due
            or liveness_s < quiet.liveness_s
            or not now_s - quiet.ticked_at < self.full_tick_s
        )

    def begin(self, run_id: str) -> int:
        """The ticker is about to read `run_id`'s round: its marks so far (for `end`). Until
        `end`, the run is due (an advance that fails stays due)."""
        with self._lock:
            self._quiet.pop(run_id, None)
            self._wakes.pop(run_id, None)
            return self._count(run_id)

    def wake(self, run_id: str, wake_at: float) -> None:
        """The advance in progress decided nothing: nothing changes before `wake_at` (the round
        engine's `Step.wake_at`). Not noted: the run stays due (it changed something)."""
        with self._lock:
            self._wakes[run_id] = wake_at

    def end(self, run_id: str, marks: int, now_s: float, liveness_s: float) -> None:
        """The advance `begin` started is done: the run is quiet until its noted wake-up, if
        one was noted (else due at the next tick)."""
        with self._lock:
            wake_at = self._wakes.pop(run_id, None)
            if wake_at is not None and not math.isnan(wake_at):
                self._quiet[run_id] = Quiet(marks, wake_at, now_s, liveness_s)

    def retain(self, run_ids: list[str]) -> None:
        """Forget the runs no longer active (their counters too: a resumed run is unknown,
        hence due)."""
        keep = set(run_ids)
        with self._lock:
            for table in (self._quiet, self._marks, self._wakes):
                for run_id in [r for r in table if r not in keep]:
                    del table[run_id]

    # ------------------------------------------------------------------ pre-screening

    def screening_due(self, now_s: float) -> int | None:
        """The marks so far if pre-screening is due at `now_s` (for `screened`), else None:
        due unless it found nothing since the last event, less than `full_tick_s` ago."""
        with self._lock:
            done = self._screened
            if (
                done is not None
                and done[0] == self._screen_marks
                and now_s - done[1] < self.full_tick_s
            ):
                return None
            return self._screen_marks

    def screened(self, marks: int, examined: int, now_s: float) -> None:
        """Pre-screening that started at `marks` examined `examined` contributions: with none,
        it is not due again before an event (or `full_tick_s`); with some, more may wait."""
        with self._lock:
            self._screened = (marks, now_s) if examined == 0 else None

    def _count(self, run_id: str) -> int:
        return self._marks.get(run_id, 0) + self._all
