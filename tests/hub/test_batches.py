"""Requests decided in batches (`RunBatcher`): asks for work (`Asks.assignments_or_wait`)
answer exactly as the same asks one by one would; uploads (`Uploads.store_uploads`) are
stored or refused each as alone, a refusal (even one that commits a strike) or a failure stays
with its request; the HTTP layer gathers the requests that arrive while a decision runs."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gridswarm.hub import models as m
from gridswarm.hub.app import MAX_ASK_BATCH, RunBatcher
from gridswarm.hub.errors import HubError
from gridswarm.hub.membership import Registration
from gridswarm.hub.registration import RegistrationPolicy
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.hub.states import AssignmentStatus
from gridswarm.identity import Identity
from gridswarm.protocol import (
    Assignment,
    AssignmentResponse,
    ContributionMeta,
    Refusal,
    RegisterRequest,
)
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack, unpack_vector
from gridswarm.trust.claims import sign_contribution
from tests.conftest import tiny_run
from tests.examples import examples

NOW_S = 1_000_000.0


def hub(folder: Path, speeds: list[float], round_: dict) -> tuple[HubService, str, list[str]]:
    service = build_service(f"sqlite:///{folder / 'hub.db'}", folder / "blobs", HubSettings())
    service.clock = service.trust.clock = lambda: NOW_S
    run_id = service.create_run(b"\x01" * 32, tiny_run(round=round_)).run_id
    nodes = []
    for i, speed in enumerate(speeds):
        req = RegisterRequest(probe_tokens_per_s=speed, probe_numel=100_000, name=f"n{i}")
        nodes.append(
            service.membership.register(Identity.from_seed(f"n{i}".encode()).public_key, req)
        )
    return service, run_id, nodes


def outcome(answer: object) -> tuple:
    """What must agree between a batch and one-by-one: status, planned steps, recheck, refusal."""
    if isinstance(answer, HubError):
        return ("refused", answer.status)
    response, recheck_s = answer
    steps = response.assignment.inner_steps if response.assignment else None
    return (response.status, steps, response.retry_after_s, recheck_s)


def rows(service: HubService, run_id: str) -> list[tuple]:
    with service.sessions() as s:
        return sorted(
            (a.node_id, a.round, a.status, a.inner_steps)
            for a in s.query(m.Assignment).filter_by(run_id=run_id)
        )


@settings(deadline=None, max_examples=examples(15))
@given(
    speeds=st.lists(st.sampled_from([500.0, 5_000.0, 50_000.0]), min_size=1, max_size=7),
    max_nodes=st.integers(1, 6),
    min_nodes=st.integers(1, 6),
    order=st.randoms(use_true_random=False),
    extra=st.sampled_from(["none", "twice", "stranger"]),
)
def test_a_batch_answers_as_the_same_asks_one_by_one(
    speeds: list[float], max_nodes: int, min_nodes: int, order, extra: str
) -> None:
    round_ = {"min_nodes": min(min_nodes, max_nodes), "max_nodes": max_nodes, "deadline_s": 60}
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as batch:
        alone, run_a, nodes = hub(Path(one), speeds, round_)
        together, run_b, same = hub(Path(batch), speeds, round_)
        assert nodes == same  # the same keys: the same node ids
        asks = list(nodes)
        order.shuffle(asks)
        if extra == "twice":
            asks.append(asks[0])  # one node's two long-polls in one batch: one answer
        elif extra == "stranger":
            asks.insert(len(asks) // 2, "f" * 64)  # not registered: refused in its place
        one_by_one = []
        for node_id in asks:
            try:
                one_by_one.append(alone.asks.assignment_or_wait(run_a, node_id))
            except HubError as refusal:
                one_by_one.append(refusal)
        batched = together.asks.assignments_or_wait(run_b, asks)
        assert [outcome(a) for a in batched] == [outcome(a) for a in one_by_one]
        assert rows(together, run_b) == rows(alone, run_a)
        given = {
            a[0].assignment.id for a in batched if not isinstance(a, HubError) and a[0].assignment
        }
        assert len(given) == len(rows(together, run_b)) <= max_nodes  # one place per assignment


def test_an_ask_that_fails_fails_alone_and_the_others_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, run_id, nodes = hub(tmp_path, [5_000.0] * 3, {"min_nodes": 1, "max_nodes": 3})
    decide = service.asks._decide_ask

    def broken_for_n1(s, run, rnd, seats, node, cutoff, now):
        if node.id == nodes[1]:
            raise RuntimeError("a bug in one node's decision")
        return decide(s, run, rnd, seats, node, cutoff, now)

    monkeypatch.setattr(service.asks, "_decide_ask", broken_for_n1)
    first, failed, third = service.asks.assignments_or_wait(run_id, nodes)
    assert isinstance(failed, HubError) and failed.status == 500
    assert first[0].status == third[0].status == "assigned"
    assert {r[0] for r in rows(service, run_id)} == {nodes[0], nodes[2]}


def test_a_full_round_is_full_within_one_batch(tmp_path: Path) -> None:
    service, run_id, nodes = hub(tmp_path, [5_000.0] * 5, {"min_nodes": 2, "max_nodes": 3})
    answers = service.asks.assignments_or_wait(run_id, nodes)
    assert [a[0].status for a in answers] == ["assigned"] * 3 + ["wait"] * 2
    assert len({a[0].assignment.deadline_at for a in answers[:3]}) == 1  # one opening
    assert len(rows(service, run_id)) == 3


def test_the_batcher_decides_a_quiet_ask_at_once_and_gathers_the_asks_of_a_busy_run() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def decide(run_id: str, node_ids: list[str]) -> list:
        calls.append(list(node_ids))
        if len(calls) == 1:
            await release.wait()  # the first decision runs while the others arrive
        if run_id == "gone":
            raise HubError(404, "run gone not found")
        return [(AssignmentResponse(status="wait", retry_after_s=1.0), None) for _ in node_ids]

    async def settle() -> None:  # let the tasks started so far run up to their next wait
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario() -> None:
        batcher = RunBatcher(decide, MAX_ASK_BATCH)
        first = asyncio.create_task(batcher.ask("r", "n0"))
        await settle()
        assert calls == [["n0"]]  # alone and at once: no ask waits for company
        later = [
            asyncio.create_task(batcher.ask("r", f"n{i}")) for i in range(1, MAX_ASK_BATCH + 3)
        ]
        left = later.pop(3)
        await settle()
        left.cancel()  # its client went away: not decided
        release.set()
        for answer in await asyncio.gather(first, *later):
            assert answer[0].status == "wait"
        sizes = [len(c) for c in calls]  # the queued asks in batches of at most MAX_ASK_BATCH
        assert sizes[0] == 1 and len(sizes) == 3 and max(sizes) <= MAX_ASK_BATCH
        assert sum(sizes[1:]) == MAX_ASK_BATCH + 1  # all of them, less the one that left
        assert "n4" not in calls[1] + calls[2]
        with pytest.raises(HubError) as refused:
            await batcher.ask("gone", "n0")
        assert refused.value.status == 404

    asyncio.run(scenario())


def upload_body(
    service: HubService, run_id: str, seed: str, a: Assignment, extra_tokens: int = 0
) -> bytes:
    """What node `seed` uploads for `a`: a small random update through the run's codec, its
    claim signed; `extra_tokens` makes the work claim false."""
    numel = unpack_vector(service.blobs.get(a.weights_blob)).numel()
    codec = make_codec(a.config["comm"]["codec"])
    update = (
        torch.randn(
            numel, generator=torch.Generator().manual_seed(int.from_bytes(seed.encode(), "big"))
        )
        * 1e-3
    )
    tensors = codec.encode(update)
    tokens_per_step = a.config["train"]["seq_len"] * a.config["train"]["batch_size"]
    meta = ContributionMeta(
        assignment_id=a.id,
        codec=codec.name,
        steps=a.inner_steps,
        tokens=a.inner_steps * tokens_per_step + extra_tokens,
        loss_first=5.0,
        loss_last=4.0,
        loss_mean=4.5,
        train_time_s=1.0,
        threads=1,
    )
    claim = sign_contribution(
        Identity.from_seed(seed.encode()), run_id, a.round, tensors, meta.model_dump()
    )
    return pack(tensors, meta.model_copy(update={"claim": claim}).model_dump())


def test_a_batch_of_uploads_stores_each_as_alone_and_refuses_in_place(tmp_path: Path) -> None:
    service, run_id, nodes = hub(tmp_path, [5_000.0] * 4, {"min_nodes": 1, "max_nodes": 4})
    work = [a[0].assignment for a in service.asks.assignments_or_wait(run_id, nodes)]
    bodies = [
        upload_body(service, run_id, "n0", work[0]),
        upload_body(service, run_id, "n1", work[1], extra_tokens=1),  # false claim: a strike
        upload_body(service, run_id, "n2", work[2]),
        upload_body(service, run_id, "n3", work[2]),  # another node's assignment
    ]
    senders = [nodes[0], nodes[1], nodes[2], nodes[3], nodes[0]]
    checked = [
        service.uploads.check_upload(run_id, sender, body)
        for sender, body in zip(senders, [*bodies, bodies[0]], strict=True)  # n0's twice
    ]
    answers = service.uploads.store_uploads(run_id, checked)
    assert [a.status if isinstance(a, HubError) else "ack" for a in answers] == [
        "ack",
        400,
        "ack",
        403,
        409,
    ]
    assert answers[1].reason == "false_claim" and answers[4].reason == "duplicate"
    with service.sessions() as s:
        stored = set(s.scalars(select(m.Contribution.id).where(m.Contribution.run_id == run_id)))
    assert stored == {checked[0].digest, checked[2].digest}
    assert service.blobs.has(checked[0].digest) and service.blobs.has(checked[2].digest)
    assert not service.blobs.has(checked[1].digest) and not service.blobs.has(checked[3].digest)
    verdicts = [e.payload for e in service.trust.ledger.entries() if e.kind == "verdict"]
    assert [(v["node"], v["accepted"]) for v in verdicts] == [(nodes[1], False)]  # committed
    assert service.trust.verify()["ok"]


def test_an_upload_that_fails_fails_alone_and_the_others_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, run_id, nodes = hub(tmp_path, [5_000.0] * 3, {"min_nodes": 1, "max_nodes": 3})
    work = [a[0].assignment for a in service.asks.assignments_or_wait(run_id, nodes)]
    checked = [
        service.uploads.check_upload(run_id, node, upload_body(service, run_id, f"n{i}", a))
        for i, (node, a) in enumerate(zip(nodes, work, strict=True))
    ]
    store = service.uploads._store_contribution

    def broken_for_n1(s, run_id, upload, facts):
        if upload.node_id == nodes[1]:
            raise RuntimeError("a bug in one upload's decision")
        return store(s, run_id, upload, facts)

    monkeypatch.setattr(service.uploads, "_store_contribution", broken_for_n1)
    first, failed, third = service.uploads.store_uploads(run_id, checked)
    assert isinstance(failed, HubError) and failed.status == 500
    assert first.accepted and third.accepted
    with service.sessions() as s:
        stored = set(s.scalars(select(m.Contribution.id).where(m.Contribution.run_id == run_id)))
    assert stored == {checked[0].digest, checked[2].digest}
    assert not service.blobs.has(checked[1].digest)  # the failed upload's blob is gone


def registration(name: str) -> Registration:
    req = RegisterRequest(probe_tokens_per_s=5_000.0, probe_numel=100_000, name=name)
    return Registration(Identity.from_seed(name.encode()).public_key, req, "10.0.0.7")


def test_a_batch_of_registrations_refuses_in_place_and_releases_work_of_nodes_back(
    tmp_path: Path,
) -> None:
    """One transaction for the batch: each answer as alone. A new key over the bound on new
    identities is refused in its place and leaves no row; a key registered again (its process
    restarted) keeps its id and its outstanding assignment is released at once; the same key
    twice in one batch is one node."""
    service, run_id, nodes = hub(tmp_path, [5_000.0] * 2, {"min_nodes": 1, "max_nodes": 2})
    service.membership.registration.policy = RegistrationPolicy(
        max_new_nodes=3
    )  # n0, n1 never worked
    work = service.asks.assignments_or_wait(run_id, nodes[:1])
    assert work[0][0].status == "assigned"
    answers = service.membership.register_many(
        [registration("n0"), registration("new-a"), registration("new-a"), registration("new-b")]
    )
    again, new_a, new_a_twice, refused = answers
    assert again == nodes[0] and new_a == new_a_twice
    assert isinstance(refused, HubError) and refused.reason == Refusal.REGISTRATION_LIMITED
    with service.sessions() as s:
        stored = set(s.scalars(select(m.Node.id)))
        statuses = {a.node_id: a.status for a in s.scalars(select(m.Assignment))}
    assert stored == {*nodes, new_a}  # the refused key left nothing
    assert statuses == {nodes[0]: AssignmentStatus.RELEASED}


def test_a_registration_that_fails_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _, _ = hub(tmp_path, [], {"min_nodes": 1, "max_nodes": 2})
    check = service.membership.registration.check

    def broken_for_b(s, public_key_hex, network, known, now_s):
        if public_key_hex == Identity.from_seed(b"b").public_key.hex():
            raise RuntimeError("a bug in one registration's decision")
        return check(s, public_key_hex, network, known, now_s)

    monkeypatch.setattr(service.membership.registration, "check", broken_for_b)
    a, b, c = service.membership.register_many([registration(x) for x in "abc"])
    assert isinstance(b, HubError) and b.status == 500
    with service.sessions() as s:
        assert set(s.scalars(select(m.Node.id))) == {a, c}


def test_the_batcher_gathers_registrations_that_arrive_together(tmp_path: Path) -> None:
    """Through the real app: 40 registrations sent at once are decided in fewer commits than
    there are registrations, and every node gets its id."""
    from fastapi.testclient import TestClient

    from gridswarm.hub.app import create_app
    from gridswarm.identity import sign_request

    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs", HubSettings())
    batches: list[int] = []
    register_many = service.membership.register_many

    def counted(batch):
        batches.append(len(batch))
        return register_many(batch)

    service.membership.register_many = counted
    app = create_app(service)
    ids = [Identity.from_seed(f"k{i}".encode()) for i in range(40)]

    async def all_at_once() -> list:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:

            async def one(who: Identity):
                body = RegisterRequest(probe_tokens_per_s=1e4, probe_numel=1000).model_dump_json()
                path = "/v1/nodes/register"
                headers = sign_request(who, "POST", path, body.encode())
                return await client.post(path, content=body, headers=headers)

            return await asyncio.gather(*(one(who) for who in ids))

    with TestClient(app):  # the app's lifespan (its thread limits)
        responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 40
    assert {r.json()["node_id"] for r in responses} == {who.node_id for who in ids}
    assert sum(batches) == 40 and len(batches) < 40
