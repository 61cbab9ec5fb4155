"""The facts a batch of uploads reads once (hub/upload_facts.py) answer as the one-by-one
queries did: the energy floor's fastest other node, per node, at each upload of a batch; the
replay check, with one replayed upload in a batch of fresh ones refused alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gridswarm.hub import models as m
from gridswarm.hub.errors import HubError
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.hub.trust import HubTrust
from gridswarm.hub.upload_facts import ENERGY_WINDOW, WINDOW_SLACK, EnergyWindow
from gridswarm.identity import Identity
from gridswarm.protocol import Assignment, ContributionMeta, Refusal, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack, unpack_vector
from gridswarm.trust.claims import sign_contribution
from tests.conftest import tiny_run
from tests.examples import examples
from tests.hub.test_batches import NOW_S


def hub(folder: Path) -> tuple[HubService, str, list[str]]:
    """Three nodes, a run whose rounds take them all and audit none (random updates)."""
    service = build_service(f"sqlite:///{folder / 'hub.db'}", folder / "blobs", HubSettings())
    service.clock = service.trust.clock = lambda: NOW_S
    run = tiny_run(
        round={"min_nodes": 3, "max_nodes": 3},
        trust={"newcomer_audits": 0, "audit_min_rate": 0.0, "audit_max_rate": 0.0},
    )
    run_id = service.create_run(b"\x01" * 32, run).run_id
    nodes = []
    for i in range(3):
        req = RegisterRequest(probe_tokens_per_s=5_000.0, probe_numel=100_000, name=f"n{i}")
        nodes.append(
            service.membership.register(Identity.from_seed(f"n{i}".encode()).public_key, req)
        )
    return service, run_id, nodes


def body(
    service: HubService, run_id: str, who: str, a: Assignment, update_seed: int, time_s: float
) -> bytes:
    """Node `who`'s upload for `a`: the update drawn from `update_seed` (the same seed, the
    same update), `time_s` of training (its tokens/s), its claim signed."""
    numel = unpack_vector(service.blobs.get(a.weights_blob)).numel()
    codec = make_codec(a.config["comm"]["codec"])
    update = torch.randn(numel, generator=torch.Generator().manual_seed(update_seed)) * 1e-3
    tensors = codec.encode(update)
    tokens_per_step = a.config["train"]["seq_len"] * a.config["train"]["batch_size"]
    meta = ContributionMeta(
        assignment_id=a.id,
        codec=codec.name,
        steps=a.inner_steps,
        tokens=a.inner_steps * tokens_per_step,
        loss_first=5.0,
        loss_last=4.0,
        loss_mean=4.5,
        train_time_s=time_s,
        threads=1,
    )
    claim = sign_contribution(
        Identity.from_seed(who.encode()), run_id, a.round, tensors, meta.model_dump()
    )
    return pack(tensors, meta.model_copy(update={"claim": claim}).model_dump())


def test_a_batch_refuses_its_one_replay_alone_and_judges_energy_as_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 0: three nodes' uploads at different speeds. Round 1, in one batch: n0 and n2
    upload fresh updates, n1 its round-0 update again (a replay): n1 alone is refused, typed;
    at every upload of the batch, the energy facts from the batch's window equal those of the
    node's own query at that moment (the batch's earlier uploads counted)."""
    service, run_id, nodes = hub(tmp_path)
    seen: list[tuple[str, object, object]] = []
    energy_facts = HubTrust.energy_facts

    def compared(s, run, node, window=None):
        mine = energy_facts(s, run, node, window)
        if window is not None:
            seen.append((node.id, mine, energy_facts(s, run, node)))
        return mine

    monkeypatch.setattr(service.trust, "energy_facts", compared)
    for round_number, seeds in ((0, [10, 11, 12]), (1, [20, 11, 22])):
        work = [a[0].assignment for a in service.asks.assignments_or_wait(run_id, nodes)]
        assert [a.round for a in work] == [round_number] * 3
        checked = [
            service.uploads.check_upload(
                run_id, node, body(service, run_id, f"n{i}", a, seeds[i], 1.0 + i + round_number)
            )
            for i, (node, a) in enumerate(zip(nodes, work, strict=True))
        ]
        answers = service.uploads.store_uploads(run_id, checked)
        if round_number == 0:
            assert all(a.accepted for a in answers)
            service.ticker.tick()
    first, replayed, third = answers
    assert first.accepted and third.accepted
    assert isinstance(replayed, HubError) and replayed.reason == Refusal.REPLAYED_UPDATE
    assert replayed.status == 409
    # energy: every upload of both batches, each node's facts as its own query's
    assert len(seen) == 6
    assert all(mine == own for _node, mine, own in seen)
    assert len({own.fastest_tokens_per_s for _n, _m, own in seen}) > 1  # they differ
    with service.sessions() as s:
        stored = s.scalars(
            select(m.Contribution.node_id).where(
                m.Contribution.run_id == run_id, m.Contribution.round == 1
            )
        ).all()
    assert sorted(stored) == sorted([nodes[0], nodes[2]])
    assert service.trust.verify()["ok"]


def brute_fastest(history: list[tuple[float, str, float | None]], node: str) -> float | None:
    """The one-by-one query: newest ENERGY_WINDOW rows of other nodes, the fastest."""
    others = [r for r in sorted(history, key=lambda r: -r[0]) if r[1] != node][:ENERGY_WINDOW]
    return max((speed for _at, _n, speed in others if speed is not None), default=None)


@settings(deadline=None, max_examples=examples(60))
@given(
    rows=st.integers(0, 2 * (ENERGY_WINDOW + WINDOW_SLACK)),
    nodes=st.integers(1, 5),
    added=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_the_window_answers_as_the_query_or_says_it_cannot(
    rows: int, nodes: int, added: int, seed: int
) -> None:
    """Over any history of a run's contributions (a few nodes, some with no positive train
    time), the window read once and kept current with the rows added after it answers each
    node as the one-by-one query over the whole history, or says it cannot tell."""
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(nodes)]

    def row(at: float) -> tuple[float, str, float | None]:
        return (at, rng.choice(names), rng.choice([None, rng.uniform(1.0, 100.0)]))

    history = [row(float(i)) for i in range(rows)]
    newest = sorted(history, key=lambda r: -r[0])[: ENERGY_WINDOW + WINDOW_SLACK]
    window = EnergyWindow(list(newest), complete=len(newest) < ENERGY_WINDOW + WINDOW_SLACK)
    for k in range(added):
        at, node, speed = row(rows + k + rng.choice([0.0, -0.5 - rows]))  # newest, or old
        history.append((at, node, speed))
        c = m.Contribution(created_at=at, node_id=node, tokens=speed or 0.0, train_time_s=1.0)
        if speed is None:
            c.train_time_s = 0.0
        window.add(c)
        for name in names:
            known, fastest = window.fastest_other(name)
            if known:
                assert fastest == brute_fastest(history, name)
    for name in names:  # it can tell for every node with ENERGY_WINDOW others in it
        others = sum(1 for r in window.rows if r[1] != name)
        assert window.fastest_other(name)[0] == (window.complete or others >= ENERGY_WINDOW)
