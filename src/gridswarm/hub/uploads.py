"""The upload path (`POST /v1/runs/{run}/contributions`): checked before the lock, decided and
stored under it, in batches.

`check_upload` does the costly part side by side, outside the lock: unpack, the size and finite
checks, the update's digest, the fsynced blob write. `store_uploads` decides a run's checked
uploads in one transaction under the service's lock, each in a savepoint (`_store_in_savepoint`),
through the one acceptance path of every upload, plain or SecAgg (`accept_upload`: the round
engine's `Arrived`, hub/acceptance.py), then the trust screen and the rows; a refused or failed
upload's blob is removed again unless a row names it. `ArrivingUploads` counts the uploads this
process has received and not yet decided (a round at its deadline waits for them).

`HubService` builds one `Uploads` (`service.uploads`); `hub/app.py` calls `check_upload` and
`store_uploads`, `HubPrivacy.advertise` calls `accept_upload`. Its own state is only
`_checking`, the bound on uploads decoded at once. It is handed, not copied, what it shares with
the service, which stays its single owner:
- the session factory, the engine (the facts read before the lock, on a plain pooled
  connection), the blob store and the lock (every decision under the hub's one lock, the one
  the asks and the ticker decide under);
- the clock (the service's, called through it, so a clock the tests put on the service is this
  one's too) and the tick schedule (an upload marks its run);
- the trust object (the screen, the ledger, strikes);
- the run and node reads the requests share: the run's row, locked (`HubService._run`), and a
  node's assignment in it (`HubService._node_assignment`);
- the service's cache of the runs' immutable facts (`cached_constants`, read without a session;
  `run_constants`, which fills it, on a miss) and an upload's size for its round
  (`HubService._update_numel`: the Streaming DiLoCo fragment, from the service's workloads);
- the carbon columns (`HubService._carbon_columns`: the hub's own signals, which SecAgg
  advertisements use too, through the service);
- the asks' cache of the nodes' speeds (`contributed`: a stored upload changes its node's
  achieved speed, which the asks plan with).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, ResourceClosedError
from sqlalchemy.orm import Session

from gridswarm.blobs import sha256_hex
from gridswarm.config import RunConfig
from gridswarm.hub import engine as round_engine
from gridswarm.hub import models as m
from gridswarm.hub.acceptance import AssignmentFacts, ClaimFacts, ClaimRules, UploadRefused
from gridswarm.hub.engine import Arrived, ContributionRow, place_refusal
from gridswarm.hub.errors import HubError, decided_alone
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.states import AssignmentStatus
from gridswarm.hub.store import contributions as contribution_store
from gridswarm.hub.store import nodes as node_store
from gridswarm.hub.store import runs as run_store
from gridswarm.hub.store.locks import lock_run
from gridswarm.hub.store.rounds import apply_effects, row_snapshot
from gridswarm.hub.upload_facts import EnergyWindow, UploadFacts
from gridswarm.privacy.live import SECAGG_CODEC
from gridswarm.protocol import ContributionAck, ContributionMeta, Refusal, describe_errors
from gridswarm.train.codecs import NonFinitePayload, check_payload, make_codec
from gridswarm.train.params import BlobFormatError, unpack
from gridswarm.trust.claims import is_zero_update, update_sha256

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import sessionmaker

    from gridswarm.blobs import FileBlobStore
    from gridswarm.hub.service import RunConstants
    from gridswarm.hub.tick_schedule import TickSchedule
    from gridswarm.hub.trust import HubTrust


@dataclass(frozen=True)
class Upload:
    """An upload checked before the lock (`Uploads.check_upload`), its blob written: what
    `store_uploads` decides on. `unchecked`: the update's tensors when the checks before the
    lock could not decode it (its assignment was not found there), else None."""

    node_id: str
    meta: ContributionMeta
    unchecked: dict[str, torch.Tensor] | None
    body: bytes
    digest: str
    update: tuple[str, bool]  # the update's digest, and whether it is all zeros
    carbon: dict
    stored_before: bool  # the blob was on disk before this upload (keep it on a refusal)


UploadAnswer = ContributionAck | HubError
"""One upload decided: its acknowledgement, or its refusal."""


class ArrivingUploads:
    """The uploads this process has received and not yet decided, by run, with the time each
    arrived: a round at its deadline waits (at most `rounds.ARRIVING_GRACE_S`) for those that
    arrived by then, so that work that reached the hub in time is not refused as stale because
    the hub's own queue held it. Each replica knows its own."""

    def __init__(self, decided: Callable[[str], None] = lambda run_id: None) -> None:
        self._lock = threading.Lock()
        self._at: dict[str, dict[int, float]] = {}
        self._next = 0
        self._decided = decided  # called with the run's id as each upload is decided

    @contextmanager
    def receiving(self, run_id: str, now: float) -> Iterator[None]:
        """While an upload for `run_id` that arrived at `now` is read, checked and decided."""
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._at.setdefault(run_id, {})[token] = now
        try:
            yield
        finally:
            with self._lock:
                pending = self._at[run_id]
                del pending[token]
                if not pending:
                    del self._at[run_id]
            self._decided(run_id)  # a round at its deadline may have waited for it

    def by(self, run_id: str, deadline_at: float | None) -> int:
        """How many of `run_id`'s uploads in flight arrived by `deadline_at`."""
        if deadline_at is None:
            return 0
        with self._lock:
            return sum(at <= deadline_at for at in self._at.get(run_id, {}).values())


