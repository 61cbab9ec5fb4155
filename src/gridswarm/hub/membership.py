"""Node registration and liveness: who the hub's nodes are, and which of them are alive.

A node registers when its process starts (`register_many`: the bounds on new identities of
hub/registration.py, its row written, its outstanding assignments released), says it is alive
by heartbeat (`heartbeat`) or by any signed request (`note_seen`), reports its energy
(`report_energy`) and says goodbye (`leave`). Liveness is soft state: the notes are kept in
memory and written in batches (`flush_heartbeats`); a node is live if heard from within
`liveness_s`, which heartbeat pacing (hub/pacing.py) lengthens for a large swarm
(`count_live_nodes` recounts them for it).

`HubService` builds one `Membership` and hands it the heartbeat pacing and the registration
gate (whose live window is the pacing's), which it then owns with the liveness notes and the
set of node ids known registered in this process. It shares the service's:
- clock (`clock`: the service's, called through it, so a clock the tests put on the service
  is this one's too);
- lock (`lock`): registering and leaving release assignments, which change rounds that the
  ticker and the asks decide under that lock;
- tick schedule (`ticks`): the runs whose work was released are marked for the ticker;
- cache of the fastest live node's speed (`raise_fastest`: the asks' state, hub/asks.py, raised
  when a node registers faster) and the HTTP layer's long-poll wake-up (`round_changed`, which
  the HTTP layer sets on the service after it is built: called through the service, never
  copied).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from gridswarm.hub import models as m
from gridswarm.hub.engine import Left, left_effects
from gridswarm.hub.errors import HubError, UnreadableSettings, decided_alone
from gridswarm.hub.pacing import HeartbeatPacing
from gridswarm.hub.registration import RegistrationGate, client_network
from gridswarm.hub.store import contributions as contribution_store
from gridswarm.hub.store import nodes as node_store
from gridswarm.hub.store import runs as run_store
from gridswarm.hub.store.locks import lock_runs
from gridswarm.hub.store.rounds import apply_effects
from gridswarm.hub.tick_schedule import TickSchedule
from gridswarm.identity import node_id_from_public_key
from gridswarm.protocol import EnergyReport, NodeStatus, Refusal, RegisterRequest


@dataclass(frozen=True)
class Registration:
    """One node's registration request, its signature verified (`Membership.register_many`)."""

    public_key: bytes
    request: RegisterRequest
    peer: str | None  # the client's address (the bounds on new identities count by network)


