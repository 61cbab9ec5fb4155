"""The round engine's correctness in process, on a fake clock, without sleeps (issue 9):

- every upload passes one acceptance path: a SecAgg upload with an impossible energy claim is
  refused with the same typed reason as a plain one, and both are strikes on the ledger;
- a round whose contributions audits/screening reject below its quorum is re-planned, not
  closed on too few, whether the rejection came from pre-screening or from the close itself;
  a due close first has pre-screening audit, outside the lock, what it had not reached;
- a SecAgg participant that vanishes after masking: the round recovers without it (its input is
  in the sum), and with more than t such dropouts it fails cleanly (nothing published); a
  SecAgg round's unmask and close are computed outside the hub's lock (not in the request of
  the last answer), and an unmask whose answers changed meanwhile is computed again under it;
- a DP run that reaches its epsilon budget finishes with the reason; its closes are computed
  outside the hub's lock (the aggregation is pure) and each published round is accounted once.

The hub is the real service (and, for the HTTP paths, the real app through FastAPI's TestClient
with real signatures) on SQLite in a temporary folder (tests/harness.py, tests/hub/harness.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from gridswarm.hub import models as m
from gridswarm.hub import secagg_unmask
from gridswarm.hub import ticker as hub_ticker
from gridswarm.hub.rounds import Decision
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.identity import Identity
from gridswarm.node.secagg import SecAggContributor
from gridswarm.privacy.dp import epsilon_for
from gridswarm.protocol import (
    API,
    Assignment,
    ContributionMeta,
    NodeStatus,
    Refusal,
    RegisterRequest,
)
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack, unpack_vector
from tests.conftest import tiny_run
from tests.harness import FakeClock, assert_statuses_typed, new_service
from tests.hub.harness import Hub, contribution, meta_fields

TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size
NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0}
SECAGG = {"secagg": {"neighbours": 2, "max_dropouts": 1, "stage_timeout_s": 600}}
LIVENESS_S = 20.0


# ------------------------------------------------------------------------- helpers


class SignedClient:
    """What `SecAggContributor` needs of a `HubClient`, over the in-process hub: signed POSTs
    through the real app; a refusal fails the test unless the caller expects it."""

    def __init__(self, hub: Hub, who: Identity) -> None:
        self.hub, self.who = hub, who

    def request(self, method: str, path: str, body: bytes = b"", params: dict | None = None):
        assert method == "POST"
        response = self.hub.post(self.who, path, body, params=params)
        assert response.status_code == 200, response.text
        return response


def ledger(service: HubService, kind: str, run_id: str) -> list[dict[str, Any]]:
    rows = service.trust.show(0, 5000, kind)
    return [r["payload"] for r in rows if r["payload"].get("run_id") == run_id]


def rows(service: HubService, table, *where) -> list:
    with service.sessions() as s:
        return list(s.scalars(select(table).where(*where)))


def fake_update(numel: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    """A pseudo-gradient without training (the hub cannot tell, and audits are off)."""
    return scale * torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def upload(service: HubService, run_id: str, node_id: str, a: Assignment, update) -> None:
    """Submit `update` for `a` with honest claims, through the service."""
    codec = make_codec("int8")
    meta = ContributionMeta(**meta_fields(a, TOKENS_PER_STEP))
    service.uploads.submit(run_id, node_id, pack(codec.encode(update), meta.model_dump()))


# ------------------------------------------------------------------------- one acceptance path


def test_a_secagg_upload_with_an_impossible_energy_claim_is_refused_like_a_plain_one(
    tmp_path: Path,
):
    hub = Hub(tmp_path)
    node, secagg_node = Identity.generate(), Identity.generate()  # one strike excludes a node
    hub.register(node)
    hub.register(secagg_node)
    plain = hub.create_run(Identity.generate(), tiny_run(trust=NO_AUDITS))
    secagg = hub.create_run(
        Identity.generate(), tiny_run(privacy=SECAGG, round={"quorum": 3, "min_nodes": 1})
    )
    # 4 threads at full load for an hour cannot have used a millionth of a watt-hour
    impossible = {"energy_wh": 1e-6, "train_time_s": 3600.0, "threads": 4}

    a = hub.assignment(node, plain)
    body = contribution(a, hub.numel(plain), TOKENS_PER_STEP, **impossible)
    refused_plain = hub.post(node, f"{API}/runs/{plain}/contributions", body)

    a = hub.assignment(secagg_node, secagg)
    meta = meta_fields(a, TOKENS_PER_STEP, codec="secagg-u32", **impossible)
    keys = {"cipher_key": "A" * 43 + "=", "mask_key": "B" * 43 + "="}
    before = hub.snapshot()
    path = f"{API}/runs/{secagg}/secagg/advertise"
    refused_secagg = hub.post(secagg_node, path, {"meta": meta} | keys)

    for r in (refused_plain, refused_secagg):
        assert r.status_code == 400, r.text
        assert r.json()["reason"] == Refusal.ENERGY_FLOOR
        assert "energy under-reported" in r.json()["detail"]
    # nothing stored for the SecAgg upload but its strike on the ledger (and the nonce)
    after = hub.snapshot()
    assert after["contributions"] == before["contributions"] == []
    assert after["secagg_messages"] == before["secagg_messages"]
    assert after["ledger_entries"] != before["ledger_entries"]
    for run_id in (plain, secagg):
        (verdict,) = ledger(hub.service, "verdict", run_id)
        assert not verdict["accepted"] and verdict["stage"] == "submit"
        assert "energy under-reported" in verdict["reason"]
    # and a false work claim is a strike under SecAgg too, as it is for a plain upload
    other = Identity.generate()
    hub.register(other)
    a = hub.assignment(other, secagg)
    meta = meta_fields(a, TOKENS_PER_STEP, codec="secagg-u32", steps=a.inner_steps + 1)
    r = hub.post(other, f"{API}/runs/{secagg}/secagg/advertise", {"meta": meta} | keys)
    assert r.status_code == 400 and r.json()["reason"] == Refusal.FALSE_CLAIM, r.text
    verdicts = [v for v in ledger(hub.service, "verdict", secagg) if v["node"] == other.node_id]
    assert [v["reason"].startswith("false claim:") for v in verdicts] == [True]


# ------------------------------------------------------------------------- quorum after audits


def uploaded_round(
    tmp_path: Path, nodes: int, usefulness: bool, scale: float = 1.0
) -> tuple[HubService, str, list[str]]:
    """A run without audits whose one round holds an upload from each of `nodes` nodes, not
    yet pre-screened: (service, run id, node ids)."""
    service = new_service(tmp_path, FakeClock())
    config = tiny_run(
        round={"deadline_s": 60, "quorum": nodes, "min_nodes": nodes, "max_nodes": nodes},
        trust=NO_AUDITS | {"usefulness": usefulness},
        budget={"rounds": 1},
    )
    run_id = service.create_run(Identity.generate().public_key, config).run_id
    numel = service.run_status(run_id)["numel"]
    node_ids = [
        service.membership.register(
            Identity.generate().public_key,
            RegisterRequest(probe_tokens_per_s=1e4, probe_numel=numel, name=f"n{i}"),
        )
        for i in range(nodes)
    ]
    jobs = [service.asks.request_assignment(run_id, node).assignment for node in node_ids]
    for i, (node, job) in enumerate(zip(node_ids, jobs, strict=True)):
        upload(service, run_id, node, job, fake_update(numel, i) * scale)
    return service, run_id, node_ids


def test_prescreening_a_run_that_neither_audits_nor_scores_reads_no_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Nothing needs the upload or the base weights: pre-screening records each upload as not
    audited without reading either (two model-sized reads and hashes per upload, on the hub's
    cores while the other uploads arrive)."""
    service, _, _ = uploaded_round(tmp_path, 2, usefulness=False)
    monkeypatch.setattr(service.blobs, "get", lambda digest: pytest.fail(f"read {digest}"))
    assert service.trust.prescreen(service.workload) == 2
    screened = rows(service, m.Contribution)
    assert [(c.audited, c.audit_rate, c.status) for c in screened] == [(False, 0.0, "accepted")] * 2


