"""The hub's operations over its database and blob store.

Each public method is one transaction: it reads state, asks the pure logic (`rounds`, `scheduler`,
the aggregator, the outer optimizer) what to do, writes blobs first and the database last, and only
then returns. A crash at any point leaves either the old state or the new one, never half of each;
after a restart the ticker (hub/ticker.py) simply continues from what the database says.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gridswarm.blobs import FileBlobStore
from gridswarm.config import ConfigError, RunConfig, parse_run_config
from gridswarm.energy.signals import SignalProvider
from gridswarm.hub import energy as hub_energy
from gridswarm.hub import models as m
from gridswarm.hub import reports
from gridswarm.hub import weights as hub_weights
from gridswarm.hub.asks import Asks
from gridswarm.hub.datasets import HubDatasets
from gridswarm.hub.downloads import PRESIGN_EXPIRY_S, Downloads
from gridswarm.hub.engine import RoundSnapshot
from gridswarm.hub.epochs import EpochChain, EpochPoster
from gridswarm.hub.errors import HubError, UnreadableSettings
from gridswarm.hub.lifecycle import (
    FINAL,
    SPONSOR_EVENTS,
    Refused,
    RunEvent,
    RunState,
    should_stall,
    transition,
)
from gridswarm.hub.limits import (
    DEFAULT_MAX_DATASET_MB,
    DEFAULT_MAX_DATASET_MB_PER_IDENTITY,
    HOUR_S,
    RateLimiter,
    check_run_quota,
    check_sponsor,
)
from gridswarm.hub.membership import Membership
from gridswarm.hub.metrics import NO_METRICS, WorkObserver
from gridswarm.hub.nonces import NonceBook
from gridswarm.hub.pacing import DEFAULT_BUDGET_PER_S, HeartbeatPacing
from gridswarm.hub.privacy import HubPrivacy, check_new_run
from gridswarm.hub.registration import RegistrationGate, RegistrationPolicy
from gridswarm.hub.replicas import RoundWatch, TickerLease, is_sqlite
from gridswarm.hub.rounds import RoundRules
from gridswarm.hub.states import AssignmentStatus, RoundStatus
from gridswarm.hub.store import contributions as contribution_store
from gridswarm.hub.store import nodes as node_store
from gridswarm.hub.store import runs as run_store
from gridswarm.hub.store import versions as version_store
from gridswarm.hub.store.locks import lock_run
from gridswarm.hub.store.reports import read_run_rows
from gridswarm.hub.store.rounds import read_snapshot
from gridswarm.hub.tick_schedule import TickSchedule
from gridswarm.hub.ticker import Ticker
from gridswarm.hub.trust import HubTrust
from gridswarm.hub.uploads import ArrivingUploads, Uploads
from gridswarm.identity import (
    AuthError,
    Identity,
    VerifiedRequest,
    verify_request,
)
from gridswarm.protocol import (
    ContributionMeta,
    FailureReport,
    Refusal,
    RunCreateResponse,
)
from gridswarm.train.aggregate import make_aggregator
from gridswarm.train.dataset import (
    MANIFEST_PREFIX,
    BlobSource,
    PreparedCorpus,
    check_dataset_path,
    import_dataset,
    is_prepared,
    manifest_ref,
    parse_manifest,
)
from gridswarm.train.memory import OverBudget, check_memory
from gridswarm.train.params import pack_vector
from gridswarm.train.workload import Workload

MAX_SKEW_S = 120.0
DATASET_RESCAN_S = 1.0  # an unknown digest rescans the runs' datasets at most this often
log = logging.getLogger("gridswarm.hub")
DEFAULT_MAX_RUN_MEMORY_MB = 4096.0


@dataclass(frozen=True)
class HubSettings:
    # a node silent this long is lost (while heartbeats are paced above their minimum interval,
    # LIVENESS_BEATS intervals if longer: hub/pacing.py)
    liveness_s: float = 20.0
    # heartbeats a second the whole swarm may send this hub: the interval it tells nodes grows
    # with the live nodes to keep within it (0: every node beats every 3 s)
    heartbeat_budget_per_s: float = DEFAULT_BUDGET_PER_S
    max_skew_s: float = MAX_SKEW_S
    # region -> the hub's own carbon signal (`gridswarm hub --signals`, hub/energy.py)
    signals: dict[str, SignalProvider] = field(default_factory=dict)
    # a run whose estimated memory (train/memory.py) exceeds this is refused before it is built
    max_run_memory_mb: float = DEFAULT_MAX_RUN_MEMORY_MB
    # who may create and fund runs (hub/limits.py): these public keys (hex) only, or anyone
    # (None) within the quotas
    sponsors: frozenset[str] | None = None
    max_active_runs_per_identity: int = 8
    max_runs_per_hour_per_identity: int = 20
    # per-key token bucket over all signed requests: sustained rate and burst, for the whole hub
    requests_per_s: float = 50.0
    request_burst: float = 200.0
    # hub processes sharing the database, which split that rate and burst evenly (each keeps
    # its buckets in memory; hub/limits.py): `--replica-count` hubs (machines, this one
    # included) × this hub's `--workers` (set by `serve`)
    replica_count: int = 1
    workers: int = 1
    # an S3 hub answers blob downloads with a redirect to a presigned URL valid this long
    # (`--no-presign`: it serves them itself, through its local cache)
    presign_downloads: bool = True
    presign_expiry_s: int = PRESIGN_EXPIRY_S
    # an S3 hub's local cache of blobs it reads as files (dataset shards), least recently used
    # first out above this (blobcache.CachedS3Store)
    blob_cache_bytes: int = 20 << 30
    # who may register node identities (hub/registration.py): invites, or bounds on new ones
    registration: RegistrationPolicy = field(default_factory=RegistrationPolicy)
    # folders on the hub's disk a run's `data.dataset` may name (`--data-root`); none: runs name
    # bundled datasets or `manifest:<sha256>` only (train/dataset.py `check_dataset_path`)
    data_roots: tuple[Path, ...] = ()
    # datasets sponsors push (`gridswarm data push`, hub/datasets.py): bytes all of them together
    # and each identity's may take in the blob store (`--max-dataset-mb`, `-per-identity`)
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_MB << 20
    max_dataset_bytes_per_identity: int = DEFAULT_MAX_DATASET_MB_PER_IDENTITY << 20
    # post reward epochs on chain on the hub's own clock (`--epoch-every-s`, hub/epochs.py)
    epochs: EpochChain | None = None


@dataclass(frozen=True)
class RunConstants:
    """What of a run never changes once it is created (its settings, its model's size): kept
    in memory by `HubService.run_constants`, so checking an upload does not read the run's row."""

    id: str
    config_json: str
    numel: int

    def settings(self) -> RunConfig:
        """This run's settings (`stored_settings`: 409 when they no longer validate)."""
        return m.stored_settings(self.id, self.config_json)


MAX_RUN_CONSTANTS = 4096  # runs whose RunConstants are kept; past it the cache starts again


class HubService:
    def __init__(
        self,
        engine: Engine,
        blobs: FileBlobStore,
        settings: HubSettings | None = None,
        clock: Callable[[], float] = time.time,
        identity: Identity | None = None,
    ) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.engine = engine
        self.blobs = blobs
        self.settings = settings or HubSettings()
        self.clock = clock
        self.lock = threading.RLock()
        self.nonces = NonceBook(engine, self.settings.max_skew_s)
        # which runs the ticker advances: marked by events, woken by the round engine
        self.ticks = TickSchedule()
        self.arriving = ArrivingUploads(self.ticks.mark)  # uploads received, not yet decided
        # caches that keep request handling independent of the swarm's size (rebuilt on restart)
        self._run_constants: dict[str, RunConstants] = {}  # run id -> its immutable facts
        self.round_changed: Callable[[str], None] = lambda run_id: None  # set by the HTTP layer
        self.metrics: WorkObserver = NO_METRICS  # the operator's metrics, set by the HTTP layer
        pacing = HeartbeatPacing(self.settings.liveness_s, self.settings.heartbeat_budget_per_s)
        # registration, liveness notes, heartbeat pacing, departures (hub/membership.py)
        self.membership = Membership(
            self.sessions,
            lambda: self.clock(),
            self.lock,
            self.ticks,
            pacing,
            RegistrationGate(self.settings.registration, self.sessions, pacing.liveness_s, clock),
            # the asks' cache of the fastest live node's speed (`self.asks`, built below: it needs
            # the trust)
            lambda run_id, speed, probe_rate: self.asks.raise_fastest(run_id, speed, probe_rate),
            lambda run_id: self.round_changed(run_id),
        )
        self.rate_limiter = RateLimiter(
            self.settings.requests_per_s,
            self.settings.request_burst,
            processes=self.settings.replica_count * self.settings.workers,
        )
        self._workloads: dict[str, Workload] = {}
        # silence is measured from here at the earliest: a hub outage is not the nodes' fault
        self.started_at = clock()
        self._dataset_blobs: set[str] = set()
        self._dataset_blobs_loaded_at: float | None = None  # monotonic s of the last scan
        # blob downloads: what may be served or redirected to, and their counts (hub/downloads.py)
        self.downloads = Downloads(
            blobs,
            self.sessions,
            clock,
            self._is_dataset_blob,
            self.settings.presign_downloads,
            self.settings.presign_expiry_s,
        )
        self.datasets = HubDatasets(self)  # datasets pushed by sponsors (hub/datasets.py)
        # ledger, audits, usefulness, reputation, rewards (hub/trust.py); `identity` is the hub's
        # persistent signing key (server.py loads it), a throwaway one only for in-memory use
        self.trust = HubTrust(
            engine,
            blobs,
            identity or Identity.generate(),
            self.lock,
            clock,
            sponsors=self.settings.sponsors,
            node_invites=self.settings.registration.invites,
        )
        # the ask path: batches of asks decided under the lock, the nodes' speeds (hub/asks.py)
        self.asks = Asks(
            self.sessions,
            lambda: self.clock(),
            self.lock,
            self.ticks,
            self.membership,
            self.trust,
            self.settings.signals,
            lambda s, run_id: self._run(s, run_id, lock=True),
            self._rules,
        )
        # the upload path: checks before the lock, decisions and rows under it (hub/uploads.py)
        self.uploads = Uploads(
            sessions=self.sessions,
            engine=engine,
            blobs=blobs,
            lock=self.lock,
            clock=lambda: self.clock(),
            ticks=self.ticks,
            trust=self.trust,
            locked_run=lambda s, run_id: self._run(s, run_id, lock=True),
            node_assignment=self._node_assignment,
            cached_constants=lambda run_id: self._run_constants.get(run_id),
            run_constants=self.run_constants,
            update_numel=self._update_numel,
            carbon_columns=self._carbon_columns,
            contributed=self.asks.contributed,
        )
        # DP accounting and SecAgg stages (hub/privacy.py): built after the uploads, whose
        # acceptance a SecAgg advertisement goes through, and before the ticker, which is handed
        # it; a stage's last answer advances the run through the ticker, called through the
        # service
        self.privacy = HubPrivacy(
            sessions=self.sessions,
            blobs=blobs,
            lock=self.lock,
            clock=lambda: self.clock(),
            ticks=self.ticks,
            membership=self.membership,
            read_run=lambda s, run_id: self._run(s, run_id),
            locked_run=lambda s, run_id: self._run(s, run_id, lock=True),
            carbon=self._carbon,
            accept_upload=self.uploads.accept_upload,
            advance_deferred=lambda run_id: self.ticker.advance(run_id, defer_close=True),
        )
        chain = self.settings.epochs  # the lease holder posts reward epochs (hub/epochs.py)
        # the round ticker: advances and closes the runs' rounds (hub/ticker.py); of replicas
        # (hub/replicas.py) one holds its lease, each wakes its own long-polls for changes the
        # others made
        self.ticker = Ticker(
            sessions=self.sessions,
            blobs=blobs,
            lock=self.lock,
            clock=lambda: self.clock(),
            ticks=self.ticks,
            membership=self.membership,
            downloads=self.downloads,
            trust=self.trust,
            privacy=self.privacy,
            lease=TickerLease(engine),
            watch=None if is_sqlite(engine) else RoundWatch(),
            epochs=None if chain is None else EpochPoster(chain, self.trust.ledger, clock),
            locked_run=lambda s, run_id: self._run(s, run_id, lock=True),
            read_round=self._snapshot,
            apply_event=self._apply_event,
            workload=self.workload,
            forget_workload=lambda run_id: self._workloads.pop(run_id, None),
            fragment=self.fragment,
            forget_speeds=self.asks.forget_speeds,
            metrics=lambda: self.metrics,
            round_changed=lambda run_id: self.round_changed(run_id),
        )

    # ---------------------------------------------------------------- authentication

    def authenticate(
        self,
        headers: dict[str, str],
        method: str,
        path: str,
        body: bytes,
        admit: Callable[[VerifiedRequest], None] | None = None,
    ) -> VerifiedRequest:
        """Verify a signed request and consume its nonce (a second use is a replay). The nonce
        is committed before the request goes on; concurrent requests share one commit.
        `admit` may refuse the verified request before its nonce is stored."""
        now = self.clock()
        try:
            verified = verify_request(headers, method, path, body, now, self.settings.max_skew_s)
        except AuthError as exc:
            reason = Refusal.MALFORMED if exc.status == 400 else Refusal.UNAUTHENTICATED
            raise HubError(exc.status, exc.detail, reason) from exc
        self.rate_limiter.check(verified.public_key.hex(), now)  # before anything is stored
        if admit is not None:
            admit(verified)
        try:
            self.nonces.consume(verified.nonce, verified.public_key.hex(), now)
        except AuthError as exc:
            raise HubError(exc.status, exc.detail, Refusal.REPLAYED_REQUEST) from exc
        self.membership.note_seen(verified.node_id, now)
        return verified

    # ---------------------------------------------------------------- runs

    def workload(self, run_id: str, config_json: str) -> Workload:
        if run_id not in self._workloads:
            cfg = m.stored_settings(run_id, config_json)
            self._workloads[run_id] = Workload.from_config(cfg, source=BlobSource(self.blobs))
        return self._workloads[run_id]

    def _import_dataset(self, cfg: RunConfig) -> RunConfig:
        """A prepared dataset named by a folder path (readable by the hub) is imported into the
        blob store and the run is stored as `manifest:<sha256>`, which is all nodes ever see."""
        if manifest_ref(cfg.data.dataset) is not None or not is_prepared(cfg.data.dataset):
            return cfg
        PreparedCorpus.open(cfg.data.dataset).check_fits(cfg.train.seq_len)  # before any write
        manifest, digest = import_dataset(Path(cfg.data.dataset), self.blobs)
        self._dataset_blobs |= {digest, *manifest.digests()}
        data = cfg.data.model_copy(update={"dataset": f"{MANIFEST_PREFIX}{digest}"})
        return cfg.model_copy(update={"data": data})

    def _is_dataset_blob(self, s: Session, digest: str) -> bool:
        """Manifest, tokenizer and shards of the datasets that runs train on are public; the set
        is rebuilt from the runs once per process (after a restart), then kept up to date."""
        if digest in self._dataset_blobs:
            return True
        # runs created by another replica are learnt by scanning again, at most once a second
        scanned_at = self._dataset_blobs_loaded_at
        if scanned_at is None or time.monotonic() - scanned_at >= DATASET_RESCAN_S:
            for run_id, config_json in run_store.run_configs(s):
                try:
                    ref = manifest_ref(m.stored_settings(run_id, config_json).data.dataset)
                except UnreadableSettings:
                    continue  # one unreadable run must not stop every download
                if ref is not None and ref not in self._dataset_blobs and self.blobs.has(ref):
                    manifest = parse_manifest(self.blobs.get(ref))
                    self._dataset_blobs |= {ref, *manifest.digests()}
            self._dataset_blobs_loaded_at = time.monotonic()
        return digest in self._dataset_blobs

    def create_run(self, sponsor_key: bytes, config: dict) -> RunCreateResponse:
        check_sponsor(self.settings.sponsors, sponsor_key)
        self._check_run_quota(sponsor_key)
        try:
            cfg = parse_run_config(config)
            make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
            hub_energy.check_energy(cfg)  # green policies need a token target
            check_new_run(cfg)  # a DP budget must pay for at least one round
        except (ConfigError, ValueError, TypeError) as exc:
            raise HubError(422, str(exc), Refusal.INVALID_CONFIG) from exc
        try:  # before anything is allocated: the model is built only below
            check_memory(cfg, self.settings.max_run_memory_mb)
        except OverBudget as exc:
            raise HubError(422, str(exc), Refusal.OVER_MEMORY) from exc
        except ValueError as exc:
            raise HubError(422, str(exc), Refusal.INVALID_CONFIG) from exc
        # pushed weights to start from (hub/weights.py): this sponsor's, or 422, before any work
        init_numel = hub_weights.pushed_numel(self, sponsor_key, cfg)
        run_id = uuid.uuid4().hex[:12]
        try:
            check_dataset_path(cfg.data.dataset, self.settings.data_roots, "this hub")
            if init_numel is not None:  # counted on the meta device: before the import
                hub_weights.check_numel(cfg, init_numel, hub_weights.model_numel(cfg, self.blobs))
            cfg = self._import_dataset(cfg)
            workload = Workload.from_config(cfg, source=BlobSource(self.blobs))
        except (OSError, ValueError) as exc:
            raise HubError(422, f"data.dataset: {exc}", Refusal.INVALID_CONFIG) from exc
        if init_numel is None:
            theta = workload.initial_theta()
        else:  # the vector is read only now that its length is known to fit
            theta = hub_weights.load_pushed(self, cfg, workload.numel)
        val_loss = workload.evaluate(theta)
        weights = self.blobs.put(pack_vector(theta, {"run_id": run_id, "version": 0}))
        now = self.clock()
        with self.lock, self.sessions() as s:
            run_store.add_run(
                s,
                m.Run(
                    id=run_id,
                    name=cfg.name,
                    config_json=cfg.model_dump_json(),
                    sponsor_key=sponsor_key.hex(),
                    status=RunState.ACTIVE,
                    numel=workload.numel,
                    version=0,
                    round=0,
                    tokens_total=0,
                    created_at=now,
                ),
                m.Version(
                    run_id=run_id,
                    number=0,
                    weights_blob=weights,
                    val_loss=val_loss,
                    tokens_total=0,
                    created_at=now,
                ),
                m.Round(
                    run_id=run_id, number=0, base_version=0, attempt=0, status=RoundStatus.PENDING
                ),
            )
            s.commit()
        self._workloads[run_id] = workload
        return RunCreateResponse(run_id=run_id, version_blob=weights, numel=workload.numel)

    def _check_run_quota(self, sponsor_key: bytes) -> None:
        """429 when this identity already has too many runs (hub/limits.py)."""
        now = self.clock()
        with self.sessions() as s:
            active = run_store.count_active_runs_of(s, sponsor_key.hex())
            recent = run_store.run_creation_times_of(s, sponsor_key.hex(), now - HOUR_S)
        check_run_quota(
            active or 0,
            list(recent),
            now,
            self.settings.max_active_runs_per_identity,
            self.settings.max_runs_per_hour_per_identity,
        )

    def _run(self, s: Session, run_id: str, lock: bool = False) -> m.Run:
        """The run (404 if none); with `lock`, its row locked until the transaction ends: every
        transaction that changes a run's rounds, assignments or contributions takes it first, so
        hub replicas serialize per run (hub/replicas.py)."""
        run = lock_run(s, run_id) if lock else run_store.run_row(s, run_id)
        if run is None:
            raise HubError(404, f"run {run_id} not found")
        return run

    def _own_assignment(
        self, s: Session, run_id: str, node_id: str, assignment_id: str
    ) -> tuple[m.Run, m.Assignment]:
        """The run, locked, and one of `node_id`'s assignments in it (404 / 403 otherwise); the
        node noted alive."""
        run = self._run(s, run_id, lock=True)
        self.membership.node(s, node_id)
        return run, self._node_assignment(s, run_id, node_id, assignment_id)[1]

    @staticmethod
    def _node_assignment(
        s: Session, run_id: str, node_id: str, assignment_id: str
    ) -> tuple[m.Node, m.Assignment]:
        """`node_id`'s row and one of its assignments in `run_id` (403 / 404 otherwise)."""
        node = node_store.node_row(s, node_id)
        if node is None:
            raise HubError(403, f"node {node_id} is not registered", Refusal.NOT_REGISTERED)
        assignment = contribution_store.assignment_row(s, assignment_id)
        if assignment is None or assignment.run_id != run_id:
            raise HubError(404, f"assignment {assignment_id} not found in run {run_id}")
        if assignment.node_id != node_id:
            raise HubError(403, "assignment belongs to another node")
        return node, assignment

    def _snapshot(self, s: Session, run: m.Run) -> tuple[m.Round, RoundSnapshot, RoundRules]:
        """The run's round row, the round engine's view of it, and the run's round rules."""
        rules = self._rules(run.settings())
        # a summary: counts, and only the outstanding assignments of silent nodes (with a
        # second to spare: rows that are not lost yet are harmless, the engine's rule decides)
        silent_before = self.clock() - rules.liveness_s + 1.0
        rnd, snapshot = read_snapshot(s, run, self.started_at, silent_before)
        arriving = self.arriving.by(run.id, snapshot.deadline_at)  # in this process's queue
        return rnd, replace(snapshot, arriving=arriving), rules

    def _rules(self, cfg: RunConfig) -> RoundRules:
        r, sa = cfg.round, cfg.privacy.secagg
        return RoundRules(
            r.quorum,
            r.min_nodes,
            r.max_nodes,
            r.deadline_s,
            self.membership.liveness_s(),
            secagg_stage_timeout_s=None if sa is None else sa.stage_timeout_s,
        )

    # ---------------------------------------------------------------- lifecycle

    def change_run_state(
        self, run_id: str, requester_key: bytes, event: RunEvent, reason: str = ""
    ) -> dict:
        """The sponsor pauses, resumes or stops its run (hub/lifecycle.py decides)."""
        with self.lock, self.sessions() as s:
            run = self._run(s, run_id, lock=True)
            if run.sponsor_key != requester_key.hex():
                raise HubError(
                    403, f"only the sponsor of run {run_id} may {event} it", Refusal.NOT_SPONSOR
                )
            if event not in SPONSOR_EVENTS:
                raise HubError(422, f"{event} is not a sponsor's event")
            changed = self._apply_event(s, run, event, reason or f"{event} by the sponsor")
            s.commit()
        self.ticks.mark(run_id)
        self.round_changed(run_id)  # its long-polls learn the new state at once
        return changed

    def _apply_event(self, s: Session, run: m.Run, event: RunEvent, reason: str) -> dict:
        """Move `run` by `event` in the caller's transaction: release outstanding work when it
        stops handing any out, and record the change (and the escrow left) on the ledger."""
        before = RunState(run.status)
        after = transition(before, event)
        if isinstance(after, Refused):
            raise HubError(409, after.detail)
        now = self.clock()
        released = 0
        if after is not RunState.ACTIVE:  # nobody works on a held or ended run
            released = run_store.release_run_assignments(s, run.id)
        rnd = run_store.round_row(s, run.id, run.round)
        if after is RunState.ACTIVE and rnd is not None and rnd.status == RoundStatus.OPEN:
            cfg = run.settings()  # 409 while its settings cannot be read back (it stays stalled)
            rnd.deadline_at = now + cfg.round.deadline_s  # the hold did not eat the round's time
        # the reason stays on the ledger; the run shows one only while it is not active
        shown_reason = None if after is RunState.ACTIVE else reason
        run.status, run.status_reason, run.status_changed_at = after, shown_reason, now
        if after in FINAL:
            run.finished_at = now
        entry = {
            "run_id": run.id,
            "event": str(event),
            "from": str(before),
            "to": str(after),
            "reason": reason,
            "round": run.round,
            "released_assignments": released,
        }
        if after is RunState.STOPPED:  # unspent escrow stays the sponsor's (ledger/balances.py)
            entry["sponsor"] = run.sponsor_key
            entry["unspent_escrow_units"] = self.trust.escrow(run.id).available_units
        self.trust.append(s, [("lifecycle", entry)])
        log.info(
            "run %s %s -> %s: %s (%d assignments released)", run.id, before, after, reason, released
        )
        return entry

    def report_failure(self, run_id: str, node_id: str, report: FailureReport) -> dict:
        """A node could not train its assignment: release it, keep the reason, and mark the run
        stalled once `STALL_AFTER_FAILURES` failures arrive with no progress in between."""
        now = self.clock()
        with self.lock, self.sessions() as s:
            run, assignment = self._own_assignment(s, run_id, node_id, report.assignment_id)
            if assignment.status == AssignmentStatus.ASSIGNED:
                assignment.status = AssignmentStatus.FAILED
            run_store.add_run_failure(s, run_id, node_id, assignment.round, report.reason, now)
            progress_at = max(
                version_store.last_version_at(s, run_id) or 0.0,
                run.status_changed_at or 0.0,
            )
            failures = run_store.count_failures_since(s, run_id, progress_at)
            log.warning(
                "run %s: node %s failed round %d: %s",
                run_id,
                node_id,
                assignment.round,
                report.reason,
            )
            working = contribution_store.count_places_taken(s, run_id, run.round)
            if run.status == RunState.ACTIVE and should_stall(failures, working):
                reason = (
                    f"{failures} node failures and no round closed since; "
                    f"last: node {node_id}: {report.reason}"
                )
                self._apply_event(s, run, RunEvent.STALL, reason)
            s.commit()
            self.ticks.mark(run_id)
            return {"run_status": run.status, "failures": failures}

    # ---------------------------------------------------------------- carbon

    def _carbon(self, run: m.Run | None, node: m.Node | None, meta: ContributionMeta) -> dict:
        """Carbon columns of a contribution: the hub's own signal for the node's region over the
        training interval when it has one, else the node's figure (hub/energy.py)."""
        active = run is not None and run.status == RunState.ACTIVE
        return self._carbon_columns(
            run.settings() if active else None, node.region if node else None, meta
        )

    def _carbon_columns(
        self, active_cfg: RunConfig | None, node_region: str | None, meta: ContributionMeta
    ) -> dict:
        """`_carbon` from its facts: the run's settings while it is active (else None: the
        defaults) and the node's registered region."""
        region = meta.region or node_region
        cfg = active_cfg or RunConfig()
        now = self.clock()
        hub_g = hub_energy.signal_intensity(
            self.settings.signals.get(region or ""), now - meta.train_time_s, now
        )
        carbon = hub_energy.account(
            meta.energy_wh,
            meta.intensity_g_per_kwh,
            meta.local_surplus_share,
            hub_g,
            cfg.energy.default_intensity_g_per_kwh,
        )
        return carbon.columns()

    # ---------------------------------------------------------------- contributions

    def fragment(self, run: m.Run | RunConstants, round_number: int) -> tuple[int, int] | None:
        """The [start, end) of the flat weights round `round_number` of `run` syncs (Streaming
        DiLoCo, train/fragments.py), or None when every round syncs the whole vector."""
        if run.settings().comm.fragments == 1:
            return None
        return self.workload(run.id, run.config_json).fragment(round_number)

    def run_constants(self, s: Session, run_id: str) -> RunConstants:
        """The immutable facts of an existing run, read from its row once per process (404 if
        none)."""
        facts = self._run_constants.get(run_id)
        if facts is None:
            run = self._run(s, run_id)
            facts = RunConstants(run.id, run.config_json, run.numel)
            if len(self._run_constants) >= MAX_RUN_CONSTANTS:
                self._run_constants.clear()
            self._run_constants[run_id] = facts
        return facts

    def _update_numel(self, run: m.Run | RunConstants, round_number: int) -> int:
        """How many values an upload for round `round_number` of `run` holds: the fragment that
        round syncs, or the whole model."""
        fragment = self.fragment(run, round_number)
        return run.numel if fragment is None else fragment[1] - fragment[0]

    # ---------------------------------------------------------------- reads

    def latest_version(self, run_id: str) -> dict:
        with self.sessions() as s:
            run = self._run(s, run_id)
            v = version_store.version_row(s, run_id, run.version)
            return {"number": v.number, "weights_blob": v.weights_blob, "val_loss": v.val_loss}

    def list_runs(self) -> list[dict]:
        with self.sessions() as s:
            return reports.list_runs(s)

    def run_report(self, run_id: str) -> dict:
        """Energy and carbon report of a run: per node and per run tokens, kWh, kgCO2e, g per
        1k tokens, local-surplus share and the agnostic counterfactual (GET .../report)."""
        with self.sessions() as s:
            run = self._run(s, run_id)
            contributions = contribution_store.run_contributions(s, run_id)
            nodes = node_store.all_nodes(s)
        cfg = run.settings()

        def hub_intensity_at(region: str, t_s: float) -> float | None:
            return hub_energy.signal_intensity(self.settings.signals.get(region), t_s, t_s)

        return hub_energy.run_report_json(
            run_id,
            cfg.energy.policy,
            [hub_energy.ContributionRow.of(c) for c in contributions],
            reports.report_participants(run, contributions, nodes),
            run.created_at,
            hub_intensity_at,
            cfg.energy.default_intensity_g_per_kwh,
        )

    def run_status(self, run_id: str) -> dict:
        """Everything a dashboard or summary shows about one run (hub/reports.py), with its
        energy, trust and privacy sections."""
        if self.downloads.pending:  # this process's counted downloads: its figures include them
            with self.sessions() as s:
                self.downloads.flush(s)
                s.commit()
        with self.sessions() as s:
            rows = read_run_rows(s, self._run(s, run_id))
        now = self.clock()
        return reports.run_status_json(
            rows, now, self.membership.liveness_s(now)
        ) | self._policy_status(rows)

    def _policy_status(self, rows: reports.RunRows) -> dict:
        """The energy, trust and privacy sections of `run_status`; a run whose stored settings
        cannot be read back (a stalled run) shows why instead of failing the request."""
        run = rows.run
        try:
            energy = hub_energy.energy_status(
                run.settings(),
                run.created_at,
                run.finished_at,
                [hub_energy.ContributionRow.of(c) for c in rows.contributions],
                reports.energy_reports(run.id, rows.contributions, list(rows.nodes.values())),
            )
            return {
                "energy": energy,  # policy, deadline, totals, each node's last report
                "trust": self.trust.status(run.id),  # audits, rejections, escrow, reputation
                **self.privacy.run_status(run.id),  # "privacy": epsilon, budget, SecAgg rounds
            }
        except UnreadableSettings as exc:
            return {"error": exc.detail}
