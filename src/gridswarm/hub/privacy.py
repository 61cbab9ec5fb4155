"""The hub's side of privacy in live rounds: DP-FedAvg aggregation and accounting, and the
stages of secure aggregation (SecAgg+) over the pull-based HTTP API.

Aggregation is the pure `hub/aggregation.py` (`aggregate_round`: the run's aggregator,
DP-FedAvg, or the SecAgg sum, whose session this module reads for it: `secagg_sum`), called
from `Ticker._close` (hub/ticker.py); the close then writes what it recorded (`record_close`):
after a DP round the Opacus accountant's epsilon is stored per round, and the run finishes
before a round that would take epsilon past its budget (`stop_reason`).

SecAgg stages of one round (the hub never dials a node; nodes poll `task`):

    training   node trains, then POST secagg/advertise {meta, public keys}  (= its contribution;
               accepted or refused by hub/acceptance.py exactly like a plain upload)
    [round decides CLOSE: quorum in]  hub fixes the participants and the SecAggConfig
    share      node polls task -> KeyBroadcast; POST secagg/{round}/{attempt}/share  ShareKeys
    mask       node polls task -> ShareDelivery; POST .../masked  uint32 words (a blob)
    unmask     node polls task -> UnmaskRequest; POST .../unmask  UnmaskShares
    done       hub rebuilds the masks, stores the sum, and the round closes as usual

A stage advances when every expected node answered, or when the missing ones are lost (no
heartbeat) or its timeout passed and at most t nodes are missing in all; with more than t it
fails: the round's contributions are discarded and the round is retrained (new attempt, fresh
keys), with the reason kept in the session row. The decisions are the round engine's
(`hub/engine.py`: a Tick opens the session, `SecAggProgress` composes the pure
`secagg_stages.decide_stage`, `SecAggRecovered` / `SecAggFailed` end it) and their row writes
`hub/store/rounds.py`'s; this module gathers the facts (`_progress`), computes the session's
config (`session_config`), reads the unmask's inputs (`unmask_inputs`; the unmask itself is the
pure `hub/secagg_unmask.py`, which the ticker computes outside the lock: `advance_secagg` takes
its outcome while it still matches the round), and keeps the stage messages and blobs. Its
statements (the accountant's rounds, the sessions, the stage messages) are
`hub/store/privacy.py`'s.

`HubService` builds one `HubPrivacy` (`service.privacy`), after its `Uploads` and before its
`Ticker`, which is handed it; `add_privacy_routes` serves its node requests. Its own state is
only the SecAgg stage messages computed for the current session (`_broadcasts`,
`_deliveries`). It is handed, not copied, what it shares with the service, which stays its
single owner:
- the session factory, the blob store (masked inputs, the unmask's reads and the sum) and the
  lock (every decision under the hub's one lock, the one the asks, uploads and ticker decide
  under);
- the clock (the service's, called through it, so a clock the tests put on the service is this
  one's too) and the tick schedule (a stage whose unmask is due marks its run);
- membership (a node noted alive by its requests, and the live window that says which nodes
  a stage lost);
- the run reads the requests share: the run's row, and its row locked (`HubService._run`);
- the carbon columns of a contribution (`HubService._carbon`: an advertisement is accounted as
  any upload);
- the upload path's acceptance (`Uploads.accept_upload`: an advertisement is accepted or
  refused exactly as a plain upload);
- the ticker's advance of a run (`Ticker.advance` with `defer_close`: a stage's last answer
  moves the stage on at once), called through the service, since the ticker is built after
  this module and is handed it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable, Iterable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.orm import Session

from gridswarm.blobs import provisional, sha256_hex
from gridswarm.config import RunConfig
from gridswarm.hub import engine as round_engine
from gridswarm.hub import models as m
from gridswarm.hub.aggregation import PrivacyRecord, SecAggSum
from gridswarm.hub.engine import ContributionRow, RoundSnapshot
from gridswarm.hub.errors import HubError
from gridswarm.hub.openapi import RoundParam, RunIdParam, WaitParam, openapi_body
from gridswarm.hub.rounds import Decision, RoundRules
from gridswarm.hub.secagg_stages import StageProgress
from gridswarm.hub.secagg_unmask import (
    UnmaskInputs,
    UnmaskOutcome,
    unmask_key,
    unmask_outcome,
)
from gridswarm.hub.states import (
    NOT_IN_SUM,
    RoundStatus,
)
from gridswarm.hub.store.contributions import assignment_row
from gridswarm.hub.store.nodes import node_row, nodes_by_id
from gridswarm.hub.store.privacy import (
    accepted_contribution,
    accepted_node_ids,
    add_dp_round,
    add_secagg_message,
    assignment_contribution,
    delete_secagg_messages,
    dp_rounds,
    flush_stage,
    privacy_run,
    secagg_messages,
    secagg_session,
    secagg_sessions,
)
from gridswarm.hub.store.rounds import apply_effects
from gridswarm.hub.store.runs import round_row, run_row
from gridswarm.privacy.dp import (
    can_run_round,
    epsilon_spent,
)
from gridswarm.privacy.live import (
    clip_range,
    session_name,
)
from gridswarm.privacy.secagg import (
    KEY_BYTES,
    SHARE_BYTES,
    AdvertiseKeys,
    KeyBroadcast,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
    encode_message,
    make_config,
)
from gridswarm.protocol import (
    API,
    MAX_JSON_BYTES,
    ContributionMeta,
    NodeStatus,
    Refusal,
    SecAggAdvertisement,
    SecAggStageMessage,
    SecAggTaskRequest,
    describe_errors,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from gridswarm.blobs import FileBlobStore
    from gridswarm.hub.membership import Membership
    from gridswarm.hub.service import HubService
    from gridswarm.hub.tick_schedule import TickSchedule
    from gridswarm.identity import VerifiedRequest

# Session stage -> the message stage nodes post during it.
ANSWERS = {"share": "share", "mask": "masked", "unmask": "unmask"}
# ShareKeys ciphertext: a seed share and a key share, plus the AEAD tag.
SHARE_CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16


# --------------------------------------------------------------------------- helpers


def _jsonable(message: Any) -> Any:
    return json.loads(encode_message(message))


def _message(doc: Any, expected: type) -> Any:
    try:
        msg = decode_message(json.dumps(doc).encode())
    except SecAggError as exc:
        raise HubError(422, str(exc)) from exc
    if not isinstance(msg, expected):
        raise HubError(422, f"expected a {expected.__name__} message")
    return msg


def _history(rows: Iterable[m.PrivacyRound]) -> list[tuple[float, float, int]]:
    """Accounting history: consecutive rounds with the same (z, q) merged."""
    out: list[tuple[float, float, int]] = []
    for r in rows:
        if out and out[-1][:2] == (r.noise_multiplier, r.sample_rate):
            out[-1] = (r.noise_multiplier, r.sample_rate, out[-1][2] + 1)
        else:
            out.append((r.noise_multiplier, r.sample_rate, 1))
    return out


def check_new_run(cfg: RunConfig) -> None:
    """Refuse a DP run whose budget cannot pay for even one round."""
    dp = cfg.privacy.dp
    if dp and not can_run_round(
        [], dp.noise_multiplier, dp.sample_rate, dp.delta, dp.epsilon_budget, dp.accountant
    ):
        one = epsilon_spent([(dp.noise_multiplier, dp.sample_rate, 1)], dp.delta, dp.accountant)
        raise ValueError(
            f"privacy.dp.epsilon_budget = {dp.epsilon_budget} is below one round's epsilon "
            f"({one:.3g} at noise_multiplier {dp.noise_multiplier}); raise the budget or the noise"
        )


# --------------------------------------------------------------------------- the hub side


class HubPrivacy:
    """DP aggregation/accounting and SecAgg stages over the state it is handed (see the
    module's docstring for the state it owns and the state it shares with `HubService`)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        blobs: FileBlobStore,
        lock: threading.RLock,
        clock: Callable[[], float],
        ticks: TickSchedule,
        membership: Membership,
        read_run: Callable[[Session, str], m.Run],
        locked_run: Callable[[Session, str], m.Run],
        carbon: Callable[[m.Run | None, m.Node | None, ContributionMeta], dict],
        accept_upload: Callable[..., tuple[RunConfig, m.Round, round_engine.Step]],
        advance_deferred: Callable[[str], Decision | None],
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.lock = lock
        self.clock = clock
        self.ticks = ticks
        self.membership = membership
        self.read_run = read_run
        self.locked_run = locked_run
        self.carbon = carbon
        self.accept_upload = accept_upload  # `Uploads.accept_upload`
        self.advance_deferred = advance_deferred  # `Ticker.advance(run_id, defer_close=True)`
        self._broadcasts: dict[tuple[str, int, int], dict[str, KeyBroadcast]] = {}
        self._deliveries: dict[tuple[str, int, int], dict[str, ShareDelivery]] = {}

    # ------------------------------------------------------------ aggregation and accounting

    def secagg_sum(self, s: Session, run: m.Run, rnd: m.Round) -> SecAggSum | None:
        """What `aggregation.aggregate_round` reads of a SecAgg round's session (its recovered
        sum and participant count); None for a run without SecAgg."""
        if not run.settings().privacy.secagg:
            return None
        sess = secagg_session(s, run.id, rnd.number)
        if sess is None or sess.sum_blob is None:
            raise RuntimeError(f"round {rnd.number} of run {run.id} has no recovered SecAgg sum")
        config = decode_message(sess.config_json.encode())
        return SecAggSum(sess.sum_blob, len(config.node_ids))

    def record_close(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        cfg: RunConfig,
        record: PrivacyRecord,
        now: float,
    ) -> None:
        """Write, in the transaction of the close that publishes `rnd`'s version, what its
        aggregation (`aggregation.aggregate_round`) recorded: the DP round's accounting and the
        SecAgg session's aggregate blob."""
        if record.dp_nodes is not None:
            self._account(s, run, rnd, cfg, record.dp_nodes, record.dp_clipped, now)
        if record.secagg_aggregate_blob is not None:
            sess = secagg_session(s, run.id, rnd.number)
            sess.aggregate_blob = record.secagg_aggregate_blob

    def _account(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        cfg: RunConfig,
        nodes: int,
        clipped: int | None,
        now: float,
    ) -> None:
        dp = cfg.privacy.dp
        rows = dp_rounds(s, run.id)
        history = [*_history(rows), (dp.noise_multiplier, dp.sample_rate, 1)]
        add_dp_round(
            s,
            run_id=run.id,
            number=rnd.number,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=dp.sample_rate,
            clip_norm=dp.clip_norm,
            nodes=nodes,
            clipped=clipped,
            epsilon=epsilon_spent(history, dp.delta, dp.accountant),
            delta=dp.delta,
            created_at=now,
        )

    def stop_reason(self, s: Session, run: m.Run, cfg: RunConfig) -> str | None:
        """Why the run must finish now (one more round would pass the epsilon budget), None to
        go on. Reads only: the round engine's `FinishRun` effect records it (hub/store/rounds.py
        writes `PrivacyRun`) when no round or token budget finished the run first."""
        dp = cfg.privacy.dp
        if dp is None:
            return None
        history = _history(dp_rounds(s, run.id))
        if can_run_round(
            history, dp.noise_multiplier, dp.sample_rate, dp.delta, dp.epsilon_budget, dp.accountant
        ):
            return None
        spent = epsilon_spent(history, dp.delta, dp.accountant)
        after = epsilon_spent(
            [*history, (dp.noise_multiplier, dp.sample_rate, 1)], dp.delta, dp.accountant
        )
        reason = (
            f"epsilon budget: {spent:.3f} spent after {sum(h[2] for h in history)} rounds at "
            f"delta {dp.delta:g}; one more round would reach {after:.3f} > "
            f"privacy.dp.epsilon_budget {dp.epsilon_budget:g}"
        )
        return reason

    def run_status(self, run_id: str) -> dict:
        """`{"privacy": {...}}` for `HubService.run_status`, or {} for a run without privacy."""
        with self.sessions() as s:
            run = run_row(s, run_id)
            if run is None:
                return {}
            cfg = run.settings()
            p = cfg.privacy
            if p.dp is None and p.secagg is None and cfg.data.data != "local":
                return {}
            rounds = dp_rounds(s, run_id)
            stop = privacy_run(s, run_id)
            sessions = secagg_sessions(s, run_id)
        info: dict[str, Any] = {
            "data": cfg.data.data,
            "hub_eval_set": cfg.data.dataset,
            "secagg": p.secagg is not None,
            "dp": None if p.dp is None else p.dp.noise,
            "epsilon": rounds[-1].epsilon if rounds else (0.0 if p.dp else None),
            "delta": p.dp.delta if p.dp else None,
            "epsilon_budget": p.dp.epsilon_budget if p.dp else None,
            "accountant": p.dp.accountant if p.dp else None,
            "epsilon_per_round": [
                {"round": r.round, "epsilon": r.epsilon, "nodes": r.nodes, "clipped": r.clipped}
                for r in rounds
            ],
            "stop_reason": stop.stop_reason if stop else None,
            # Per-node audits/usefulness need individual updates: not available under SecAgg.
            "per_node_audits": p.secagg is None,
        }
        if p.secagg is not None:
            info["secagg_rounds"] = [
                {
                    "round": x.round,
                    "attempt": x.attempt,
                    "stage": x.stage,
                    "survivors": x.survivors,
                    "dropped": x.dropped,
                    "failures": x.failures,
                    "last_failure": x.last_failure,
                    "duration_s": None if x.closed_at is None else x.closed_at - x.opened_at,
                }
                for x in sessions
            ]
        return {"privacy": info}

    # ------------------------------------------------------------ SecAgg: round driver

    def session_config(self, s: Session, run: m.Run, rnd: m.Round) -> str:
        """The encoded `SecAggConfig` of the round's SecAgg session as it opens (the round
        engine's `OpenSecAgg`, written by `store.rounds.apply_effects`): the participants are
        the nodes of the round's accepted contributions, the session named by its attempt."""
        cfg = run.settings()
        sa = cfg.privacy.secagg
        node_ids = sorted(accepted_node_ids(s, run.id, rnd.number))
        config = make_config(
            session=session_name(run.id, rnd.number, rnd.attempt),
            node_ids=node_ids,
            vector_length=run.numel,
            n_neighbours=sa.neighbours,
            max_dropouts=sa.max_dropouts,
            clip_range=clip_range(cfg, len(node_ids)),
        )
        return encode_message(config).decode()

    def advance_secagg(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        snapshot: RoundSnapshot,
        rules: RoundRules,
        now: float,
        prepared: UnmaskOutcome | None = None,
        defer_unmask: bool = False,
    ) -> round_engine.Step | None:
        """One move of a `secagg` round's stages, applied in `s` (not committed): read where
        the stage stands (`SecAggProgress`), step the round engine and apply its effects
        (the next stage, or the failure); where the step says so, take the unmask's outcome
        and step what it gave: `SecAggRecovered` (the sum's blob named on the session; CLOSE:
        the caller closes the round) or `SecAggFailed`. A failure's stage messages are
        deleted here (the message table is this module's).

        The unmask (hub/secagg_unmask.py) is `prepared` when the ticker computed it outside
        the lock from what is still the round's (`UnmaskOutcome.key`); else, with
        `defer_unmask`, nothing is applied and the answer is None (the caller rolls back and
        computes it outside the lock first), and without it the unmask is computed here."""
        sess = secagg_session(s, run.id, rnd.number)
        config = decode_message(sess.config_json.encode())
        stepped = self._stage_step(s, run, sess, config, snapshot, rules, now)
        outcome = None
        if stepped.unmask:
            answers = secagg_messages(s, run.id, sess.round, "unmask")
            key = unmask_key(run.id, sess.round, sess.attempt, answers)
            if prepared is not None and prepared.key == key:
                outcome = prepared
            elif defer_unmask:
                return None
            else:  # what a prepared unmask read has changed (a late answer): computed here
                inputs = self._unmask_inputs(s, run, sess, config, answers)
                outcome = unmask_outcome(inputs, self.blobs.get, self.blobs.put)
            event: round_engine.Event = (
                round_engine.SecAggFailed(outcome.error)
                if outcome.error is not None
                else round_engine.SecAggRecovered(outcome.survivors, outcome.dropped)
            )
            stepped = round_engine.step(snapshot, rules, event, now)
        apply_effects(s, run, rnd, stepped.effects)
        if outcome is not None and stepped.decision is Decision.CLOSE:
            sess.sum_blob = outcome.sum_blob
        if any(isinstance(e, round_engine.FailSecAgg) for e in stepped.effects):
            delete_secagg_messages(s, run.id, rnd.number)
        flush_stage(s)
        return stepped

    def unmask_inputs(
        self,
        s: Session,
        run: m.Run,
        rnd: m.Round,
        snapshot: RoundSnapshot,
        rules: RoundRules,
        now: float,
    ) -> UnmaskInputs | None:
        """Reads only: what the unmask of a `secagg` round is computed from, when its stage's
        step says to unmask now (None otherwise), for the ticker to compute it outside the
        lock (`secagg_unmask.unmask_outcome`)."""
        sess = secagg_session(s, run.id, rnd.number)
        config = decode_message(sess.config_json.encode())
        if not self._stage_step(s, run, sess, config, snapshot, rules, now).unmask:
            return None
        answers = secagg_messages(s, run.id, sess.round, "unmask")
        return self._unmask_inputs(s, run, sess, config, answers)

    def _stage_step(
        self,
        s: Session,
        run: m.Run,
        sess: m.SecAggSession,
        config: SecAggConfig,
        snapshot: RoundSnapshot,
        rules: RoundRules,
        now: float,
    ) -> round_engine.Step:
        """The round engine's step on where the session's stage stands (`SecAggProgress`)."""
        progress = round_engine.SecAggProgress(self._progress(s, run, sess, config, now))
        return round_engine.step(snapshot, rules, progress, now)

    @staticmethod
    def _unmask_inputs(
        s: Session,
        run: m.Run,
        sess: m.SecAggSession,
        config: SecAggConfig,
        answers: dict[str, str],
    ) -> UnmaskInputs:
        """The session's stored stage messages for the unmask (`answers`: its unmask answers,
        already read)."""
        return UnmaskInputs(
            key=unmask_key(run.id, sess.round, sess.attempt, answers),
            config=config,
            advertise=secagg_messages(s, run.id, sess.round, "advertise"),
            shares=secagg_messages(s, run.id, sess.round, "share"),
            masked=secagg_messages(s, run.id, sess.round, "masked"),
            unmask=answers,
        )

    def _expected(
        self, s: Session, run: m.Run, round_number: int, stage: str, config: SecAggConfig
    ) -> frozenset[str]:
        """Nodes that may answer `stage`: everyone at share, then those that answered before."""
        before = {"share": None, "mask": "share", "unmask": "masked"}[stage]
        if before is None:
            return frozenset(config.node_ids)
        return frozenset(secagg_messages(s, run.id, round_number, before))

    def _progress(
        self, s: Session, run: m.Run, sess: m.SecAggSession, config: SecAggConfig, now: float
    ) -> StageProgress:
        expected = self._expected(s, run, sess.round, sess.stage, config)
        answered = frozenset(secagg_messages(s, run.id, sess.round, ANSWERS[sess.stage]))
        liveness = self.membership.liveness_s(now)
        lost = frozenset(
            n.id
            for n in nodes_by_id(s, sorted(expected - answered))
            if n.status == NodeStatus.LEFT or now - n.last_seen_at > liveness
        )
        return StageProgress(
            stage=sess.stage,
            n_nodes=len(config.node_ids),
            max_dropouts=config.max_dropouts,
            expected=expected,
            answered=answered & expected,
            lost=lost,
            deadline_at=sess.stage_deadline_at,
        )

    # ------------------------------------------------------------ SecAgg: node requests

    def _assignment(self, s: Session, run_id: str, node_id: str, assignment_id: str):
        assignment = assignment_row(s, assignment_id)
        if assignment is None or assignment.run_id != run_id:
            raise HubError(404, f"assignment {assignment_id} not found in run {run_id}")
        if assignment.node_id != node_id:
            raise HubError(403, "assignment belongs to another node")
        return assignment

    def advertise(self, run_id: str, node_id: str, body: bytes) -> dict:
        """A node's contribution under SecAgg: its signed claims and its round public keys."""
        try:
            doc = SecAggAdvertisement.model_validate_json(body)
        except ValidationError as exc:
            raise HubError(
                422, f"malformed SecAgg advertisement: {describe_errors(exc.errors())}"
            ) from exc
        meta = doc.meta
        try:
            keys = [base64.b64decode(k, validate=True) for k in (doc.cipher_key, doc.mask_key)]
        except ValueError as exc:
            raise HubError(422, f"malformed SecAgg advertisement: {exc}") from exc
        if any(len(k) != KEY_BYTES for k in keys) or keys[0] == keys[1]:
            raise HubError(422, "public keys must be two distinct 32-byte X25519 keys")
        with self.sessions() as s:  # energy accounting, as for any contribution (no lock)
            carbon = self.carbon(run_row(s, run_id), node_row(s, node_id), meta)
        with self.lock, self.sessions() as s:
            run = self.locked_run(s, run_id)  # replicas: one decision per run at a time
            node = self.membership.node(s, node_id)
            cfg = run.settings()
            if cfg.privacy.secagg is None:
                raise HubError(409, f"run {run_id} does not use secure aggregation")
            a = self._assignment(s, run_id, node_id, meta.assignment_id)
            # the one acceptance path of a plain upload (the round engine's `Arrived`): stale,
            # false claims and the energy floor, with strikes on the ledger
            digest = hashlib.sha256(body).hexdigest()
            row = ContributionRow(digest, meta.model_dump(), len(body), carbon)
            _cfg, rnd, accepted = self.accept_upload(s, run, node, a, meta, row, secagg=True)
            seen = secagg_messages(s, run_id, a.round, "advertise")
            known = {k for b in seen.values() for k in self._keys_of(b)}
            if known & set(keys):
                raise HubError(409, "public keys already used in this round")
            now = self.clock()
            apply_effects(s, run, rnd, accepted.effects)  # the row, and `submitted`
            add_secagg_message(
                s,
                run_id,
                a.round,
                "advertise",
                node_id,
                encode_message(AdvertiseKeys(node_id, keys[0], keys[1])).decode(),
                now,
            )
            s.commit()
        self._move_on(run_id)  # the last contribution opens the SecAgg stages now
        return {"contribution_id": digest, "accepted": True, "bytes_up": len(body)}

    def _move_on(self, run_id: str) -> None:
        """After a node's message: advance the run's round at once (its SecAgg stages opened,
        the next stage), but not the unmask, the heavy part: that run is marked for the
        ticker, which computes the unmask outside the lock (`Ticker.advance_run`) at its next
        tick (`TICK_S`)."""
        with self.lock:
            moved = self.advance_deferred(run_id)
        if moved is None:  # an unmask (or a close) is due: nothing was written
            self.ticks.mark(run_id)

    @staticmethod
    def _keys_of(body: str) -> tuple[bytes, bytes]:
        msg = decode_message(body.encode())
        return msg.cipher_public_key, msg.mask_public_key

    def task(self, run_id: str, node_id: str, assignment_id: str) -> dict:
        """What the node must do now for its SecAgg contribution (the node polls this)."""
        with self.lock, self.sessions() as s:
            self.membership.node(s, node_id)
            run = self.read_run(s, run_id)
            a = self._assignment(s, run_id, node_id, assignment_id)
            contribution = assignment_contribution(s, a.id)
            sess = secagg_session(s, run_id, a.round)
            rnd = round_row(s, run_id, a.round)
            s.commit()
            if contribution is None or contribution.status in NOT_IN_SUM:
                why = (sess.last_failure if sess and contribution is not None else None) or (
                    "this node's contribution did not reach the sum (it missed a stage)"
                    if contribution is not None
                    else "no contribution advertised for this assignment"
                )
                return {"stage": "aborted", "reason": why}
            if rnd.status == RoundStatus.CLOSED:
                return {"stage": "done", "version": rnd.base_version + 1}
            if rnd.status != RoundStatus.SECAGG or sess is None or sess.stage not in ANSWERS:
                return {"stage": "wait"}
            config = decode_message(sess.config_json.encode())
            if node_id not in config.node_ids:
                return {"stage": "aborted", "reason": "not a participant of this round's SecAgg"}
            expected = self._expected(s, run, a.round, sess.stage, config)
            if node_id not in expected:
                return {"stage": "aborted", "reason": f"missed an earlier stage than {sess.stage}"}
            if node_id in secagg_messages(s, run_id, a.round, ANSWERS[sess.stage]):
                return {"stage": "wait"}
            out: dict[str, Any] = {
                "stage": sess.stage,
                "round": a.round,
                "attempt": sess.attempt,
                "config": json.loads(sess.config_json),
            }
            key = (run_id, a.round, sess.attempt)
            if sess.stage == "share":
                if key not in self._broadcasts:
                    server = SecAggServer(config)
                    adv = secagg_messages(s, run_id, a.round, "advertise")
                    self._broadcasts = {
                        key: server.collect_keys(decode_message(adv[n].encode()) for n in adv)
                    }
                message: Any = self._broadcasts[key][node_id]
            elif sess.stage == "mask":
                if key not in self._deliveries:
                    server = SecAggServer(config)
                    adv = secagg_messages(s, run_id, a.round, "advertise")
                    server.collect_keys(decode_message(adv[n].encode()) for n in adv)
                    shares = secagg_messages(s, run_id, a.round, "share")
                    self._deliveries = {
                        key: server.collect_shares(
                            decode_message(b.encode()) for b in shares.values()
                        )
                    }
                message = self._deliveries[key][node_id]
            else:
                masked = set(secagg_messages(s, run_id, a.round, "masked"))
                shared = set(secagg_messages(s, run_id, a.round, "share"))
                message = UnmaskRequest(
                    tuple(sorted(masked, key=config.index)),
                    tuple(sorted(shared - masked, key=config.index)),
                )
            out["message"] = _jsonable(message)
            return out

    def receive(
        self, run_id: str, node_id: str, round_number: int, attempt: int, stage: str, body: bytes
    ) -> dict:
        """Store one node's answer to the current stage after checking it fits the round."""
        with self.lock, self.sessions() as s:
            run = self.locked_run(s, run_id)  # replicas: one decision per run at a time
            self.membership.node(s, node_id)
            sess = secagg_session(s, run_id, round_number)
            if (
                sess is None
                or sess.attempt != attempt
                or run.round != round_number
                or ANSWERS.get(sess.stage) != stage
            ):
                now_at = "none" if sess is None else f"attempt {sess.attempt}, stage {sess.stage}"
                raise HubError(
                    409,
                    f"stale: SecAgg {stage} for round {round_number} attempt {attempt} is "
                    f"not expected now (run round {run.round}, {now_at})",
                    Refusal.STALE,
                )
            config = decode_message(sess.config_json.encode())
            if node_id not in self._expected(s, run, round_number, sess.stage, config):
                raise HubError(403, f"node {node_id} is not expected at the {sess.stage} stage")
            if node_id in secagg_messages(s, run_id, round_number, stage):
                raise HubError(409, f"duplicate: {stage} already received", Refusal.DUPLICATE)
            try:
                stored = self._validate(s, run, sess, config, node_id, stage, body)
            except (TypeError, AttributeError, ValueError) as exc:  # fields of the wrong type
                raise HubError(422, f"malformed SecAgg {stage} message: {exc!r}"[:500]) from exc
            # a masked input is stored as a blob, removed again if the commit fails
            with provisional(self.blobs, body) if stage == "masked" else nullcontext():
                add_secagg_message(s, run_id, round_number, stage, node_id, stored, self.clock())
                contribution = accepted_contribution(s, run_id, round_number, node_id)
                if contribution is not None:
                    contribution.bytes_up += len(body)
                s.commit()
        self._move_on(run_id)  # the last answer moves the stage on now, not at the next tick
        return {"ok": True, "stage": stage, "bytes": len(body)}

    def _validate(
        self,
        s: Session,
        run: m.Run,
        sess: m.SecAggSession,
        config: SecAggConfig,
        node_id: str,
        stage: str,
        body: bytes,
    ) -> str:
        """Refuse a message that would break the round for everyone; returns what to store."""
        if stage == "masked":
            if len(body) != 4 * config.vector_length:
                raise HubError(
                    422, f"masked input has {len(body)} bytes, expected {4 * config.vector_length}"
                )
            return sha256_hex(body)  # the blob is written by `receive`, with the row
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise HubError(422, f"malformed SecAgg message: {exc}") from exc
        if stage == "share":
            msg = _message(doc, ShareKeys)
            allowed = set(config.neighbours(node_id)) & set(
                secagg_messages(s, run.id, sess.round, "advertise")
            )
            bad = set(msg.encrypted_shares) - allowed
            if bad or len(msg.seed_commitment) != 32:
                raise HubError(
                    422, f"shares for non-neighbours {sorted(bad)} or a malformed commitment"
                )
            if any(len(c) != SHARE_CIPHERTEXT_BYTES for c in msg.encrypted_shares.values()):
                raise HubError(422, "an encrypted share has the wrong length")
        else:
            msg = _message(doc, UnmaskShares)
            masked = set(secagg_messages(s, run.id, sess.round, "masked"))
            shared = set(secagg_messages(s, run.id, sess.round, "share"))
            if not set(msg.seed_shares) <= masked or not set(msg.key_shares) <= shared - masked:
                raise HubError(
                    422, "unmask shares for nodes outside the request (or both secrets of one)"
                )
            shares = [*msg.seed_shares.values(), *msg.key_shares.values()]
            if any(len(x) != SHARE_BYTES for x in shares):
                raise HubError(422, "an unmask share has the wrong length")
        if msg.node_id != node_id:
            raise HubError(403, "message names another node than its signer")
        return encode_message(msg).decode()


def masked_words(data: bytes) -> np.ndarray:
    """A stored masked input as uint32 words (for inspection and tests)."""
    return np.frombuffer(data, dtype="<u4")


# --------------------------------------------------------------------------- HTTP routes


def add_privacy_routes(
    app: FastAPI,
    service: HubService,
    signed: Callable[[Request, int], Awaitable[tuple[VerifiedRequest, bytes]]],
    max_upload_bytes: int,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> None:
    """The signed SecAgg endpoints under /v1/runs/{run_id}/secagg/ (see the module docstring)."""
    privacy = service.privacy
    base = f"{API}/runs/{{run_id}}/secagg"

    @app.post(f"{base}/advertise", openapi_extra=openapi_body(SecAggAdvertisement))
    async def secagg_advertise(run_id: RunIdParam, request: Request) -> dict:
        verified, body = await signed(request, max_json_bytes)
        return await run_in_threadpool(privacy.advertise, run_id, verified.node_id, body)

    @app.post(f"{base}/task", openapi_extra=openapi_body(SecAggTaskRequest))
    async def secagg_task(run_id: RunIdParam, request: Request, wait_s: WaitParam = 10.0) -> dict:
        """Long-poll: answers as soon as the node has something to do, else after `wait_s`."""
        verified, body = await signed(request, max_json_bytes)
        try:
            assignment_id = SecAggTaskRequest.model_validate_json(body).assignment_id
        except ValidationError as exc:
            raise HubError(422, f"malformed request: {describe_errors(exc.errors())}") from exc
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s  # bounded by WaitParam
        while True:
            answer = await run_in_threadpool(privacy.task, run_id, verified.node_id, assignment_id)
            if answer["stage"] != "wait" or loop.time() >= give_up:
                return answer
            await asyncio.sleep(min(0.2, max(give_up - loop.time(), 0)))

    stage_body = openapi_body(SecAggStageMessage)
    stage_body["requestBody"]["content"] |= openapi_body(binary=True)["requestBody"]["content"]

    @app.post(f"{base}/{{round_number}}/{{attempt}}/{{stage}}", openapi_extra=stage_body)
    async def secagg_answer(
        run_id: RunIdParam,
        round_number: RoundParam,
        attempt: RoundParam,
        stage: Annotated[str, Path(max_length=16)],
        request: Request,
    ) -> dict:
        """JSON `ShareKeys`/`UnmaskShares` for share/unmask; the masked input as raw bytes."""
        if stage not in ANSWERS.values():
            raise HubError(404, f"unknown SecAgg stage {stage!r}")
        limit = max_upload_bytes if stage == "masked" else max_json_bytes
        verified, body = await signed(request, limit)
        return await run_in_threadpool(
            privacy.receive, run_id, verified.node_id, round_number, attempt, stage, body
        )