def test_prescreening_reads_the_base_weights_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Usefulness scoring needs the version the uploads trained from: pre-screening reads and
    hashes it once for a batch of uploads, not once per upload (a model-sized read each)."""
    service, run_id, _ = uploaded_round(tmp_path, 3, usefulness=True, scale=1e-3)
    base_blob = service.latest_version(run_id)["weights_blob"]
    reads: list[str] = []
    get = service.blobs.get
    monkeypatch.setattr(service.blobs, "get", lambda digest: reads.append(digest) or get(digest))
    assert service.trust.prescreen(service.workload) == 3
    assert reads.count(base_blob) == 1 and len(reads) == 4  # the base once, each upload once
    assert all(c.loss_drop is not None for c in rows(service, m.Contribution))


def test_a_prescreening_verdict_that_cannot_be_written_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Pre-screening writes a batch's verdicts in one transaction; when one cannot be written,
    the others are written each on its own and that one stays unaudited (the close judges it)."""
    service, _, nodes = uploaded_round(tmp_path, 3, usefulness=False)
    apply = service.trust._apply

    def fails_for_the_second(s, run, cfg, c, a, ex):
        if c.node_id == nodes[1]:
            raise RuntimeError("a verdict that cannot be written")
        apply(s, run, cfg, c, a, ex)

    monkeypatch.setattr(service.trust, "_apply", fails_for_the_second)
    assert service.trust.prescreen(service.workload) == 2
    audited = {c.node_id: c.audited for c in rows(service, m.Contribution)}
    assert audited == {nodes[0]: False, nodes[1]: None, nodes[2]: False}


