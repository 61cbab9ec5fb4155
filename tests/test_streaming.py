"""Streaming DiLoCo (comm.fragments, comm.overlap) and a kept inner optimizer
(train.keep_inner_optimizer, the same node path with one fragment): the fragment split, the outer
step on a slice, config refusals, an in-process run on the real hub service with nodes keeping
local state, and live swarms of real node processes (training ahead while they upload; keeping
their AdamW across rounds)."""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.config import ConfigError, RunConfig, parse_run_config
from gridswarm.energy.meter import EnergyReading
from gridswarm.hub.errors import HubError
from gridswarm.identity import Identity
from gridswarm.node.agent import delta_fragment
from gridswarm.node.client import HubClient
from gridswarm.node.energy import EnergyUse, combine_energy, scale_energy
from gridswarm.protocol import ContributionMeta, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.data import slice_seed
from gridswarm.train.fragments import fragment_bounds, fragment_of_round
from gridswarm.train.outer import outer_update
from gridswarm.train.params import BlobFormatError, pack, unpack, unpack_vector
from gridswarm.train.streaming import LocalState, Progress
from gridswarm.train.workload import Workload
from gridswarm.trust.claims import sign_contribution
from gridswarm.trust.policy import audit_skip_reason
from tests.conftest import tiny_run, wait_for
from tests.examples import examples
from tests.harness import FakeClock, new_service
from tests.test_swarm import finished, start

# ----------------------------------------------------------------------------- fragments


@settings(max_examples=examples(200), deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=40),
    fragments=st.integers(min_value=1, max_value=64),
)
def test_fragments_cover_the_vector_in_order_aligned_and_non_empty(sizes, fragments):
    if sum(sizes) == 0:
        with pytest.raises(ValueError):
            fragment_bounds(sizes, fragments)
        return
    bounds = fragment_bounds(sizes, fragments)
    non_empty = sum(1 for n in sizes if n)
    assert len(bounds) == min(fragments, non_empty)
    assert bounds[0][0] == 0 and bounds[-1][1] == sum(sizes)
    assert all(end > start for start, end in bounds)  # none empty
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous
    edges = {0}
    for n in sizes:
        edges.add(max(edges) + n)
    assert all(start in edges and end in edges for start, end in bounds)  # tensor-aligned


def test_fragments_are_balanced_on_equal_tensors():
    assert fragment_bounds([10] * 8, 4) == [(0, 20), (20, 40), (40, 60), (60, 80)]
    assert fragment_bounds([10] * 8, 1) == [(0, 80)]
    assert fragment_bounds([5], 4) == [(0, 5)]  # never an empty fragment


def test_fragment_of_round_cycles():
    assert [fragment_of_round(r, 3) for r in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        fragment_of_round(-1, 3)


# ----------------------------------------------------------------------------- outer step


def test_outer_update_on_a_slice_is_the_full_update_restricted_to_it():
    gen = torch.Generator().manual_seed(0)
    theta, grad = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    momentum, residual = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    start, end = 300, 700
    kw = {"lr": 0.7, "mu": 0.9, "codec_down": "fp32", "block_size": 256}
    full = outer_update(theta, grad, momentum, residual, **kw)
    part = outer_update(theta, grad[start:end], momentum, residual, fragment=(start, end), **kw)
    inside = slice(start, end)
    assert torch.equal(part.theta[inside], full.theta[inside])
    assert torch.equal(part.momentum[inside], full.momentum[inside])
    for name, before in (("theta", theta), ("momentum", momentum), ("residual", residual)):
        after = getattr(part, name)
        assert torch.equal(after[:start], before[:start]), name  # the rest untouched
        assert torch.equal(after[end:], before[end:]), name
    assert make_codec("fp32").decode(part.delta, end - start).numel() == end - start
    # with a lossy down codec the slice is exactly the update of the sliced vectors
    kw["codec_down"] = "int8"
    lossy = outer_update(theta, grad[inside], momentum, residual, fragment=(start, end), **kw)
    alone = outer_update(theta[inside], grad[inside], momentum[inside], residual[inside], **kw)
    assert torch.equal(lossy.theta[inside], alone.theta)
    assert torch.equal(lossy.residual[inside], alone.residual)
    # no momentum yet: zeros outside the slice, the first step inside
    first = outer_update(theta, grad[inside], None, None, fragment=(start, end), **kw)
    assert not first.momentum[:start].any() and torch.equal(first.momentum[inside], grad[inside])
    with pytest.raises(ValueError):
        outer_update(theta, grad[:10], None, None, fragment=(start, end), **kw)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"privacy": {"dp": True}}, "privacy"),
        ({"privacy": {"secagg": True}, "round": {"quorum": 2, "min_nodes": 2}}, "privacy"),
        ({"data": {"data": "local"}}, "local"),
        ({"comm__error_feedback": True}, "error_feedback"),
    ],
)
def test_streaming_refuses_what_it_cannot_honour(extra, words):
    for comm in ({"fragments": 2}, {"overlap": True}):
        cfg = tiny_run(**extra)
        cfg["comm"] = {**cfg.get("comm", {}), **comm}
        with pytest.raises(ConfigError, match=words):
            parse_run_config(cfg)