class Uploads:
    """The upload path over the state it is handed (see the module's docstring for the state it
    owns and the state it shares with `HubService`)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        engine: Engine,
        blobs: FileBlobStore,
        lock: threading.RLock,
        clock: Callable[[], float],
        ticks: TickSchedule,
        trust: HubTrust,
        locked_run: Callable[[Session, str], m.Run],
        node_assignment: Callable[[Session, str, str, str], tuple[m.Node, m.Assignment]],
        cached_constants: Callable[[str], RunConstants | None],
        run_constants: Callable[[Session, str], RunConstants],
        update_numel: Callable[[m.Run | RunConstants, int], int],
        carbon_columns: Callable[[RunConfig | None, str | None, ContributionMeta], dict],
        contributed: Callable[[Session, str, list[str]], None],
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.blobs = blobs
        self.lock = lock
        self.clock = clock
        self.ticks = ticks
        self.trust = trust
        self.locked_run = locked_run  # the run's row, locked until the transaction ends (404)
        self.node_assignment = node_assignment  # a node's row and its assignment (403 / 404)
        self.cached_constants = cached_constants  # a run's immutable facts if cached, else None
        self.run_constants = run_constants  # a run's immutable facts, cached on a miss (404)
        self.update_numel = update_numel  # an upload's values for a round: fragment or model
        self.carbon_columns = carbon_columns  # an upload's carbon columns (hub/energy.py)
        self.contributed = contributed  # the asks' cache: the nodes' achieved speeds re-read
        # uploads decoded and checked at once, outside the lock (each holds a decoded update)
        self._checking = threading.BoundedSemaphore(max(2, os.cpu_count() or 1))

    def submit(
        self, run_id: str, node_id: str, body: bytes, body_sha256: str | None = None
    ) -> ContributionAck:
        """Validate and durably store a contribution; acknowledged only once committed
        (`check_upload`, then `store_uploads` with this one upload); raises its refusal."""
        checked = self.check_upload(run_id, node_id, body, body_sha256)
        answer = self.store_uploads(run_id, [checked])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def check_upload(
        self, run_id: str, node_id: str, body: bytes, body_sha256: str | None = None
    ) -> Upload:
        """The costly part of an upload, before the lock, so uploads are checked side by side:
        the size and finite checks (on the int8 scales, without decoding), the update's
        digest, and the fsynced blob write. A malformed upload is refused here (its blob not
        yet written). `body_sha256`: the body's sha256 as the hub computed it to verify the
        request's signature (`VerifiedRequest.body_sha256`), so the blob's name costs no
        second pass over the bytes; None: hashed here."""
        try:
            tensors, raw_meta = unpack(body)
            meta = ContributionMeta.model_validate(raw_meta)
        except BlobFormatError as exc:
            raise HubError(400, f"malformed contribution: {exc}") from exc
        except ValidationError as exc:
            raise HubError(
                422, f"malformed contribution metadata: {describe_errors(exc.errors())}"
            ) from exc
        with self._checking:  # at most a few decoded updates in memory, and hashes, at once
            # settings, sizes and rounds never change: no lock; one query on a plain pooled
            # connection (no ORM session): the run's state, the node's region, the
            # assignment's round
            with self.engine.connect() as conn:
                status, region, round_number = contribution_store.upload_facts(
                    conn, run_id, node_id, meta.assignment_id
                )
            if status is None:
                raise HubError(404, f"run {run_id} not found")
            run = self.cached_constants(run_id)
            if run is None:  # once per run and process
                with self.sessions() as s:
                    run = self.run_constants(s, run_id)
            cfg = run.settings()
            numel = None if round_number is None else self.update_numel(run, round_number)
            checked = numel is not None and meta.codec == cfg.comm.codec  # else refused later
            if checked:
                self._check_payload(cfg, tensors, numel)
            update_digest, zero = update_sha256(tensors), is_zero_update(tensors)
            digest = body_sha256 or sha256_hex(body)
        # may ask a signal provider: no semaphore held
        carbon = self.carbon_columns(cfg if status == RunState.ACTIVE else None, region, meta)
        # the write waits on the disk, not on a core: outside the semaphore, so the fsyncs of
        # the uploads in flight (at most LOCKED_THREADS, hub/app.py) overlap
        stored_before = self.blobs.has(digest)
        self.blobs.put(body, known_sha256=digest)  # fsynced before any row names it
        return Upload(
            node_id,
            meta,
            None if checked else tensors,
            body,
            digest,
            (update_digest, zero),
            carbon,
            stored_before,
        )

    def store_uploads(self, run_id: str, uploads: list[Upload]) -> list[UploadAnswer]:
        """Decide and store checked uploads (`check_upload`) of one run, in that order: each
        answer an acknowledgement, or its refusal in its place. Acknowledged only once
        committed. A refused or failed upload's blob is removed again, unless a contribution
        row names it (an identical retry that was stored).

        The uploads are decided in one transaction under one lock, each in a savepoint (a
        refusal undoes only its own rows), with one commit for all: the HTTP layer gathers the
        uploads of a run that arrive while a decision runs (`RunBatcher`), so a round's uploads
        cost a few commits (fsyncs), not one each. A refusal that records a strike commits
        what came before it with the strike (hub/trust.py); the others go on. Should storing
        fail for a reason that is not a refusal, each upload is stored again on its own, so
        it fails only its own."""
        try:
            answers = self._store_batch(run_id, uploads)
        except HubError as refusal:  # the run's own (404): every upload's
            answers = [refusal] * len(uploads)
        except Exception:
            if len(uploads) == 1:
                self._drop_refused(run_id, uploads, [None])
                raise
            answers = decided_alone(
                f"run {run_id}", "uploads", uploads, lambda one: self._store_batch(run_id, one)
            )
        self._drop_refused(run_id, uploads, answers)
        return answers

    def _drop_refused(
        self, run_id: str, uploads: list[Upload], answers: list[UploadAnswer | None]
    ) -> None:
        for upload, answer in zip(uploads, answers, strict=True):
            if not isinstance(answer, ContributionAck) and not upload.stored_before:
                self._drop_unless_named(run_id, upload.digest)

    def _store_batch(self, run_id: str, uploads: list[Upload]) -> list[UploadAnswer]:
        with self.lock, self.sessions() as s:
            run = self.locked_run(s, run_id)  # 404 for all; replicas: one batch at a time
            # the uploading nodes are alive: written first, so that on SQLite the transaction
            # (and the database's write lock) begins here and the savepoints below nest in it
            # (a SAVEPOINT that begins a pysqlite transaction commits on its release)
            node_ids = sorted({u.node_id for u in uploads})
            node_store.touch_nodes(s, node_ids, self.clock())
            # the batch's round, nodes and assignments in three queries, not three per upload
            # (held here: the session's identity map keeps rows only while they are referred to)
            assignment_ids = sorted({u.meta.assignment_id for u in uploads})
            rows = [
                run_store.round_row(s, run.id, run.round),
                *node_store.nodes_by_id(s, node_ids),
                *contribution_store.assignments_by_id(s, assignment_ids),
            ]
            # what every upload of the batch is judged on alike (the run's newest contributions,
            # those with the batch's update digests): read once, kept current as it stores
            facts = UploadFacts(run.id, [u.update[0] for u in uploads if not u.update[1]])
            answers = [self._store_in_savepoint(s, run, upload, facts) for upload in uploads]
            s.commit()
            del rows
            # the contributing nodes' achieved speeds, in one query for the batch
            acked = [
                u.node_id
                for u, answer in zip(uploads, answers, strict=True)
                if isinstance(answer, ContributionAck)
            ]
            self.contributed(s, run_id, acked)
        return answers

    def _store_in_savepoint(
        self, s: Session, run: m.Run, upload: Upload, facts: UploadFacts
    ) -> UploadAnswer:
        """One upload's decision and rows in a savepoint of the batch's transaction `s`, which
        holds `run` locked and has noted the uploading nodes alive; once stored, its row joins
        the batch's `facts` (the uploads after it are judged with it)."""
        savepoint = s.begin_nested()
        try:
            ack, contribution = self._store_contribution(s, run, upload, facts)
            savepoint.commit()  # flushes: a second identical contribution fails here
            facts.add(contribution)
            return ack
        except (HubError, IntegrityError) as exc:
            # undone, unless the refusal committed its strike (then nothing is left to undo)
            with suppress(ResourceClosedError):
                savepoint.rollback()
            # a refusal may have committed (its strike, a MarkLate): the batch's transaction,
            # and what it read, ends there; the uploads after it read the facts again
            facts.forget()
            if isinstance(exc, IntegrityError):
                return HubError(409, "duplicate contribution", Refusal.DUPLICATE)
            return exc

    def _store_contribution(
        self, s: Session, run: m.Run, upload: Upload, facts: UploadFacts
    ) -> tuple[ContributionAck, m.Contribution]:
        """Under the lock, `run` locked: the acceptance decisions, then the contribution's rows
        (returned with the acknowledgement). `unchecked`: the update's tensors when the checks
        before the lock could not decode it (its assignment was not found there); otherwise
        None, and nothing is decoded again. `facts`: the batch's facts read once."""
        node_id, meta = upload.node_id, upload.meta
        node, assignment = self.node_assignment(s, run.id, node_id, meta.assignment_id)
        claims = meta.model_dump()
        # the checks every upload passes, SecAgg ones too (the round engine's `Arrived`)
        row = ContributionRow(upload.digest, claims, len(upload.body), upload.carbon)
        cfg, rnd, accepted = self.accept_upload(
            s, run, node, assignment, meta, row, energy_window=facts.energy
        )
        if upload.unchecked is not None:  # past acceptance: its codec is the run's
            self._check_payload(cfg, upload.unchecked, self.update_numel(run, assignment.round))
        # the node's signed claim over the update, no replayed update (hub/trust.py)
        screened = self.trust.screen_submission(
            s, run, cfg, node, assignment, claims, *upload.update, replays=facts.replays(s)
        )
        if not self.blobs.has(upload.digest):  # a failed identical upload removed it meanwhile
            self.blobs.put(upload.body, known_sha256=upload.digest)
        trusted = self.trust.record_submission(s, screened)  # the claim on the ledger
        # the row (with the update's digest and the claim's seq), and `submitted`: the last
        # writes of the savepoint (store.rounds writes them at once, in Core)
        applied = apply_effects(s, run, rnd, accepted.effects, contribution_columns=trusted)
        contribution = applied.contributions[0]
        ack = ContributionAck(
            contribution_id=upload.digest, accepted=True, bytes_up=len(upload.body)
        )
        return ack, contribution

    def accept_upload(
        self,
        s: Session,
        run: m.Run,
        node: m.Node,
        assignment: m.Assignment,
        meta: ContributionMeta,
        row: ContributionRow,
        secagg: bool = False,
        energy_window: Callable[[Session], EnergyWindow] | None = None,
    ) -> tuple[RunConfig, m.Round, round_engine.Step]:
        """The one acceptance path of every upload, plain or SecAgg (`HubPrivacy.advertise`):
        the round engine decides (`Arrived`, the checks of hub/acceptance.py) on the facts read
        here, the claim rules and energy figures only once the round still wants the upload.
        Returns the run's settings, its current round row and the engine's step, whose effects
        (the contribution's row, the assignment `submitted`) the caller applies once its own
        checks passed. A refusal is raised, typed, after its MarkLate is committed and its
        strike, if it is one, is on the ledger (`HubTrust.refuse_upload`); nothing else is
        written. The caller holds the service lock, `run` locked, in its transaction `s`.
        `energy_window`: the run's newest contributions for a batch of uploads, read once
        (hub/upload_facts.py); None: the energy facts are queried for this upload alone."""
        self.ticks.mark(run.id)  # under the lock the ticker reads the round under
        rnd = run_store.round_row(s, run.id, run.round)
        snap = row_snapshot(run, rnd)
        place = AssignmentFacts(
            AssignmentStatus(assignment.status), assignment.round, assignment.inner_steps
        )
        cfg = rules = energy = None
        if place_refusal(snap, place) is None:  # the round wants it: read what judges its claims
            cfg = run.settings()
            rules = ClaimRules(
                expected_codec=SECAGG_CODEC if secagg else cfg.comm.codec,
                tokens_per_step=cfg.tokens_per_step,
                batch_size=cfg.train.batch_size,
                energy_min_fraction=cfg.trust.energy_min_fraction,
            )
            window = energy_window(s) if energy_window is not None else None
            energy = self.trust.energy_facts(s, run, node, window)
        arrived = Arrived(assignment.id, node.id, place, ClaimFacts.of(meta), row, rules, energy)
        decided = round_engine.arrival(snap, arrived, self.clock())
        if decided.refused is None and cfg is not None and rnd is not None:
            return cfg, rnd, decided  # (accepted: the round is there and the settings read)
        if decided.effects:  # MarkLate: the round moved on without this assignment
            apply_effects(s, run, rnd, decided.effects)
            s.commit()
        refused = decided.refused or UploadRefused(409, Refusal.STALE, "stale: no round")
        self.trust.refuse_upload(s, run, cfg, node.id, assignment, refused)

    def _drop_unless_named(self, run_id: str, digest: str) -> None:
        """Remove the blob of a refused or failed upload unless a contribution row names it;
        under the run's lock, so an identical upload's commit (which puts the blob back if it
        is missing) and this removal never interleave."""
        with self.lock, self.sessions() as s:
            lock_run(s, run_id)
            if contribution_store.contribution_row(s, digest) is None:
                self.blobs.delete(digest)

    @staticmethod
    def _check_payload(cfg: RunConfig, tensors: dict[str, torch.Tensor], numel: int) -> None:
        """The update decodes with the run's codec to `numel` finite values (checked without
        decoding where the codec can: codecs.check_payload)."""
        try:
            check_payload(make_codec(cfg.comm.codec, cfg.comm.block_size), tensors, numel)
        except NonFinitePayload as exc:
            raise HubError(400, f"contribution has non-finite values: {exc}") from exc
        except BlobFormatError as exc:
            raise HubError(400, f"malformed contribution payload: {exc}") from exc