def harmful_round(tmp_path: Path) -> tuple[HubService, FakeClock, str, int, list[str]]:
    """A run whose one round has two places (quorum 2), taken by an honest node and a harmful
    one (an update that raises the held-out loss past the harm tolerance), both uploaded; a
    third registered node finds the round full. Returns the service, clock, run, model size
    and the three nodes (honest, harmful, late)."""
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    config = tiny_run(
        round={"deadline_s": 60, "quorum": 2, "min_nodes": 2, "max_nodes": 2},
        trust=NO_AUDITS | {"usefulness": True, "harm_tolerance_nats": 0.5},
        budget={"rounds": 1},
    )
    run_id = service.create_run(Identity.generate().public_key, config).run_id
    numel = service.run_status(run_id)["numel"]
    ids = []
    for i in range(3):
        request = RegisterRequest(probe_tokens_per_s=1e4, probe_numel=numel, name=f"n{i}")
        ids.append(service.membership.register(Identity.generate().public_key, request))
    honest, harmful, late = ids
    jobs = {n: service.asks.request_assignment(run_id, n).assignment for n in (honest, harmful)}
    assert service.asks.request_assignment(run_id, late).status == "wait"  # the round is full
    upload(service, run_id, honest, jobs[honest], fake_update(numel, 1))
    upload(service, run_id, harmful, jobs[harmful], fake_update(numel, 2, scale=5.0))
    return service, clock, run_id, numel, ids


@pytest.mark.parametrize("prescreened", [False, True], ids=["screened-at-close", "prescreened"])
def test_an_audit_rejection_that_breaks_the_quorum_replans_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prescreened: bool
):
    service, clock, run_id, numel, (honest, harmful, late) = harmful_round(tmp_path)
    if not prescreened:  # the close screens what pre-screening has not reached yet
        monkeypatch.setattr(service.trust, "prescreen", lambda workload_for: 0)
    clock.advance(1.0)
    decisions = dict(service.ticker.tick())
    # pre-screened: the round never looked closable; else the close found too few and re-planned
    assert decisions == ({} if prescreened else {run_id: Decision.REPLAN})

    status = service.run_status(run_id)
    assert status["version"] == 0, "closed on fewer accepted contributions than the quorum"
    (rnd,) = status["rounds"]
    assert rnd["status"] == "open" and rnd["attempts"] == (1 if prescreened else 2)
    by_node = {c.node_id: c for c in rows(service, m.Contribution)}
    assert by_node[honest].status == "accepted" and by_node[harmful].status == "rejected"
    (verdict,) = [v for v in ledger(service, "verdict", run_id) if not v["accepted"]]
    assert verdict["node"] == harmful and "harmful" in verdict["reason"]

    # the accepted contribution is kept; the freed place goes to another node, then it closes
    a = service.asks.request_assignment(run_id, late).assignment
    assert a is not None and a.round == 0
    upload(service, run_id, late, a, fake_update(numel, 3))
    clock.advance(1.0)
    service.ticker.tick()
    status = service.run_status(run_id)
    assert status["status"] == "finished" and status["version"] == 1
    assert status["status_reason"] == "budget.rounds reached: 1 of 1 rounds"
    (v1,) = rows(service, m.Version, m.Version.number == 1)
    assert v1.tokens_total == by_node[honest].tokens + a.inner_steps * TOKENS_PER_STEP
    stored = assert_statuses_typed(service.engine)  # every status written is typed
    assert {"rejected", "submitted"} <= stored["assignments"]


