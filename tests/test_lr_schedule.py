"""The inner learning-rate schedule over a run (`train.lr_schedule`, train/schedule.py):

- the schedule function: within [min_lr_ratio * lr, lr] after the warm-up, never rising after
  it, exactly the old warm-up-then-constant lr for "constant";
- its settings are validated (bounds, finite, a round budget for "cosine"), and the hub refuses a
  bad one with a typed 422 and creates nothing;
- a cosine run in process (the real hub service, fake clock, real training): every contribution
  is replay-audited bit-exactly by the hub, and a node that ignores the schedule fails its audit.
"""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from gridswarm.config import ConfigError, TrainConfig, parse_run_config
from gridswarm.hub import models as m
from gridswarm.hub.errors import HubError
from gridswarm.identity import Identity
from gridswarm.protocol import Refusal, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.schedule import (
    RunPosition,
    cosine_factor,
    inner_lr_at,
    position_of,
    schedule_total_steps,
)
from gridswarm.train.streaming import LocalState, Progress
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run
from tests.harness import FakeClock, new_service, train_and_pack

lrs = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)
ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
warmups = st.integers(min_value=0, max_value=50)


def train_cfg(lr: float, warmup: int, schedule: str = "cosine", ratio: float = 0.1) -> TrainConfig:
    return TrainConfig(
        inner_lr=lr, inner_warmup_steps=warmup, lr_schedule=schedule, min_lr_ratio=ratio
    )


# ----------------------------------------------------------------------------- the function


@given(
    lr=lrs,
    warmup=warmups,
    ratio=ratios,
    total=st.integers(min_value=1, max_value=10**6),
    data=st.data(),
)
def test_cosine_lr_stays_in_bounds_and_never_rises_after_the_warm_up(
    lr: float, warmup: int, ratio: float, total: int, data: st.DataObject
):
    cfg = train_cfg(lr, warmup, ratio=ratio)
    steps = sorted(data.draw(st.lists(st.integers(0, total + 10), min_size=2, max_size=20)))
    after = [s for s in steps if s >= warmup]  # optimizer step = run step: one kept optimizer
    values = [inner_lr_at(cfg, s, RunPosition(s, total)) for s in after]
    for value in values:
        assert ratio * lr <= value <= lr
    assert all(b <= a for a, b in pairwise(values))
    for s in steps:  # the warm-up only lowers it
        assert 0 <= inner_lr_at(cfg, s, RunPosition(s, total)) <= lr


@given(lr=lrs, warmup=warmups, step=st.integers(0, 10**6), total=st.integers(1, 10**6))
def test_constant_is_the_old_warm_up_then_constant_lr_bit_for_bit(
    lr: float, warmup: int, step: int, total: int
):
    cfg = train_cfg(lr, warmup, schedule="constant")
    old = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    assert inner_lr_at(cfg, step, RunPosition(min(step, total), total)) == old
    assert inner_lr_at(cfg, step, None) == old  # needs no position


@given(step=st.integers(0, 10**6), total=st.integers(1, 10**6), ratio=ratios)
def test_cosine_factor_is_the_textbook_cosine(step: int, total: int, ratio: float):
    want = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    assert cosine_factor(step, total, ratio) == pytest.approx(want, abs=1e-13)


def test_cosine_ends_and_stays_at_the_floor_and_needs_a_position():
    assert cosine_factor(0, 10, 0.1) == 1.0
    assert cosine_factor(5, 10, 0.1) == pytest.approx(0.55, abs=1e-15)
    assert cosine_factor(10, 10, 0.1) == cosine_factor(99, 10, 0.1) == 0.1
    assert cosine_factor(10, 10, 0.0) == 0.0
    with pytest.raises(ValueError, match="place in the run"):
        inner_lr_at(train_cfg(1e-3, 0), 0, None)
    with pytest.raises(ValueError):
        RunPosition(-1, 10)
    with pytest.raises(ValueError):
        RunPosition(0, 0)


def test_position_is_round_times_inner_steps_plus_the_steps_done():
    cfg = parse_run_config(tiny_run(train__lr_schedule="cosine", budget={"rounds": 6}))
    assert schedule_total_steps(cfg) == 6 * 20
    assert position_of(cfg, 3, 4) == RunPosition(3 * 20 + 4, 120)
    tokens_only = parse_run_config(tiny_run(budget={"rounds": None, "tokens": 10**6}))
    assert position_of(tokens_only, 3) is None


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "train, why",
    [
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"lr_schedule": "cosine", "min_lr_ratio": float("nan")}, "min_lr_ratio"),
        ({"lr_schedule": "cosine", "min_lr_ratio": float("inf")}, "min_lr_ratio"),
        ({"lr_schedule": "cosine", "min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"lr_schedule": "cosine", "min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"min_lr_ratio": "a lot"}, "min_lr_ratio"),
    ],
)
def test_bad_schedule_settings_are_refused_by_name(train: dict, why: str):
    with pytest.raises(ConfigError, match=why):
        parse_run_config(tiny_run(train={"seq_len": 32, "batch_size": 8, **train}))