def test_kept_inner_optimizer_keeps_node_state_and_is_refused_like_streaming():
    cfg = parse_run_config(tiny_run(train__keep_inner_optimizer=True))
    assert cfg.keeps_node_state and not cfg.comm.streaming and not RunConfig().keeps_node_state
    assert "kept inner optimizer" in (audit_skip_reason(cfg) or "")
    with pytest.raises(ConfigError, match=r"error_feedback cannot run with train\.keep"):
        parse_run_config(tiny_run(train__keep_inner_optimizer=True, comm__error_feedback=True))
    with pytest.raises(ConfigError, match="keep_inner_optimizer"):
        parse_run_config(tiny_run(train__keep_inner_optimizer="sometimes"))


def test_streaming_settings_are_bounded():
    for comm in ({"fragments": 0}, {"fragments": 65}, {"overlap_mix": 1.0}, {"overlap_mix": -0.1}):
        with pytest.raises(ConfigError, match="comm"):
            parse_run_config(tiny_run(comm=comm))
    cfg = parse_run_config(tiny_run(comm={"fragments": 4, "overlap": True}))
    assert cfg.comm.streaming and not RunConfig().comm.streaming
    assert "streaming" in (audit_skip_reason(cfg) or "")
    assert audit_skip_reason(RunConfig()) is None


def test_delta_fragment_is_checked():
    assert delta_fragment({}, 10) is None
    assert delta_fragment({"fragment": [2, 5]}, 10) == (2, 5)
    for bad in ([5, 2], [0, 11], [0], "0:5", [0.0, 5], [True, 5], [-1, 5]):
        with pytest.raises(BlobFormatError):
            delta_fragment({"fragment": bad}, 10)


def test_energy_of_two_parts_adds_up():
    def use(wh: float, s: float, g: float) -> EnergyUse:
        return EnergyUse(
            EnergyReading(wh, wh * 3600 / s, s, "model", "x", {"model": wh}), "r", g, 0.0
        )

    both = combine_energy(use(1.0, 10.0, 100.0), use(3.0, 30.0, 200.0))
    assert both.reading.energy_wh == 4.0 and both.reading.duration_s == 40.0
    assert both.reading.power_w == pytest.approx(360.0)
    assert both.intensity_g_per_kwh == pytest.approx(175.0)
    assert both.reading.parts_wh == {"model": 4.0}
    half = scale_energy(both, 0.5)
    assert half.reading.energy_wh == 2.0 and half.reading.duration_s == 20.0
    assert half.reading.power_w == both.reading.power_w
    with pytest.raises(ValueError):
        scale_energy(both, 0.0)


def test_local_state_merges_only_the_synced_fragment():
    torch.set_num_threads(1)
    cfg = parse_run_config(tiny_run(comm={"fragments": 2}))
    workload = Workload.from_config(cfg)
    assert Workload.from_config(parse_run_config(tiny_run())).fragment(3) is None
    (a0, a1), (b0, b1) = workload.fragments
    assert workload.fragment(0) == (a0, a1) and workload.fragment(3) == (b0, b1)
    theta = workload.initial_theta()
    state = LocalState(workload, theta, 0)
    progress = Progress()
    state.train(workload.batches(1), 3, progress, 0)
    assert progress.steps == 3 and progress.tokens == 3 * cfg.tokens_per_step
    assert state.steps_taken == 3
    trained = state.theta()
    update = state.pseudo_gradient(theta, (b0, b1))
    assert torch.equal(update, theta[b0:b1] - trained[b0:b1])
    published = theta + 1.0
    state.merge(published, (a0, a1), 0.0, 1)
    merged = state.theta()
    assert torch.equal(merged[a0:a1], published[a0:a1])  # mix 0: the synced fragment copied
    assert torch.equal(merged[b0:b1], trained[b0:b1])  # the rest: local progress kept
    state.merge(published, (b0, b1), 0.5, 2)
    assert torch.allclose(state.theta()[b0:b1], 0.5 * trained[b0:b1] + 0.5 * published[b0:b1])
    assert state.version == 2
    with pytest.raises(ValueError):
        state.merge(published, None, 1.0, 3)