def test_a_due_close_audits_what_prescreening_has_not_reached_outside_the_lock(tmp_path: Path):
    service, clock, run_id, _, (honest, harmful, _) = harmful_round(tmp_path)
    examined_under_lock: list[bool] = []
    examine = service.trust._examine

    def spy(*args: Any, **kwargs: Any):
        examined_under_lock.append(service.lock._is_owned())  # this thread holds it?
        return examine(*args, **kwargs)

    service.trust._examine = spy
    clock.advance(1.0)
    # the round is all in and due, and no tick has pre-screened it: the close itself must
    # as when pre-screened in a tick: the rejection frees a place, and the round waits on
    assert service.ticker.advance_run(run_id) is Decision.WAIT
    assert examined_under_lock == [False, False]  # both examined, neither under the lock
    status = service.run_status(run_id)
    assert status["version"] == 0 and status["rounds"][0]["attempts"] == 1
    by_node = {c.node_id: c.status for c in rows(service, m.Contribution)}
    assert by_node == {honest: "accepted", harmful: "rejected"}


# ------------------------------------------------------------------------- SecAgg dropouts


def secagg_round(hub: Hub | Path, vanish: int) -> tuple[Hub, str, list, list[torch.Tensor]]:
    """Four nodes train (fake updates) and follow SecAgg on `hub` (a new one in a folder);
    `vanish` of them stop after sending their masked input and fall silent. Returns after the
    others have nothing left to do."""
    if isinstance(hub, Path):
        hub = Hub(hub, HubSettings(liveness_s=LIVENESS_S))
    config = tiny_run(
        privacy=SECAGG, round={"deadline_s": 60, "quorum": 4, "min_nodes": 4}, budget={"rounds": 1}
    )
    run_id = hub.create_run(Identity.generate(), config)
    numel = hub.numel(run_id)
    nodes = [Identity.generate() for _ in range(4)]
    for who in nodes:
        hub.register(who)
    contributors, updates = [], []
    for i, who in enumerate(nodes):
        a = hub.assignment(who, run_id)
        update = fake_update(numel, 10 + i, scale=0.02)
        meta = ContributionMeta(**meta_fields(a, TOKENS_PER_STEP, codec="secagg-u32"))
        c = SecAggContributor(SignedClient(hub, who), a, who.node_id, update, meta, numel)
        assert c.advertise()["accepted"]
        contributors.append(c)
        updates.append(update)
    victims = contributors[:vanish]
    for _ in range(20):  # share, mask, unmask: a handful of polls each, bounded
        tasks = [c.poll(wait_s=0) for c in contributors]
        for c, task in zip(contributors, tasks, strict=True):
            if task["stage"] in ("share", "mask", "unmask") and not (
                c in victims and "masked" in c.stages
            ):
                c.answer(task)
        if all(t["stage"] in ("wait", "done", "aborted") for t in tasks):
            break
    assert all("masked" in c.stages for c in contributors)
    return hub, run_id, contributors, updates


def keep_alive_and_pass_liveness(hub: Hub, alive: list[SecAggContributor]) -> None:
    """Move the clock past the liveness window; the live nodes heartbeat, the victims not."""
    hub.clock.advance(LIVENESS_S + 1)
    for c in alive:
        r = hub.post(c.client.who, f"{API}/nodes/heartbeat", {"status": "training"})
        assert r.status_code == 200, r.text
    hub.service.ticker.tick()


