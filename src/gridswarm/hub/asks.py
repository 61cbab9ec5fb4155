"""The ask for work (`POST /v1/runs/{run}/assignments`): a batch of asks decided under the lock.

`assignments_or_wait` decides a run's asks together in one transaction under the service's
lock: one lock of the run's row, one read of the round's counts (`Seats`, kept current as the
batch's asks take places), one commit for all; the round engine decides each ask (`Asked`,
hub/engine.py) on the facts gathered for it: the seat rule, the trust admission, then the
node's speed against the fastest live node's and the energy policy's share (`_energy_work`).
An ask the engine gives no work is answered with when asking again could answer otherwise,
which the HTTP layer's long-polls sleep on.

`HubService` builds one `Asks` (`service.asks`); `hub/app.py` gathers the asks that arrive
while a batch is decided (`RunBatcher`) and calls `assignments_or_wait`. It owns the caches
of the ask path: the version blobs an assignment names, the hub's own carbon forecasts
(fetched before the lock, never under it) and the nodes' speeds per run (each node's achieved
speed, and the fastest live node's, cached for LIVE_VIEW_S). Those speeds are changed from
outside too: registration raises the fastest (`raise_fastest`, handed to `Membership`), a
stored upload re-reads its node's achieved speed (`contributed`, called by `Uploads`), and a
round that another replica moved drops its run's (`forget_speeds`, called by the ticker).

It is handed, not copied, what it shares with the service: the session factory; the clock
(the service's, called through it, so a clock the tests put on the service is this one's
too); the lock, under which the ticker and the uploads decide the same rounds; the tick
schedule (an assignment marks its run); the membership (the live window, the asking nodes'
signs of life); the trust object (admission, a round's audit seed); the hub's carbon signals;
and two reads the ticker and the run lifecycle use as well: the run's row, locked
(`HubService._run`), and a run's round rules (`HubService._rules`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from gridswarm.config import RunConfig
from gridswarm.energy.signals import SignalProvider
from gridswarm.hub import energy as hub_energy
from gridswarm.hub import engine as round_engine
from gridswarm.hub import models as m
from gridswarm.hub.engine import (
    Asked,
    AskWait,
    OpenRound,
    PlanRules,
    SeatFacts,
    WorkFacts,
    round_wait,
    run_wait,
    seat_refusal,
)
from gridswarm.hub.errors import HubError, decided_alone
from gridswarm.hub.membership import Membership
from gridswarm.hub.rounds import RoundRules
from gridswarm.hub.scheduler import speed_from_probe, update_speed
from gridswarm.hub.states import AssignmentStatus
from gridswarm.hub.store import contributions as contribution_store
from gridswarm.hub.store import nodes as node_store
from gridswarm.hub.store import runs as run_store
from gridswarm.hub.store import versions as version_store
from gridswarm.hub.store.rounds import apply_effects, row_snapshot, run_snapshot
from gridswarm.hub.tick_schedule import TickSchedule
from gridswarm.hub.trust import HubTrust
from gridswarm.protocol import Assignment, AssignmentResponse, NodeStatus, Refusal

LIVE_VIEW_S = 1.0  # the fastest live node's speed is recomputed at most this often (clock s)
SPEED_WINDOW = 5  # a node's achieved speed: moving average over its last this many contributions
SPEED_BATCH = 500  # node ids per batched speed read (well under SQLite's bound-parameter limit)
FORECAST_TTL_S = 60.0  # the hub's own carbon forecasts are fetched again after this
MAX_VERSION_BLOBS = 4096  # versions whose blobs are kept; past it the cache starts again
log = logging.getLogger("gridswarm.hub")


AskAnswer = tuple[AssignmentResponse, float | None] | HubError
"""One ask for work decided: the answer and when asking again could differ, or its refusal."""


@dataclass
class Seats:
    """The counts one batch of asks for work decides on (`Asks.assignments_or_wait`),
    read once and kept current as the batch's asks take places: the round's places taken, the
    live nodes, which asking nodes hold a place, and (read when first needed) the live nodes
    with a place."""

    run_id: str
    round_number: int  # the run's current round, whose places these are
    active: int  # places taken (assigned or submitted)
    live: int  # live nodes, the asking ones included once they asked
    seated: set[str]  # asking nodes that hold a place, and those given one in this batch
    live_asking: set[str] = field(default_factory=set)  # asking nodes live only by asking
    cutoff: float = 0.0
    _live_with_seat: int | None = None
    _taken_in_batch: int = 0

    @classmethod
    def read(cls, s: Session, run: m.Run, node_ids: list[str], cutoff: float) -> Seats:
        """The counts of `run`'s current round for a batch of asks by `node_ids` (three
        indexed queries; nodes heard from since `cutoff` are live)."""
        seated = contribution_store.seated_nodes(s, run.id, run.round, node_ids)
        active = contribution_store.count_places_taken(s, run.id, run.round)
        live = node_store.count_live_nodes(s, cutoff)
        return cls(run.id, run.round, active, live, seated, cutoff=cutoff)

    def live_with_seat(self, s: Session) -> int:
        """Live nodes holding a place (one count, read when an ask first needs it)."""
        if self._live_with_seat is None:
            self._live_with_seat = contribution_store.count_live_with_place(
                s, self.run_id, self.round_number, self.cutoff
            )
        return self._live_with_seat + self._taken_in_batch

    def take(self, node_id: str) -> None:
        """`node_id` (live: it asked) was given a place in this batch."""
        self.active += 1
        self.seated.add(node_id)
        self._taken_in_batch += 1


@lru_cache(maxsize=256)
def config_echo(config_json: str) -> dict[str, Any]:
    """A run's settings as an assignment echoes them to the node, decoded once per run (a
    run's settings never change): shared by every answer, read only."""
    return json.loads(config_json)