# ----------------------------------------------------------------------------- in process


STREAMING_RUN = tiny_run(
    train={"seq_len": 32, "batch_size": 8, "inner_steps": 10, "min_inner_steps": 2},
    round={"deadline_s": 60, "quorum": 2, "min_nodes": 2},
    budget={"rounds": 6},
    comm={"fragments": 2, "codec": "int8"},
)


def _upload(service, run_id, identity, node_id, a, state: LocalState, workload) -> bytes:
    """What a streaming node uploads for `a`: merge, train, global[f] - local[f], signed."""
    theta = unpack_vector(service.blobs.get(a.weights_blob))
    if state.version == a.base_version - 1:
        state.merge(theta, workload.fragment(a.base_version - 1), 0.0, a.base_version)
    else:
        state.__init__(workload, theta, a.base_version)
    progress = Progress()
    stream = workload.batches(slice_seed(workload.cfg.seed, a.round, node_id, a.attempt))
    state.train(stream, a.inner_steps, progress, a.round)
    codec = make_codec(workload.cfg.comm.codec, workload.cfg.comm.block_size)
    tensors = codec.encode(state.pseudo_gradient(theta, workload.fragment(a.round)))
    meta = ContributionMeta(
        assignment_id=a.id,
        codec=codec.name,
        steps=progress.steps,
        tokens=progress.tokens,
        loss_first=progress.losses[0],
        loss_last=progress.losses[-1],
        loss_mean=sum(progress.losses) / progress.steps,
        train_time_s=1.0,
        threads=1,
    )
    claim = sign_contribution(identity, run_id, a.round, tensors, meta.model_dump())
    return pack(tensors, meta.model_copy(update={"claim": claim}).model_dump())


def test_fragments_run_in_process_syncs_one_fragment_per_round(tmp_path: Path):
    torch.set_num_threads(1)
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    run_id = service.create_run(Identity.generate().public_key, STREAMING_RUN).run_id
    cfg = RunConfig.model_validate(service.run_status(run_id)["config"])
    # each node builds its own model (its local state lives in it), as real nodes do
    nodes = []
    for i in range(2):
        ident = Identity.from_seed(hashlib.sha256(f"streaming node {i}".encode()).digest())
        workload = Workload.from_config(cfg)
        request = RegisterRequest(probe_tokens_per_s=2000.0, probe_numel=workload.numel)
        node_id = service.membership.register(ident.public_key, request)
        state = LocalState(workload, workload.initial_theta(), -5)
        nodes.append((ident, node_id, workload, state))
    fragments = nodes[0][2].fragments
    assert len(fragments) == 2
    refused = False
    for _ in range(200):
        if service.run_status(run_id)["status"] != "active":
            break
        for ident, node_id, workload, state in nodes:
            answer = service.asks.request_assignment(run_id, node_id)
            if answer.status != "assigned":
                continue
            a = answer.assignment
            if not refused:  # a whole-model upload in a fragment round changes nothing
                theta = unpack_vector(service.blobs.get(a.weights_blob))
                codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
                meta = ContributionMeta(
                    assignment_id=a.id, codec=codec.name, steps=a.inner_steps,
                    tokens=a.inner_steps * cfg.tokens_per_step, loss_first=1.0, loss_last=1.0,
                    loss_mean=1.0, train_time_s=1.0, threads=1,
                )  # fmt: skip
                with pytest.raises(HubError) as caught:
                    service.uploads.submit(
                        run_id, node_id, pack(codec.encode(theta * 0), meta.model_dump())
                    )
                assert caught.value.status == 400
                refused = True
            body = _upload(service, run_id, ident, node_id, a, state, workload)
            service.uploads.submit(run_id, node_id, body)
        clock.advance(1.0)
        service.ticker.tick()
    status = service.run_status(run_id)
    assert status["status"] == "finished" and status["version"] == 6
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.3
    with service.sessions() as s:
        from gridswarm.hub import models as m

        versions = sorted(
            s.query(m.Version).filter(m.Version.run_id == run_id).all(), key=lambda v: v.number
        )
        contributions = s.query(m.Contribution).filter(m.Contribution.run_id == run_id).all()
        assert contributions and all(not c.audited for c in contributions)
        # usefulness is scored on the fragment update applied to the full weights
        assert all(c.loss_drop is not None for c in contributions)
    assert "streaming" in status["trust"]["audits"]  # the run's verdicts say why
    for before, after in itertools.pairwise(versions):
        start, end = fragments[before.number % 2]
        _, meta = unpack(service.blobs.get(after.delta_blob))
        assert meta["fragment"] == [start, end]
        old = unpack_vector(service.blobs.get(before.weights_blob))
        new = unpack_vector(service.blobs.get(after.weights_blob))
        assert torch.equal(old[:start], new[:start]) and torch.equal(old[end:], new[end:])
        assert not torch.equal(old[start:end], new[start:end])