def test_a_masked_participant_that_vanishes_is_still_in_the_recovered_sum(tmp_path: Path):
    hub, run_id, contributors, updates = secagg_round(tmp_path, vanish=1)
    victim, others = contributors[0], contributors[1:]
    assert "unmask" not in victim.stages and all("unmask" in c.stages for c in others)
    # waiting for the victim's unmask shares: nothing is published yet
    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["version"] == 0 and status["rounds"][0]["status"] == "secagg"

    keep_alive_and_pass_liveness(hub, others)

    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["status"] == "finished" and status["version"] == 1
    (session,) = status["privacy"]["secagg_rounds"]
    assert (session["stage"], session["survivors"], session["dropped"]) == ("done", 4, 0)
    assert [c.poll(wait_s=0)["stage"] for c in contributors] == ["done"] * 4
    svc = hub.service
    assert {c.status for c in rows(svc, m.Contribution)} == {"accepted"}
    unmasked = {x.node_id for x in rows(svc, m.SecAggMessage, m.SecAggMessage.stage == "unmask")}
    assert victim.node_id not in unmasked and len(unmasked) == 3
    # the recovered aggregate is the token-weighted mean of all four updates, the victim's too
    (sess,) = rows(svc, m.SecAggSession)
    aggregate = unpack_vector(svc.blobs.get(sess.aggregate_blob))
    tokens = torch.tensor([float(c.meta.tokens) for c in contributors])
    expected = (tokens[:, None] * torch.stack(updates)).sum(0) / tokens.sum()
    assert float((aggregate - expected).abs().max()) < 1e-6
    assert [v.number for v in rows(svc, m.Version)] == [0, 1]
    assert assert_statuses_typed(svc.engine)["assignments"] == {"submitted"}


def test_more_than_t_vanished_after_masking_fail_the_round_cleanly(tmp_path: Path):
    hub, run_id, contributors, _ = secagg_round(tmp_path, vanish=2)
    woken: list[str] = []  # the runs whose waiting long-polls the hub wakes
    changed = hub.service.round_changed
    hub.service.round_changed = lambda run: woken.append(run) or changed(run)
    keep_alive_and_pass_liveness(hub, contributors[2:])
    assert woken == [run_id]  # the retrain starts now, not when the nodes' long-polls end

    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["status"] == "active" and status["version"] == 0
    (rnd,) = status["rounds"]
    assert rnd["status"] == "pending" and rnd["attempts"] == 2  # retrained with fresh keys
    (session,) = status["privacy"]["secagg_rounds"]
    assert session["stage"] == "failed" and session["failures"] == 1
    assert (
        "unmask stage" in session["last_failure"] and "max_dropouts = 1" in session["last_failure"]
    )
    svc = hub.service
    # nothing half-published: no version, no sum, no aggregate, no messages left, work discarded
    assert [v.number for v in rows(svc, m.Version)] == [0]
    (sess,) = rows(svc, m.SecAggSession)
    assert sess.sum_blob is None and sess.aggregate_blob is None
    assert rows(svc, m.SecAggMessage) == []
    assert {c.status for c in rows(svc, m.Contribution)} == {"discarded"}
    assert {a.status for a in rows(svc, m.Assignment)} == {"discarded"}
    assert_statuses_typed(svc.engine)
    for c in contributors[2:]:
        task = c.poll(wait_s=0)
        assert task["stage"] == "aborted" and "max_dropouts" in task["reason"]
    assert svc.trust.verify()["ok"]


def spy_on_the_lock(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bool], list[bool]]:
    """Record, for each SecAgg unmask (`secagg_unmask.unmask_sum`) and each aggregation of a
    close (`aggregate_round` as the ticker calls it), whether the hub's lock was held."""
    unmasked_under_lock: list[bool] = []
    aggregated_under_lock: list[bool] = []
    unmask_sum, aggregate_round = secagg_unmask.unmask_sum, hub_ticker.aggregate_round

    def unmasking(*args: Any, **kwargs: Any):
        unmasked_under_lock.append(hub.service.lock._is_owned())  # this thread holds it?
        return unmask_sum(*args, **kwargs)

    def aggregating(*args: Any, **kwargs: Any):
        aggregated_under_lock.append(hub.service.lock._is_owned())
        return aggregate_round(*args, **kwargs)

    monkeypatch.setattr(secagg_unmask, "unmask_sum", unmasking)
    monkeypatch.setattr(hub_ticker, "aggregate_round", aggregating)
    return unmasked_under_lock, aggregated_under_lock