def test_cosine_without_a_round_budget_is_a_typed_422_that_creates_nothing(tmp_path: Path):
    config = tiny_run(train__lr_schedule="cosine", budget={"rounds": None, "tokens": 10**6})
    with pytest.raises(ConfigError, match=r"needs budget\.rounds"):
        parse_run_config(config)
    service = new_service(tmp_path, FakeClock())
    sponsor = Identity.generate().public_key
    with pytest.raises(HubError) as refused:
        service.create_run(sponsor, config)
    assert refused.value.status == 422 and refused.value.reason == Refusal.INVALID_CONFIG
    with service.sessions() as s:
        assert s.scalars(select(m.Run)).all() == []
    constant = tiny_run(budget={"rounds": None, "tokens": 10**6})  # constant needs no total
    assert service.create_run(sponsor, constant).run_id


# ----------------------------------------------------------------------------- in process

COSINE_RUN = tiny_run(
    train={
        "seq_len": 32,
        "batch_size": 8,
        "inner_steps": 12,
        "min_inner_steps": 2,
        "lr_schedule": "cosine",
        "min_lr_ratio": 0.0,
    },
    round={"deadline_s": 60, "quorum": 2, "min_nodes": 2},
    budget={"rounds": 5},
    trust={"audit_min_rate": 1.0, "audit_max_rate": 1.0},  # every contribution replayed
)


def test_a_cosine_run_replays_bit_exactly_and_ignoring_the_schedule_fails_the_audit(
    tmp_path: Path,
):
    """Two honest nodes train with the run's cosine schedule (at different speeds: the slower
    one is planned fewer steps); a third trains the same assignments at a constant lr. The hub
    replays every contribution: the honest ones match to the bit, the constant one does not."""
    torch.set_num_threads(1)
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    run_id = service.create_run(Identity.generate().public_key, COSINE_RUN).run_id
    cfg = parse_run_config(service.run_status(run_id)["config"])
    honest = Workload.from_config(cfg)
    constant = Workload.from_config(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr_schedule": "constant"})})
    )
    codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
    nodes = []
    for i, (speed, workload) in enumerate([(4000.0, honest), (2000.0, honest), (4000.0, constant)]):
        who = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=speed, probe_numel=honest.numel, name=f"n{i}")
        nodes.append((who, service.membership.register(who.public_key, request), speed, workload))
    excluded: set[str] = set()
    for _ in range(200):
        if service.run_status(run_id)["status"] != "active":
            break
        for who, node_id, speed, workload in nodes:
            try:
                answer = service.asks.request_assignment(run_id, node_id)
            except HubError as exc:  # caught by an audit: reputation 0, no more work
                assert workload is constant and exc.reason == Refusal.EXCLUDED
                excluded.add(node_id)
                continue
            if answer.status == "assigned":
                body = train_and_pack(
                    service, run_id, who, node_id, answer.assignment, workload, codec, speed
                )
                service.uploads.submit(run_id, node_id, body)
        clock.advance(1.0)
        service.ticker.tick()
    status = service.run_status(run_id)
    assert status["status"] == "finished" and status["version"] == 5
    with service.sessions() as s:
        contributions = list(s.scalars(select(m.Contribution)))
        assignments = {a.id: a for a in s.scalars(select(m.Assignment))}
    by_node: dict[str, list] = {}
    for c in contributions:
        by_node.setdefault(c.node_id, []).append(c)
    fast, slow, off_schedule = (n[1] for n in nodes)
    for node_id in (fast, slow):
        mine = by_node[node_id]
        assert {c.round for c in mine} == set(range(5))  # every round, the last lr ~ 0 included
        assert all(c.audited and c.audit_passed and c.status == "accepted" for c in mine)
    assert max(assignments[c.assignment_id].inner_steps for c in by_node[slow]) < 12
    caught = by_node[off_schedule][0]
    assert caught.audited and caught.audit_passed is False and caught.status == "rejected"
    assert excluded == {off_schedule}


def test_kept_state_training_in_parts_continues_the_schedule():
    """Streaming DiLoCo / a kept optimizer: steps trained ahead and the rest of the round are
    one stretch of the schedule (position = round * H + the steps `progress` holds)."""
    torch.set_num_threads(1)
    cfg = parse_run_config(tiny_run(train__lr_schedule="cosine", train__keep_inner_optimizer=True))
    workloads = [Workload.from_config(cfg) for _ in range(3)]
    theta = workloads[0].initial_theta()
    states = [LocalState(w, theta, 0) for w in workloads]
    whole, parts, restarted = Progress(), Progress(), Progress()
    states[0].train(workloads[0].batches(5), 6, whole, 2)
    stream = workloads[1].batches(5)
    states[1].train(stream, 2, parts, 2)
    states[1].train(stream, 4, parts, 2)
    stream = workloads[2].batches(5)
    states[2].train(stream, 2, restarted, 2)
    states[2].train(stream, 4, Progress(), 2)  # forgets the 2 steps done: the wrong lrs
    assert whole.losses == parts.losses
    assert torch.equal(states[0].theta(), states[1].theta())
    assert not torch.equal(states[0].theta(), states[2].theta())