# ----------------------------------------------------------------------------- live


def _bytes_up_per_contribution(status: dict) -> float:
    return status["bytes_up_total"] / sum(n["contributions"] for n in status["nodes"])


@pytest.mark.slow
def test_live_streaming_swarm_trains_ahead_and_uploads_half(make_swarm):
    base = {
        "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 16, "min_inner_steps": 2},
        "round": {"deadline_s": 60, "quorum": 2, "min_nodes": 2},
        "budget": {"rounds": 4},
    }
    swarm = make_swarm()
    sponsor, run_id = start(
        swarm, tiny_run(**base, comm={"fragments": 2, "overlap": True, "overlap_mix": 0.5})
    )
    names = ["s0", "s1"]
    for name in names:
        swarm.start_node(name, run_id)
    status = wait_for(lambda: finished(sponsor, run_id), 180, "the streaming run to finish")
    assert status["version"] == 4
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.5
    streaming_bytes = _bytes_up_per_contribution(status)
    logs = [(swarm.workdir / f"{name}.log").read_text() for name in names]
    ahead = [int(n) for log in logs for n in re.findall(r"ahead=(\d+)", log)]
    assert sum(ahead) > 0, logs
    assert all(re.search(r"compute_s=[\d.]+ wall_s=[\d.]+", log) for log in logs)

    base["budget"] = {"rounds": 2}  # bytes per contribution do not change with rounds
    sponsor2, classic_id = start_again(swarm, tiny_run(**base))
    for name in names:
        swarm.start_node(f"c-{name}", classic_id)
    classic = wait_for(lambda: finished(sponsor2, classic_id), 180, "the classic run to finish")
    ratio = streaming_bytes / _bytes_up_per_contribution(classic)
    assert 0.3 < ratio < 0.7, ratio
    classic_logs = [(swarm.workdir / f"c-{name}.log").read_text() for name in names]
    print(  # the figures for the report (pytest -s)
        f"\nbytes up per contribution: streaming {streaming_bytes:.0f}, classic "
        f"{_bytes_up_per_contribution(classic):.0f} (ratio {ratio:.2f}); val loss streaming "
        f"{status['val_loss'][0]:.3f} -> {status['val_loss'][-1]:.3f}, classic "
        f"{classic['val_loss'][0]:.3f} -> {classic['val_loss'][-1]:.3f}; steps trained ahead "
        f"{sum(ahead)}; compute/wall streaming {_utilisation(logs):.2f}, classic "
        f"{_utilisation(classic_logs):.2f}"
    )


def _utilisation(logs: list[str]) -> float:
    """Sum of the nodes' compute_s over the sum of their wall_s, from their round lines."""
    compute = sum(float(x) for log in logs for x in re.findall(r"compute_s=([\d.]+)", log))
    wall = sum(float(x) for log in logs for x in re.findall(r"wall_s=([\d.]+)", log))
    return compute / wall


def start_again(swarm, config: dict):
    """A second run on the swarm's running hub."""
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    return sponsor, sponsor.create_run(config).run_id


@pytest.mark.slow
def test_live_kept_inner_optimizer_runs_the_kept_state_round_unaudited(make_swarm):
    swarm = make_swarm()
    config = tiny_run(
        train={
            "seq_len": 32,
            "batch_size": 8,
            "inner_steps": 8,
            "min_inner_steps": 2,
            "keep_inner_optimizer": True,
        },
        round={"deadline_s": 60, "quorum": 2, "min_nodes": 2},
    )
    sponsor, run_id = start(swarm, config)
    for name in ("k0", "k1"):
        swarm.start_node(name, run_id)
    status = wait_for(lambda: finished(sponsor, run_id), 180, "the kept-optimizer run to finish")
    assert status["version"] == 3
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.3
    assert "kept inner optimizer" in status["trust"]["audits"]
    logs = [(swarm.workdir / f"{name}.log").read_text() for name in ("k0", "k1")]
    # the kept-state round (whole vector), not the classic one; no node restarted its state
    assert all(log.count("fragment=all") == 3 for log in logs), logs
    assert not any("starting fresh" in log for log in logs), logs
