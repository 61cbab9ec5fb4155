"""The round ticker: advances every active run's round as the clock, the uploads and the nodes'
liveness dictate, and closes the rounds that are due.

`tick` is what the hub's ticker thread calls (hub/app.py) every `TICK_S`, and what the tests
call: it writes the liveness notes and download counts, recounts the live nodes, wakes this
process's long-polls for changes other replicas made (`watch_rounds`) and, on the replica
holding the ticker lease only, pre-screens uploads and advances each run that is due
(hub/tick_schedule.py) through `advance_run`. A run's advance is one `Tick` of the round engine
under the run's row lock (`advance`); a close due there, and a SecAgg round's unmask with
the close it leads to, are computed outside the lock first (`_prepare_close`) and published
under it (`_close`, `HubPrivacy.advance_secagg`). A run whose advance keeps failing is stalled
(`_run_failed`, `RUN_FAILURES_TO_STOP`). hub/privacy.py calls `advance` too, when a SecAgg
stage's last answer arrives, so the stage moves on at once rather than at the next tick; an
unmask due then is left to the ticker (the run marked).

`HubService` builds one `Ticker` (`service.ticker`) and hands it the ticker lease, the round
watch and the epoch poster (hub/replicas.py, hub/epochs.py), which only the ticker uses and so
owns, with the consecutive failures of each run and the versions and SecAgg unmasks computed
outside the lock (`_prepared`, `_unmasked`: each keyed by what it was computed from, taken
under the lock only when that still matches). It shares the service's:
- database sessions, blob store, lock and clock (`clock`: the service's, called through it, so
  a clock the tests put on the service is this one's too): every decision is taken under the
  hub's one lock, the one the asks and uploads decide under;
- tick schedule (`ticks`), which the requests mark and the ticker reads;
- membership (the liveness notes to write, the live count, the live window), download counts
  (`downloads`), trust (pre-screening, screening and settling a close) and privacy (a SecAgg
  session's config and stages and its recovered sum, a close's privacy record, the epsilon
  budget);
- run reads and writes that the requests share: the run's row locked (`locked_run`), its round
  as the round engine sees it (`read_round`), a lifecycle event (`apply_event`), the run's
  workload (`workload`, `forget_workload`) and Streaming DiLoCo fragment (`fragment`);
- the asks' cache of achieved speeds (`forget_speeds`: a run another replica changed has its
  nodes' entries dropped), and the hooks the HTTP layer sets on the service after it is built,
  called through it, never copied (`metrics`, `round_changed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from gridswarm.config import RunConfig
from gridswarm.hub import engine as round_engine
from gridswarm.hub import models as m
from gridswarm.hub.aggregation import SecAggSum, aggregate_round
from gridswarm.hub.closing import NewVersion, close_inputs, compute_version, version_key
from gridswarm.hub.engine import RoundSnapshot
from gridswarm.hub.errors import UnreadableSettings
from gridswarm.hub.lifecycle import RunEvent, RunState
from gridswarm.hub.rounds import Decision, RoundRules
from gridswarm.hub.secagg_unmask import UnmaskOutcome, unmask_outcome
from gridswarm.hub.states import RoundStatus
from gridswarm.hub.store import contributions as contribution_store
from gridswarm.hub.store import runs as run_store
from gridswarm.hub.store import versions as version_store
from gridswarm.hub.store.locks import lock_run
from gridswarm.hub.store.rounds import apply_effects
from gridswarm.hub.store.trust import unaudited_in_round

if TYPE_CHECKING:
    from gridswarm.blobs import FileBlobStore
    from gridswarm.hub.downloads import Downloads
    from gridswarm.hub.epochs import EpochPoster
    from gridswarm.hub.membership import Membership
    from gridswarm.hub.metrics import WorkObserver
    from gridswarm.hub.privacy import HubPrivacy
    from gridswarm.hub.replicas import RoundWatch, TickerLease
    from gridswarm.hub.tick_schedule import TickSchedule
    from gridswarm.hub.trust import HubTrust
    from gridswarm.train.workload import Workload

CLOSE_PRESCREEN_S = 30.0  # a due close waits at most this long for pre-screening (ticker only)
RUN_FAILURES_TO_STOP = 3  # consecutive failed ticks of one run before it is stalled
log = logging.getLogger("gridswarm.hub")


class Ticker:
    """The round ticker of one hub process (see the module's docstring for the state it owns
    and the state it shares with `HubService`)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        blobs: FileBlobStore,
        lock: threading.RLock,
        clock: Callable[[], float],
        ticks: TickSchedule,
        membership: Membership,
        downloads: Downloads,
        trust: HubTrust,
        privacy: HubPrivacy,
        lease: TickerLease,
        watch: RoundWatch | None,
        epochs: EpochPoster | None,
        locked_run: Callable[[Session, str], m.Run],
        read_round: Callable[[Session, m.Run], tuple[m.Round, RoundSnapshot, RoundRules]],
        apply_event: Callable[[Session, m.Run, RunEvent, str], dict],
        workload: Callable[[str, str], Workload],
        forget_workload: Callable[[str], object],
        fragment: Callable[[m.Run, int], tuple[int, int] | None],
        forget_speeds: Callable[[str], None],
        metrics: Callable[[], WorkObserver],
        round_changed: Callable[[str], None],
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.lock = lock
        self.clock = clock
        self.ticks = ticks
        self.membership = membership
        self.downloads = downloads
        self.trust = trust
        self.privacy = privacy
        # replicas (hub/replicas.py): only the lease holder advances rounds; each replica wakes
        # its own long-polls for changes the others made (`watch`, None on SQLite: one process)
        self.lease = lease
        self.watch = watch
        self.epochs = epochs  # the lease holder posts reward epochs (hub/epochs.py)
        self.locked_run = locked_run
        self.read_round = read_round
        self.apply_event = apply_event
        self.workload = workload
        self.forget_workload = forget_workload
        self.fragment = fragment
        self.forget_speeds = forget_speeds  # a run's nodes' achieved speeds: the asks' cache
        self.metrics = metrics
        self.round_changed = round_changed
        self._failures: dict[str, int] = {}  # run id -> consecutive failed ticks
        self._prepared: dict[str, NewVersion] = {}  # run -> its next version, computed unlocked
        self._unmasked: dict[str, UnmaskOutcome] = {}  # run -> its SecAgg unmask, likewise

    def tick(self) -> list[tuple[str, Decision]]:
        """Advance every active run's round as the clock and submissions dictate.

        Runs are isolated: an exception in one run's advance is logged (once) and the others go
        on; after `RUN_FAILURES_TO_STOP` failures in a row (a transient database error passes)
        the run is marked `stalled` with the error as its reason (`run_status` shows it; the
        sponsor may resume it).

        With several replicas on one database every replica writes its heartbeat notes and wakes
        its long-polls for changes the others made (`watch_rounds`), and only the one holding
        the ticker lease (hub/replicas.py) screens and advances rounds.

        A run is advanced only when it is due (hub/tick_schedule.py): an event changed it (in
        this process, or in another replica: `watch_rounds`), the round engine's wake-up for
        its round has come (`Step.wake_at`: its deadline, a node's silence passing the
        liveness window), or `FULL_TICK_S` passed; pre-screening runs only after an event
        (an upload) or while it still finds contributions to examine. The other runs' tick
        would decide nothing: it is skipped (bench/results/hub_tick_skip.md).
        """
        terms = self.lease.terms
        if not self.lease.held():
            with self.sessions() as s:
                # the lease holder decides with every replica's notes
                self.membership.flush_heartbeats(s)
                self.downloads.flush(s)
                s.commit()
            self.membership.count_live_nodes()
            self.watch_rounds()
            return []
        if self.lease.terms != terms:  # taken over: what another replica ticked is in the db
            self.trust.forget_cached()
            self._failures.clear()
            self.ticks.forget()
        now = self.clock()
        screen_marks = self.ticks.screening_due(now)
        if screen_marks is not None:  # an upload came, or a verdict may still be pending
            try:  # audit uploads as they arrive, outside the lock
                examined = self.trust.prescreen(self.workload)
            except Exception:
                log.exception("prescreening contributions failed; the rounds go on")
                examined = -1  # due again
            self.ticks.screened(screen_marks, examined, now)
            if examined > 0:
                self.ticks.mark_all()  # verdicts written: the rounds' counts may have moved
        done = []
        with self.sessions() as s:
            # who is lost is decided on every heartbeat received
            self.membership.flush_heartbeats(s)
            self.downloads.flush(s)
            s.commit()
            run_ids = run_store.active_run_ids(s)
        self.metrics().active_runs(len(run_ids))
        self.membership.count_live_nodes()
        self.watch_rounds()
        now = self.clock()  # pre-screening may have taken a while
        liveness_s = self.membership.liveness_s(now)
        self.ticks.retain(run_ids)
        active = set(run_ids)
        for prepared in (self._prepared, self._unmasked):  # of runs no longer active: dropped
            for run_id in prepared.keys() - active:
                del prepared[run_id]
        for run_id in run_ids:
            if not self.ticks.due(run_id, now, liveness_s):
                continue  # nothing changed it, and nothing can on the clock alone yet
            marks = self.ticks.begin(run_id)  # before its round is read
            started = time.perf_counter()
            try:
                decision = self.advance_run(run_id)
            except Exception as exc:
                self._run_failed(run_id, exc)
                continue
            self.metrics().round_advanced(decision, time.perf_counter() - started)
            self.ticks.end(run_id, marks, now, liveness_s)
            self._failures.pop(run_id, None)
            if decision is not Decision.WAIT:
                done.append((run_id, decision))
        if self.epochs is not None:
            self.epochs.maybe_post()  # when due; the chain's failures are its own (logged)
        return done

    def advance_run(self, run_id: str) -> Decision:
        """Advance one run's round now: the heavy part of a due close (and of a SecAgg round's
        unmask) computed outside any lock, then the decision taken and committed under the
        run's row lock. Safe to call from several replicas at once: one closes the round, the
        others find it closed and wait.

        Most ticks find nothing to close or unmask: the round is read once, under the lock, and
        a close or unmask found due there is rolled back and redone as before
        (`_prepare_close`, then `advance`, which computes under the lock only what changed
        meanwhile).
        (Reading the round first in `_prepare_close` on every tick as well cost a quarter of
        the ticker's CPU: bench/results/hub_round_cpu.md.)"""
        with self.lock:
            decision = self.advance(run_id, defer_close=True)
        if decision is not None:
            return decision
        self._prepare_close(run_id)
        with self.lock:
            return self.advance(run_id)

    def watch_rounds(self) -> None:
        """Replicas only: wake this process's long-polls of the runs whose round, state or
        places another replica changed, and forget the cached speeds of their nodes (another
        replica took their contributions)."""
        if self.watch is None:
            return
        try:
            with self.sessions() as s:
                moved = self.watch.changed(s, self.membership.live_cutoff(self.clock()))
        except Exception:
            log.exception("watching the rounds of other replicas failed")
            return
        self.ticks.mark(*moved)  # another replica changed them: advance them here
        for run_id in moved:
            self.forget_speeds(run_id)
            self.round_changed(run_id)

    def _run_failed(self, run_id: str, exc: Exception) -> None:
        """Count a failure of `run_id`'s advance; stall the run once it keeps failing."""
        count = self._failures[run_id] = self._failures.get(run_id, 0) + 1
        if count == 1:
            log.exception("run %s: advancing its round failed", run_id)
        if count < RUN_FAILURES_TO_STOP and not isinstance(exc, UnreadableSettings):
            return  # possibly transient (a locked database); stored settings that do not
            # validate never will
        error = f"the hub could not advance its round: {type(exc).__name__}: {exc}"[:2000]
        with self.lock, self.sessions() as s:
            run = lock_run(s, run_id)
            if run is not None and run.status == RunState.ACTIVE:
                self.apply_event(s, run, RunEvent.STALL, error)
                s.commit()
        self._failures.pop(run_id, None)
        self.forget_workload(run_id)

    def advance(self, run_id: str, defer_close: bool = False) -> Decision | None:
        """One `Tick` of the round engine for the run, its effects applied and committed under
        the run's row lock; a round due to close is screened and published (`_close`). In a
        SecAgg run the tick opens the round's secure aggregation instead (`OpenSecAgg`, with the
        session's config computed here by `HubPrivacy.session_config`), and a round already
        in it moves through its stages (`HubPrivacy.advance_secagg`: a `SecAggProgress` step,
        the unmask where it says so, prepared by `_prepare_close` when it still matches),
        answering CLOSE once the sum is recovered. `defer_close`: a close, or an unmask not
        prepared from what is still the round's, is not done here: nothing is written and the
        answer is None (`_prepare_close` computes it outside the lock).

        Called under the hub's lock by `advance_run` and by `HubPrivacy._move_on` (with
        `defer_close`: a SecAgg stage's last answer moves the stage on at once, its unmask left
        to the ticker), hence public."""
        now = self.clock()
        with self.sessions() as s:
            # the run's row stays locked until the decision commits: a replica that closed this
            # round first makes the others read the next round here, and they do nothing
            run = self.locked_run(s, run_id)
            if run.status != RunState.ACTIVE:  # paused or stopped since `tick` listed it
                return Decision.WAIT
            rnd, snapshot, rules = self.read_round(s, run)
            tick = round_engine.step(snapshot, rules, round_engine.Tick(), now)
            if defer_close and tick.decision is Decision.CLOSE:
                s.rollback()
                return None
            opens = any(isinstance(e, round_engine.OpenSecAgg) for e in tick.effects)
            config = self.privacy.session_config(s, run, rnd) if opens else None
            # lost nodes missed; a re-plan; a SecAgg session opened
            apply_effects(s, run, rnd, tick.effects, secagg_config=config)
            decision, after = tick.decision, tick.snapshot
            # a round that changed wakes the nodes waiting for work: a close or re-plan, and
            # also lost nodes' places freed in a round that waits on (MarkMissed)
            changed = decision is not Decision.WAIT or any(
                isinstance(e, round_engine.MarkMissed) for e in tick.effects
            )
            if snapshot.status == RoundStatus.SECAGG:  # one opened now waits for its answers
                prepared = self._unmasked.get(run_id)
                stepped = self.privacy.advance_secagg(
                    s, run, rnd, after, rules, now, prepared, defer_unmask=defer_close
                )
                if stepped is None:  # its unmask is due: computed outside the lock first
                    s.rollback()
                    return None
                decision, after = stepped.decision, stepped.snapshot
            elif tick.wake_at is not None:  # (SecAgg stages have clocks of their own: due)
                self.ticks.wake(run_id, tick.wake_at)  # nothing changes before, bar an event
            if decision is Decision.CLOSE:
                decision = self._close(s, run, rnd, after, rules, now)
            else:
                s.commit()
        if changed or decision is not Decision.WAIT:
            self.round_changed(run_id)  # long-polls waiting for this run ask again
        return decision

    @staticmethod
    def _accepted(s: Session, run_id: str, round_number: int) -> list[m.Contribution]:
        """The round's accepted contributions: what its close aggregates."""
        return contribution_store.accepted_contributions(s, run_id, round_number)

    def _prepare_close(self, run_id: str) -> None:
        """Outside the lock: if the run's round is due to close, compute its new version now
        (decode, aggregate, outer step, down-codec, blobs fsynced, held-out loss) so that `_close`,
        under the lock, only checks that the round is still the one computed and writes rows.
        A SecAgg round whose stage says unmask has its unmask computed first (`_prepare_unmask`)
        and, if that recovered the sum, the version from it. Reads only; a round that changed
        meanwhile (a late upload or unmask answer, a rejection by screening) is simply computed
        again under the lock."""
        now = self.clock()
        with self.sessions() as s:
            run = run_store.run_row(s, run_id)
            if run is None or run.status != RunState.ACTIVE:
                return
            rnd, snapshot, rules = self.read_round(s, run)
            tick = round_engine.step(snapshot, rules, round_engine.Tick(), now)
            if snapshot.status != RoundStatus.SECAGG:
                if tick.decision is Decision.CLOSE:
                    s.rollback()  # the round's rows are read again after its pre-screening
                    self._prescreen_round(run.id, rnd.number)
                    contributions = self._accepted(s, run.id, rnd.number)
                    if contributions:
                        base = version_store.version_row(s, run.id, rnd.base_version)
                        self._new_version(run, rnd, run.settings(), base, contributions, None)
                s.rollback()
                return
            inputs = self.privacy.unmask_inputs(s, run, rnd, tick.snapshot, rules, now)
            s.rollback()  # the unmask holds no session
        if inputs is not None:  # the stage says unmask: no session, no lock
            self._prepare_unmask(run_id, unmask_outcome(inputs, self.blobs.get, self.blobs.put))

    def _prescreen_round(self, run_id: str, number: int) -> None:
        """Before a due close is computed: audit and score, outside the lock, what of the round
        pre-screening has not reached yet (`HubTrust.prescreen`, a batch at a time), so that the
        close's screening under the lock (`HubTrust.screen_round`) has no replay left to run
        while every request waits. Only the ticker thread waits here, at most
        CLOSE_PRESCREEN_S; what is left then, fails, or is forced (identical updates from
        several nodes) is screened under the lock as before."""
        started = time.monotonic()
        while time.monotonic() - started < CLOSE_PRESCREEN_S:
            with self.sessions() as s:
                if not unaudited_in_round(s, run_id, number):
                    return
            try:
                if self.trust.prescreen(self.workload) <= 0:
                    return  # nothing it can examine: left to the close
            except Exception:
                log.exception("run %s: pre-screening before its close failed", run_id)
                return

    def _prepare_unmask(self, run_id: str, outcome: UnmaskOutcome) -> None:
        """Keep a SecAgg unmask computed outside the lock (its sum's blob already stored) for
        `HubPrivacy.advance_secagg`, and, if it recovered the sum, compute the version the
        close will publish from it: the contributions it keeps are the survivors' (the others
        are dropped by `FinishSecAgg`). Reads only; a round that moved on is left alone."""
        self._unmasked[run_id] = outcome
        if outcome.sum_blob is None:  # a failure: decided and written under the lock
            return
        with self.sessions() as s:
            run = run_store.run_row(s, run_id)
            if run is None or run.status != RunState.ACTIVE:
                return
            rnd = run_store.round_row(s, run.id, run.round)
            if rnd is None or (run.id, rnd.number, rnd.attempt) != outcome.key[:3]:
                return
            survivors = set(outcome.survivors)
            contributions = [
                c for c in self._accepted(s, run.id, rnd.number) if c.node_id in survivors
            ]
            if contributions:
                base = version_store.version_row(s, run.id, rnd.base_version)
                secagg = SecAggSum(outcome.sum_blob, outcome.participants)
                self._new_version(run, rnd, run.settings(), base, contributions, secagg)
            s.rollback()

    def _new_version(
        self,
        run: m.Run,
        rnd: m.Round,
        cfg: RunConfig,
        base: m.Version,
        contributions: list[m.Contribution],
        secagg: SecAggSum | None,
    ) -> NewVersion:
        """The version a close publishes from `contributions` (and, under SecAgg, the recovered
        `secagg` sum; blobs written before any row names them): taken from `_prepare_close`
        when it computed the same round from the same contributions and sum
        (`closing.version_key`), else computed here (`closing.compute_version`)."""
        key = version_key(run, rnd, base, contributions, secagg)
        prepared = self._prepared.pop(run.id, None)
        if prepared is not None and prepared.key == key:
            self._prepared[run.id] = prepared  # kept until the close commits (or is redone)
            return prepared
        fragment = self.fragment(run, rnd.number)  # Streaming DiLoCo: this round's slice only
        tokens = [c.tokens for c in contributions]
        new = compute_version(
            close_inputs(key, run, rnd, cfg, base, contributions, fragment),
            # plain aggregator, DP-FedAvg or the SecAgg sum (pure: hub/aggregation.py)
            lambda uploads, weights: aggregate_round(
                cfg, tokens, uploads, weights, secagg, self.blobs.get, self.blobs.put
            ),
            lambda theta: self.workload(run.id, run.config_json).evaluate(theta),
            self.blobs.get,
            self.blobs.put,
        )
        self._prepared[run.id] = new
        return new

    def _close(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        snapshot: RoundSnapshot,
        rules: RoundRules,
        now: float,
    ) -> Decision:
        """A round due to close: screen its contributions (`Screened`: a re-plan if audits left
        fewer than the quorum), aggregate them, step the outer optimizer and store the new
        version, settle, then `Published`: the round closes and the run goes on or finishes.
        Commits; answers CLOSE or REPLAN."""
        cfg = run.settings()
        workload = self.workload(run.id, run.config_json)
        base = version_store.version_row(s, run.id, rnd.base_version)
        # replay audits + usefulness first: rejected contributions are not aggregated (trust.py)
        screening = self.trust.screen_round(s, run, rnd, cfg, workload, base)
        screened = round_engine.step(snapshot, rules, round_engine.Screened(screening), now)
        if screened.decision is Decision.REPLAN:  # audits left fewer than the quorum
            apply_effects(s, run, rnd, screened.effects)
            s.commit()
            return Decision.REPLAN
        contributions = self._accepted(s, run.id, rnd.number)
        secagg = self.privacy.secagg_sum(s, run, rnd)  # the recovered sum, under SecAgg
        new = self._new_version(run, rnd, cfg, base, contributions, secagg)
        tokens = sum(c.tokens for c in contributions)
        tokens_total = run.tokens_total + tokens
        version = m.Version(
            run_id=run.id, tokens_total=tokens_total, created_at=now, **new.columns()
        )
        version_store.add_version(s, version)
        # the DP round's accounting and the SecAgg aggregate, with the version that used them
        self.privacy.record_close(s, run, rnd, cfg, new.privacy, now)
        self.trust.settle_round(s, run, rnd, cfg, version)  # verdicts, rewards, reputation
        # the epsilon budget: would one more round pass it (DP accounting, hub/privacy.py)
        privacy_stop = self.privacy.stop_reason(s, run, cfg)
        event = round_engine.Published(new.number, tokens_total, privacy_stop)
        published = round_engine.step(screened.snapshot, rules, event, now)
        apply_effects(s, run, rnd, published.effects)
        log.info(
            "run %s round %d closed (%s): %d contributions from %s, %d tokens, "
            "val loss %.4f -> %.4f",
            run.id,
            rnd.number,
            rnd.close_reason,
            len(contributions),
            ", ".join(sorted({c.node_id for c in contributions})) or "-",
            tokens,
            base.val_loss,
            version.val_loss,
        )
        if run.status == RunState.FINISHED:
            log.info("run %s finished at version %d: %s", run.id, new.number, run.status_reason)
        s.commit()
        return Decision.CLOSE