def test_a_secagg_rounds_unmask_and_close_are_computed_outside_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    hub = Hub(tmp_path, HubSettings(liveness_s=LIVENESS_S))
    unmasked_under_lock, aggregated_under_lock = spy_on_the_lock(hub, monkeypatch)
    _, run_id, contributors, updates = secagg_round(hub, vanish=0)
    # the last unmask answer leaves the unmask to the ticker: no crypto in the request
    assert all("unmask" in c.stages for c in contributors)
    assert unmasked_under_lock == []
    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["version"] == 0 and status["rounds"][0]["status"] == "secagg"

    hub.service.ticker.tick()

    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["status"] == "finished" and status["version"] == 1
    # one unmask and one aggregation, both beside the requests, and the close took them
    assert unmasked_under_lock == [False] and aggregated_under_lock == [False]
    svc = hub.service
    (sess,) = rows(svc, m.SecAggSession)
    assert (sess.stage, sess.survivors, sess.dropped) == ("done", 4, 0)
    aggregate = unpack_vector(svc.blobs.get(sess.aggregate_blob))
    tokens = torch.tensor([float(c.meta.tokens) for c in contributors])
    expected = (tokens[:, None] * torch.stack(updates)).sum(0) / tokens.sum()
    assert float((aggregate - expected).abs().max()) < 1e-6