@dataclass(frozen=True)
class VersionBlobs:
    """What of a version's row an assignment names (`Asks._version_blobs`)."""

    weights_blob: str
    delta_blob: str | None


class Asks:
    """The ask-for-work path over the state it is handed (see the module's docstring for the
    state it owns and the state it shares with `HubService`)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], float],
        lock: threading.RLock,
        ticks: TickSchedule,
        membership: Membership,
        trust: HubTrust,
        signals: dict[str, SignalProvider],
        lock_run: Callable[[Session, str], m.Run],
        rules: Callable[[RunConfig], RoundRules],
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.lock = lock
        self.ticks = ticks
        self.membership = membership
        self.trust = trust
        self.signals = signals  # region -> the hub's own carbon signal (`--signals`)
        self.lock_run = lock_run  # the run's row, locked until the transaction ends (404)
        self.rules = rules  # a run's round rules
        # caches that keep asking independent of the swarm's size (rebuilt on restart)
        self._achieved: dict[tuple[str, str], float | None] = {}  # (run, node) -> tokens/s
        self._versions: dict[tuple[str, int], VersionBlobs] = {}  # (run, number) -> its blobs
        self._live_view: dict[
            str, tuple[float, float | None, int]
        ] = {}  # run -> at, fastest, numel
        self._forecasts: dict[tuple[str, float], tuple[float, list | None]] = {}

    def request_assignment(self, run_id: str, node_id: str) -> AssignmentResponse:
        """Work for `node_id`, or why not (`assignment_or_wait`'s answer, without its wake-up)."""
        return self.assignment_or_wait(run_id, node_id)[0]

    def assignment_or_wait(
        self, run_id: str, node_id: str
    ) -> tuple[AssignmentResponse, float | None]:
        """Work for `node_id`, or why not, and when asking again could answer differently (see
        `assignments_or_wait`, which decides it); raises the node's HubError."""
        answer = self.assignments_or_wait(run_id, [node_id])[0]
        if isinstance(answer, HubError):
            raise answer
        return answer

    def assignments_or_wait(self, run_id: str, node_ids: list[str]) -> list[AskAnswer]:
        """Work for each of `node_ids` (in that order), or why not, and when asking again could
        answer differently: None when only a change of the run's round can (a close, a replan,
        a node leaving, enough nodes live: `round_changed` fires), else after that many seconds.
        A long-poll sleeps until then instead of asking again and again. A node's refusal (not
        registered, excluded) is its HubError in its place; the others are answered.

        The asks are decided together, one after the other as if they came in this order, in
        one transaction: one lock, one read of the round's counts, one commit for all (the HTTP
        layer gathers the asks that arrive while a decision runs, `RunBatcher`). A round's
        thousands of asks then cost a few commits, not one each. Reads counts and the asking
        nodes' own rows, never all the round's rows or all the live nodes, so the cost per ask
        does not grow with the swarm (agnostic runs). Should deciding fail for a reason that is
        not a refusal (a bug), each ask is decided again on its own, so it fails only its own."""
        unique = list(dict.fromkeys(node_ids))
        now = self.clock()
        if self.signals:
            self._prefetch_forecasts(run_id, now)
        try:
            with self.lock, self.sessions() as s:
                answers = self._decide_asks(s, run_id, unique, now)
                s.commit()
        except HubError:
            raise  # the run's own refusal (404): every ask's answer
        except Exception:
            if len(unique) == 1:
                raise
            alone = decided_alone(
                f"run {run_id}",
                "asks for work",
                unique,
                lambda one: self.assignments_or_wait(run_id, one),
            )
            answers = dict(zip(unique, alone, strict=True))
        return [answers[node_id] for node_id in node_ids]

    def _decide_asks(
        self, s: Session, run_id: str, node_ids: list[str], now: float
    ) -> dict[str, AskAnswer]:
        """The decisions of `assignments_or_wait`, in the caller's transaction (not committed).
        Reads first, writes at the end of each ask: on SQLite a write takes the database's one
        write lock until commit, and the nonces and heartbeats of other requests wait for it."""
        s.autoflush = False
        run = self.lock_run(s, run_id)  # replicas decide one batch at a time
        nodes = {n.id: n for n in node_store.nodes_by_id(s, node_ids)}
        cutoff = self.membership.live_cutoff(now)
        answers: dict[str, AskAnswer] = {}
        for node_id in node_ids:
            if node_id not in nodes:
                answers[node_id] = HubError(
                    403, f"node {node_id} is not registered", Refusal.NOT_REGISTERED
                )
        asking = [nodes[n] for n in node_ids if n in nodes]
        self.membership.note_asking(asking, now)  # later requests: signs of life
        # the round engine decides each ask (hub/engine.py `Asked`); what is the same for the
        # whole batch (the run not active, the round's SecAgg running) is asked once, before
        # the round's row and counts are read
        run_snap = run_snapshot(run)
        waiting = run_wait(run_snap)
        if waiting is None:
            rnd = run_store.round_row(s, run.id, run.round)
            waiting = round_wait(row_snapshot(run, rnd, run_snap))
        if waiting is not None:
            answer = self._waiting(waiting)
            return answers | {node.id: answer for node in asking}
        seats = Seats.read(s, run, [node.id for node in asking], cutoff)
        for node in asking:
            try:
                answers[node.id] = self._decide_ask(s, run, rnd, seats, node, cutoff, now)
            except HubError as refusal:  # raised before that ask wrote anything
                answers[node.id] = refusal
        return answers

    @staticmethod
    def _waiting(waiting: AskWait) -> tuple[AssignmentResponse, float | None]:
        """The answer of an ask the round engine gives no work, and when asking again could
        answer otherwise."""
        response = AssignmentResponse(
            status="finished" if waiting.finished else "wait",
            retry_after_s=waiting.retry_after_s,
            reason=waiting.reason,
        )
        return response, waiting.changes_after_s

    def _decide_ask(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        seats: Seats,
        node: m.Node,
        cutoff: float,
        now: float,
    ) -> tuple[AssignmentResponse, float | None]:
        """One node's ask in a batch: its answer, with the batch's counts (`seats`) kept
        current as places are taken. The round engine decides (`Asked`) on the facts gathered
        here, each only once the cheaper checks before it let the node in: the seat rule, then
        the trust admission, then the node's speed and the energy policy's share. Raises
        HubError only before it writes anything."""
        cfg = run.settings()
        rules = self.rules(cfg)
        if node.id in seats.seated:
            held = contribution_store.held_assignment(s, run.id, run.round, node.id)
            if held is not None:
                # the node asks again while its work is outstanding: the answer that gave it
                # was lost (a replica, or the hub, died after the commit). The same work
                # again, so the round need not wait for its deadline.
                # its row is written: no older note may undo it
                self.membership.forget_notes(node.id)
                node.last_seen_at, node.status = now, NodeStatus.TRAINING
                log.info("run %s round %d: assignment sent again to %s", run.id, run.round, node.id)
                return self._assigned(s, run, held), None
        was_live = node.status != NodeStatus.LEFT and node.last_seen_at >= cutoff
        if not was_live and node.id not in seats.live_asking:  # live now, by asking
            seats.live += 1
            seats.live_asking.add(node.id)
        snap = row_snapshot(run, rnd)  # the round as the batch's asks so far left it
        seat = SeatFacts(node.id in seats.seated, seats.active, seats.live)
        plan_rules = PlanRules(
            cfg.tokens_per_step, cfg.train.inner_steps, cfg.train.min_inner_steps
        )
        admission = seat_refusal(snap, rules, seat)
        if admission is None:  # reputation: cheaters excluded (403), reputed nodes first

            def competitor_ids() -> list[str]:
                taken = contribution_store.place_holders(s, seats.run_id, seats.round_number)
                return [
                    n.id
                    for n in self.membership.live_nodes(s, now)
                    if n.id not in taken and n.id not in seats.seated
                ]

            admission = self.trust.admission(
                s,
                node.id,
                rnd,
                cfg.round.max_nodes - seats.active,
                seats.live - seats.live_with_seat(s) - 1,  # the others without a place
                competitor_ids,
            )
        work_facts = None
        if admission is None:  # a place for it: how much work, at what speed
            speed = self._speed(s, run, node.id, node.probe_rate)
            fastest = self._fastest_live(s, run, now)
            work = self._energy_work(s, run, cfg, node, speed, now)
            work_facts = WorkFacts(speed, fastest, work.share, work.window_s, work.retry_after_s)
        asked = Asked(node.id, seat, plan_rules, admission, work_facts)
        decided = round_engine.step(snap, rules, asked, now)
        if decided.wait is not None:
            return self._waiting(decided.wait)
        # the writes of an assignment (hub/store/rounds.py), the round's audit seed with them
        applied = apply_effects(s, run, rnd, decided.effects)
        self.ticks.mark(run.id)  # under the lock the ticker reads the round under
        if any(isinstance(e, OpenRound) for e in decided.effects):
            self.trust.open_round(s, run, rnd)  # audit seed committed on the ledger
            log.info(
                "run %s round %d open (attempt %d, deadline %.0f s)",
                run.id,
                rnd.number,
                rnd.attempt,
                rnd.deadline_at - now,
            )
        row = applied.assignments[0]
        seats.take(node.id)
        self.membership.forget_notes(node.id)
        node.last_seen_at, node.status = now, NodeStatus.TRAINING
        return self._assigned(s, run, row), None

    def _assigned(self, s: Session, run: m.Run, row: m.Assignment) -> AssignmentResponse:
        """The answer that gives a node its assignment `row` (the versions it starts from)."""
        version = self._version_blobs(s, run.id, row.base_version)
        previous = self._version_blobs(s, run.id, row.base_version - 1)
        return AssignmentResponse(
            status=AssignmentStatus.ASSIGNED,
            assignment=Assignment(
                id=row.id,
                run_id=run.id,
                round=row.round,
                attempt=row.attempt,
                base_version=row.base_version,
                weights_blob=version.weights_blob,
                previous_version_blob=previous.weights_blob if previous else None,
                delta_blob=version.delta_blob,
                inner_steps=row.inner_steps,
                deadline_at=row.deadline_at,
                config=config_echo(run.config_json),
            ),
        )

    def _version_blobs(self, s: Session, run_id: str, number: int) -> VersionBlobs | None:
        """The blobs of version `number` of a run (None if there is none), read from its row
        once per process: a version's row is written once, when its round closes, and never
        changed, so every ask of a round need not read the same two rows again."""
        key = (run_id, number)
        blobs = self._versions.get(key)
        if blobs is None and number >= 0:
            row = version_store.version_row(s, run_id, number)
            if row is None:
                return None  # not (yet) there: not remembered
            blobs = VersionBlobs(row.weights_blob, row.delta_blob)
            if len(self._versions) >= MAX_VERSION_BLOBS:
                self._versions.clear()
            self._versions[key] = blobs
        return blobs

    def _prefetch_forecasts(self, run_id: str, now: float) -> None:
        """Fetch the hub's own intensity forecasts (`--signals`, possibly over HTTP) that a green
        run plans with and that are older than FORECAST_TTL_S: before the lock, never under it."""
        with self.sessions() as s:
            run = run_store.run_row(s, run_id)
            cfg = run.settings() if run else None
        if cfg is None or cfg.energy.policy == "agnostic":
            return
        horizon_s = cfg.energy.forecast_horizon_s
        for region, provider in self.signals.items():
            fetched = self._forecasts.get((region, horizon_s))
            if fetched is None or not 0 <= now - fetched[0] <= FORECAST_TTL_S:
                forecast = hub_energy.signal_forecast(provider, now, horizon_s)
                self._forecasts[(region, horizon_s)] = (now, forecast)

    def _energy_work(
        self, s: Session, run: m.Run, cfg: RunConfig, node: m.Node, speed: float, now: float
    ) -> hub_energy.WorkDecision:
        """This node's work share under the run's energy policy (decided in hub/energy.py) over
        the live nodes not busy with another run. `agnostic` needs only the node itself."""
        green = cfg.energy.policy != "agnostic"
        members = {n.id: n for n in (self.membership.live_nodes(s, now) if green else [])} | {
            node.id: node
        }
        self._load_achieved_speeds(s, run.id, list(members))
        nodes = []
        for n in members.values():
            report = hub_energy.parse_report(n.energy_json)
            if n.id != node.id and report and report.get("run_id") not in (None, run.id):
                continue
            fetched = self._forecasts.get((n.region or "", cfg.energy.forecast_horizon_s))
            forecast = fetched[1] if green and fetched else None  # fetched before the lock
            n_speed = speed if n.id == node.id else self._speed(s, run, n.id, n.probe_rate)
            nodes.append(hub_energy.LiveNode(n.id, n_speed, n.region, report, forecast))
        remaining, deadline = hub_energy.run_targets(cfg, run.created_at, run.tokens_total)
        compute_s, wall_s = hub_energy.round_timing(cfg, max(n.tokens_per_s for n in nodes))
        return hub_energy.decide_work(
            cfg.energy,
            node.id,
            nodes,
            now,
            tokens_remaining=remaining,
            deadline_at_s=deadline,
            compute_s=compute_s,
            wall_s=wall_s,
            quorum=cfg.round.quorum,
        )

    # ---------------------------------------------------------------- speeds

    def _achieved_speed(self, s: Session, run_id: str, node_id: str) -> float | None:
        """Moving average of the tokens/s `node_id` achieved in this run (its last SPEED_WINDOW
        contributions), None before its first; cached, and refreshed when it contributes."""
        self._load_achieved_speeds(s, run_id, [node_id])
        return self._achieved[(run_id, node_id)]

    def _load_achieved_speeds(self, s: Session, run_id: str, node_ids: list[str]) -> None:
        """Fill the achieved-speed cache for those of `node_ids` not in it, in one query per
        SPEED_BATCH nodes (each node's last SPEED_WINDOW contributions, ranked by a window
        function) instead of one query per node, at a cost that does not grow by one round
        trip per live node.
        (Recomputing the fastest live node used to send one query per live node, under the
        run's lock: at 1,000 nodes, 570 to 1,570 queries a second, holding every replica's
        assignments behind it; bench/results/hub_load_replicas.md.)"""
        missing = [n for n in dict.fromkeys(node_ids) if (run_id, n) not in self._achieved]
        for start in range(0, len(missing), SPEED_BATCH):
            batch = missing[start : start + SPEED_BATCH]
            rows = contribution_store.recent_speeds(s, run_id, batch, SPEED_WINDOW)
            speeds: dict[str, float | None] = dict.fromkeys(batch)
            for node_id, tokens, train_time_s in rows:
                speeds[node_id] = update_speed(speeds[node_id], tokens, train_time_s)
            for node_id, speed in speeds.items():
                self._achieved[(run_id, node_id)] = speed

    def _speed(self, s: Session, run: m.Run, node_id: str, probe_rate: float) -> float:
        """Tokens/s of a node on this run's model: probe first, then achieved speed."""
        achieved = self._achieved_speed(s, run.id, node_id)
        return achieved if achieved is not None else speed_from_probe(probe_rate, run.numel)

    def _fastest_live(self, s: Session, run: m.Run, now: float) -> float | None:
        """The fastest live node's tokens/s on this run: recomputed from one query of the live
        nodes at most every LIVE_VIEW_S, raised at once when a node registers or contributes
        faster (a stale maximum for up to LIVE_VIEW_S only shortens slow nodes' plans less)."""
        view = self._live_view.get(run.id)
        if view is None or now - view[0] > LIVE_VIEW_S or now < view[0]:
            rows = node_store.live_node_probes(s, self.membership.live_cutoff(now))
            self._load_achieved_speeds(s, run.id, [node_id for node_id, _ in rows])
            speeds = [self._speed(s, run, node_id, probe) for node_id, probe in rows]
            view = (now, max(speeds, default=None), run.numel)
            self._live_view[run.id] = view
        return view[1]

    def raise_fastest(self, run_id: str | None, speed: float | None, probe_rate: float) -> None:
        """A node registered (`run_id` None: every run, speed from its probe) or contributed:
        raise the cached fastest speed if it is now faster."""
        for run, (at, fastest, numel) in list(self._live_view.items()):
            if run_id is None or run == run_id:
                new = speed if speed is not None else speed_from_probe(probe_rate, numel)
                if fastest is None or new > fastest:
                    self._live_view[run] = (at, new, numel)

    def contributed(self, s: Session, run_id: str, node_ids: list[str]) -> None:
        """`node_ids` had contributions to `run_id` stored (`Uploads.store_uploads`): their
        achieved speeds read again, in one query for the batch, and the fastest raised if one
        of them is now faster."""
        for node_id in node_ids:
            self._achieved.pop((run_id, node_id), None)
        self._load_achieved_speeds(s, run_id, node_ids)
        for node_id in node_ids:
            self.raise_fastest(run_id, self._achieved[(run_id, node_id)], 0.0)

    def forget_speeds(self, run_id: str) -> None:
        """Another replica moved `run_id`'s round (it took their contributions): its nodes'
        achieved speeds are read again when next needed."""
        for key in [k for k in self._achieved if k[0] == run_id]:
            self._achieved.pop(key, None)