class Membership:
    """Registration, liveness notes and departures of the hub's nodes (see the module's
    docstring for the state it owns and the state it shares with `HubService`)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], float],
        lock: threading.RLock,
        ticks: TickSchedule,
        pacing: HeartbeatPacing,
        registration: RegistrationGate,
        raise_fastest: Callable[[str | None, float | None, float], None],
        round_changed: Callable[[str], None],
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.lock = lock
        self.ticks = ticks
        self.raise_fastest = raise_fastest
        self.round_changed = round_changed
        # node -> status, seen at (unwritten)
        self._heartbeats: dict[str, tuple[NodeStatus, float]] = {}
        self._known_nodes: set[str] = set()  # registered node ids (heartbeats check it)
        # node -> when its last signed request was authenticated (unwritten): any request is a
        # sign of life, so a working node need not send heartbeats beside it (hub/pacing.py)
        self._seen: dict[str, float] = {}
        self._notes_lock = threading.Lock()  # a note never lands in a batch being written
        self.pacing = pacing  # the heartbeat interval and the liveness window (hub/pacing.py)
        # who may register node identities (hub/registration.py): invites, or bounds on new ones
        self.registration = registration

    def note_seen(self, node_id: str, now: float) -> None:
        """A signed request of `node_id` was authenticated at `now`: if the node is known
        registered, a sign of life, noted and flushed in batches (`flush_heartbeats`)."""
        if node_id in self._known_nodes:  # a sign of life: noted, flushed in batches
            with self._notes_lock:
                self._seen[node_id] = now

    def note_asking(self, asking: list[m.Node], now: float) -> None:
        """Nodes that asked for work at `now`: alive and idle until their answer is written. A
        wait answer writes nothing (no fsync): noted, flushed with the heartbeats."""
        with self._notes_lock:
            for node in asking:
                self._heartbeats[node.id] = (NodeStatus.IDLE, now)
        self._known_nodes.update(node.id for node in asking)  # later requests: signs of life

    def liveness_s(self, now: float | None = None) -> float:
        """How long a node may be silent before it is lost: `settings.liveness_s`, longer while
        heartbeats are paced above their minimum interval (hub/pacing.py)."""
        return self.pacing.liveness_s(self.clock() if now is None else now)

    def heartbeat_interval_s(self) -> float:
        """The heartbeat interval to tell a node now (registration and heartbeat answers)."""
        return self.pacing.advertise(self.clock())

    def count_live_nodes(self) -> None:
        """Recount the live nodes, at most every COUNT_EVERY_S (the ticker calls it: one indexed
        count, never on a request's path): for the heartbeat interval, and to wake the
        long-polls of pending rounds whose `min_nodes` the count has just reached (nodes
        become live again by heartbeat too, which no request signals), so those long-polls
        need not ask again on a timer."""
        now = self.clock()
        if not self.pacing.count_due(now):
            return
        with self.sessions() as s:
            live = node_store.count_live_nodes(s, self.live_cutoff(now))
        before = self.pacing.live_nodes
        self.pacing.set_live(live or 0, now)
        if (live or 0) > before:
            self._wake_pending_runs(now, live or 0, crossed_from=before)

    def node(self, s: Session, node_id: str) -> m.Node:
        """`node_id`'s row in the transaction `s` (403 `not_registered` if none), noted alive
        now: its `last_seen_at` is written with `s`, so its unwritten sign of life is dropped."""
        node = node_store.node_row(s, node_id)
        if node is None:
            raise HubError(403, f"node {node_id} is not registered", Refusal.NOT_REGISTERED)
        with self._notes_lock:  # its row is written here: an older note must not undo it
            self._seen.pop(node_id, None)
        node.last_seen_at = self.clock()
        return node

    def register(self, public_key: bytes, req: RegisterRequest, peer: str | None = None) -> str:
        """Register (or re-register: same key, same node) a node; raises its refusal
        (`register_many` with this one registration)."""
        answer = self.register_many([Registration(public_key, req, peer)])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def register_many(self, registrations: list[Registration]) -> list[str | HubError]:
        """Register (or re-register: same key, same node) nodes, in one transaction under one
        lock with one commit: each answer the node's id, or its refusal in its place (a refusal
        writes nothing of its own). A node registers when its process starts, so work it was
        assigned before is gone: its outstanding assignments are released at once and their
        rounds need not wait for the deadline. `peer`: the client's address, for the bounds on
        new identities (hub/registration.py). The HTTP layer gathers the registrations that
        arrive while one batch is decided (`RunBatcher`): 10,000 nodes starting at once are a
        few hundred commits, not 10,000."""
        try:
            answers = self._register_batch(registrations)
        except Exception:
            if len(registrations) == 1:
                raise
            answers = decided_alone(
                "hub", "registrations", registrations, lambda one: self._register_batch(one)
            )
        registered = [a for a in answers if isinstance(a, str)]
        for node_id, r in zip(answers, registrations, strict=True):
            if isinstance(node_id, str):
                self._known_nodes.add(node_id)
                self.raise_fastest(None, None, r.request.probe_tokens_per_s * r.request.probe_numel)
        if registered:
            self._wake_pending_runs(self.clock())
        return answers

    def _register_batch(self, registrations: list[Registration]) -> list[str | HubError]:
        now = self.clock()
        ids = [node_id_from_public_key(r.public_key) for r in registrations]
        answers: list[str | HubError] = []
        with self.lock, self.sessions() as s:
            runs = self._lock_runs_of(s, ids)  # releasing their work changes those runs
            # held here: the session's identity map keeps rows only while they are referred to
            known = {n.id: n for n in node_store.nodes_by_id(s, ids)}
            for node_id, r in zip(ids, registrations, strict=True):
                node = known.get(node_id)
                network = client_network(r.peer)
                try:  # reads only: a refusal leaves nothing of its own to undo
                    self.registration.check(s, r.public_key.hex(), network, node is not None, now)
                except HubError as refusal:
                    answers.append(refusal)
                    continue
                if node is None:
                    node = known[node_id] = node_store.add_node(
                        s, node_id, r.public_key.hex(), now, network
                    )
                req = r.request
                node.name = req.name
                node.hardware_json = req.hardware.model_dump_json()
                node.region = req.region
                node.probe_rate = req.probe_tokens_per_s * req.probe_numel
                node.max_threads = req.max_threads
                node.last_seen_at = now
                node.status = NodeStatus.IDLE
                answers.append(node_id)
            self._release_assignments(s, [a for a in answers if isinstance(a, str)])
            s.commit()
        self.ticks.mark(*runs)
        return answers

    def _wake_pending_runs(
        self, now: float, live: int | None = None, crossed_from: int | None = None
    ) -> None:
        """Signal the runs whose pending round now has its `min_nodes` live nodes (`live`, or
        counted here); with `crossed_from` (the previous count) only those it was below, so
        a round kept pending for another reason is not woken again at every count."""
        with self.sessions() as s:
            pending = run_store.pending_round_runs(s)
            if not pending:
                return
            if live is None:
                live = node_store.count_live_nodes(s, self.live_cutoff(now))
        for run_id, config_json in pending:
            try:
                min_nodes = m.stored_settings(run_id, config_json).round.min_nodes
            except UnreadableSettings:
                continue  # the ticker stalls it
            if live >= min_nodes and (crossed_from is None or crossed_from < min_nodes):
                self.round_changed(run_id)

    def knows(self, node_id: str) -> bool:
        """Whether `node_id` is known registered in this process (its heartbeat needs no query)."""
        return node_id in self._known_nodes

    def heartbeat(self, node_id: str, status: NodeStatus) -> None:
        """Note that a node is alive; no lock, no transaction of its own. Liveness is soft state:
        the notes are written in one UPDATE per batch (`flush_heartbeats`) by the ticker and at
        the start of every transaction that reads liveness, so heartbeats never queue behind
        round work and cost no commit (no fsync) each."""
        if node_id not in self._known_nodes:
            with self.sessions() as s:
                if node_store.node_row(s, node_id) is None:
                    raise HubError(403, f"node {node_id} is not registered")
            self._known_nodes.add(node_id)
        with self._notes_lock:
            self._heartbeats[node_id] = (status, self.clock())

    def forget_notes(self, node_id: str) -> None:
        """Drop `node_id`'s unwritten liveness notes: the caller writes its row itself."""
        with self._notes_lock:
            self._heartbeats.pop(node_id, None)
            self._seen.pop(node_id, None)

    def flush_heartbeats(self, s: Session) -> None:
        """Write the pending heartbeats and signs of life into the transaction `s` (at most two
        executemany UPDATEs: with a status, and the time alone)."""
        if not self._heartbeats and not self._seen:
            return
        with self._notes_lock:
            pending, self._heartbeats = self._heartbeats, {}
            seen, self._seen = self._seen, {}
        for node_id, at in seen.items():  # a later request than the heartbeat: its time
            if node_id in pending and pending[node_id][1] < at:
                pending[node_id] = (pending[node_id][0], at)
        # in id order: two replicas' batches never wait for each other in a cycle
        if pending:
            beats = [(node_id, status, at) for node_id, (status, at) in sorted(pending.items())]
            node_store.write_heartbeats(s, beats)
        times = sorted((n, at) for n, at in seen.items() if n not in pending)
        if times:
            node_store.mark_seen(s, times)

    def report_energy(self, node_id: str, report: EnergyReport) -> None:
        """Store a node's energy report (hub/energy.py reads it when planning); a node whose own
        policy refuses to run now is 'paused' until its next report says otherwise."""
        with self.sessions() as s:
            node = self.node(s, node_id)
            received = {**report.model_dump(mode="json"), "received_at": self.clock()}
            node.energy_json = json.dumps(received)
            node.region = report.region or node.region
            if not report.available:
                node.status = NodeStatus.PAUSED
            elif node.status == NodeStatus.PAUSED:
                node.status = NodeStatus.IDLE
            s.commit()

    def leave(self, node_id: str) -> int:
        """A node leaves: its outstanding assignments are released so rounds need not wait."""
        with self.lock, self.sessions() as s:
            runs = self._lock_runs_of(s, [node_id])  # run rows first, then node rows
            self.flush_heartbeats(s)
            self.node(s, node_id).status = NodeStatus.LEFT
            released = self._release_assignments(s, [node_id])
            s.commit()
        self.ticks.mark(*runs)
        for run_id in runs:  # places freed: waiting long-polls ask again
            self.round_changed(run_id)
        return released

    @staticmethod
    def _lock_runs_of(s: Session, node_ids: list[str]) -> set[str]:
        """Lock the runs in which `node_ids` hold outstanding work (before releasing it)."""
        runs = contribution_store.runs_with_outstanding(s, node_ids)
        lock_runs(s, runs)
        return runs

    @staticmethod
    def _release_assignments(s: Session, node_ids: list[str]) -> int:
        """The nodes left (or registered their keys again): the round engine's `Left` releases
        their outstanding assignments in every run, written in the caller's transaction (which
        holds those runs' locks: `_lock_runs_of`). Returns how many were released."""
        effects = left_effects(Left(tuple(node_ids)))
        return apply_effects(s, None, None, effects).released

    def live_cutoff(self, now: float) -> float:
        return now - self.liveness_s(now)

    def live_nodes(self, s: Session, now: float):
        """Nodes heard from within liveness_s that have not left (one indexed query)."""
        return node_store.live_nodes(s, self.live_cutoff(now))