def test_a_prepared_unmask_that_no_longer_matches_is_computed_again_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The unmask is computed outside the lock from three answers; the fourth comes before the
    close takes it, so the close unmasks again, under the lock, from all four."""
    hub = Hub(tmp_path, HubSettings(liveness_s=LIVENESS_S))
    unmasked_under_lock, aggregated_under_lock = spy_on_the_lock(hub, monkeypatch)
    _, run_id, contributors, _ = secagg_round(hub, vanish=1)
    late, others = contributors[0], contributors[1:]
    ticker = hub.service.ticker
    prepare_unmask = ticker._prepare_unmask

    def a_late_answer_meanwhile(run: str, outcome: Any) -> None:
        prepare_unmask(run, outcome)
        task = late.poll(wait_s=0)
        assert task["stage"] == "unmask"
        late.answer(task)  # the request leaves the unmask to the ticker: still in secagg
        assert hub.get(f"{API}/runs/{run_id}").json()["rounds"][0]["status"] == "secagg"

    monkeypatch.setattr(ticker, "_prepare_unmask", a_late_answer_meanwhile)
    keep_alive_and_pass_liveness(hub, others)

    status = hub.get(f"{API}/runs/{run_id}").json()
    assert status["status"] == "finished" and status["version"] == 1
    assert unmasked_under_lock == [False, True]  # prepared from 3 answers, redone from 4
    # the same survivors give the same sum: the version computed from it outside the lock holds
    assert aggregated_under_lock == [False]
    svc = hub.service
    unmasked = {x.node_id for x in rows(svc, m.SecAggMessage, m.SecAggMessage.stage == "unmask")}
    assert unmasked == {c.node_id for c in contributors}
    (sess,) = rows(svc, m.SecAggSession)
    assert (sess.stage, sess.survivors, sess.dropped) == ("done", 4, 0)


# ------------------------------------------------------------------------- waking waiting nodes


def test_a_lost_nodes_place_wakes_the_nodes_waiting_for_work(tmp_path: Path):
    """A full round whose node goes silent gives its place up on the next tick; the nodes
    waiting for work are woken at once (`round_changed`), not when their long-polls end, and
    the place is taken."""
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    config = tiny_run(round={"deadline_s": 600, "quorum": 1, "min_nodes": 1, "max_nodes": 2})
    run_id = service.create_run(Identity.generate().public_key, config).run_id
    numel = service.run_status(run_id)["numel"]
    a, b, c = (
        service.membership.register(
            Identity.generate().public_key,
            RegisterRequest(probe_tokens_per_s=1e4, probe_numel=numel, name=name),
        )
        for name in "abc"
    )
    assert [service.asks.request_assignment(run_id, n).status for n in (a, b)] == ["assigned"] * 2
    assert service.asks.request_assignment(run_id, c).status == "wait"  # full
    woken: list[str] = []
    changed = service.round_changed
    service.round_changed = lambda run: woken.append(run) or changed(run)
    clock.advance(service.membership.liveness_s() + 1)  # a falls silent; b and c do not
    for node in (b, c):
        service.membership.heartbeat(node, NodeStatus.TRAINING if node == b else NodeStatus.IDLE)
    service.ticker.tick()
    (rnd,) = service.run_status(run_id)["rounds"]
    assert rnd["status"] == "open" and rnd["assignments"] == {"assigned": 1, "missed": 1}
    assert woken == [run_id]  # the round waits on (no close, no re-plan), but a place is free
    assert service.asks.request_assignment(run_id, c).status == "assigned"  # a's place


# ------------------------------------------------------------------------- DP budget


def dp_run(service: HubService, epsilon_budget: float, rounds: int) -> tuple[str, str]:
    """A DP run (z = 1, C = 0.5, delta = 1e-5) of at most `rounds` rounds, trained by one node
    through the service (an upload, then a tick, each clock second) until it hands out no more
    work; returns the run and the node."""
    dp = {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5}
    config = tiny_run(
        privacy={"dp": dp | {"epsilon_budget": epsilon_budget}},
        trust=NO_AUDITS,
        budget={"rounds": rounds},
    )
    run_id = service.create_run(Identity.generate().public_key, config).run_id
    numel = service.run_status(run_id)["numel"]
    node = service.membership.register(
        Identity.generate().public_key, RegisterRequest(probe_tokens_per_s=1e4, probe_numel=numel)
    )
    for i in range(2 * rounds):  # bounded
        answer = service.asks.request_assignment(run_id, node)
        if answer.status != "assigned":
            break
        upload(service, run_id, node, answer.assignment, fake_update(numel, i))
        service.clock.advance(1.0)
        service.ticker.tick()
    return run_id, node


def test_a_dp_run_reaching_its_epsilon_budget_finishes_with_the_reason(tmp_path: Path):
    service = new_service(tmp_path, FakeClock())
    run_id, node = dp_run(service, epsilon_budget=8.0, rounds=5)  # the budget allows two
    status = service.run_status(run_id)
    # eps(2 rounds) = 7.08 <= 8 < eps(3 rounds) = 9.01 at z = 1, q = 1, delta = 1e-5
    assert status["status"] == "finished" and status["version"] == 2
    assert "epsilon budget" in status["status_reason"] and "9.01" in status["status_reason"]
    p = status["privacy"]
    assert p["stop_reason"] == status["status_reason"]
    assert p["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 2, 1e-5)) and p["epsilon"] <= 8.0
    answer = service.asks.request_assignment(run_id, node)  # a finished run hands out no more work
    assert answer.status == "finished" and "epsilon budget" in answer.reason


def test_a_dp_runs_close_is_computed_outside_the_lock_and_accounted_once_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    service = new_service(tmp_path, FakeClock())
    aggregated_under_lock: list[bool] = []
    aggregate_round = hub_ticker.aggregate_round

    def spy(*args: Any, **kwargs: Any):
        aggregated_under_lock.append(service.lock._is_owned())  # this thread holds it?
        return aggregate_round(*args, **kwargs)

    monkeypatch.setattr(hub_ticker, "aggregate_round", spy)
    run_id, _ = dp_run(service, epsilon_budget=100.0, rounds=3)
    status = service.run_status(run_id)
    assert status["status"] == "finished" and status["version"] == 3
    assert aggregated_under_lock == [False] * 3  # one computation per close, none under the lock
    with service.sessions() as s:
        rows = s.execute(
            select(m.PrivacyRound.round, m.PrivacyRound.nodes).where(
                m.PrivacyRound.run_id == run_id
            )
        )
        assert sorted(rows) == [(0, 1), (1, 1), (2, 1)]  # the published rounds, one node each
    assert run_id in service.ticker._prepared  # the last close's version, computed unlocked
    service.ticker.tick()
    assert run_id not in service.ticker._prepared  # dropped once the run is no longer active
    assert status["privacy"]["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 3, 1e-5))
