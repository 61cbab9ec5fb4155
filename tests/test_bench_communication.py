"""bench/communication.py: both sides read the same BPE tokens, presets are valid, the in-process
tuner runs the real round (train, codec, aggregator, outer update) and counts bytes."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from gridswarm.config import parse_run_config
from gridswarm.train.data import slice_seed
from gridswarm.train.workload import Workload
from tests.benches import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("communication")


@pytest.fixture(scope="module")
def corpus(bench, tmp_path_factory) -> dict:
    return bench.prepare_corpus(tmp_path_factory.mktemp("bench") / "corpus", 300)


def test_presets_are_valid_runs_and_full_is_10m(bench, corpus) -> None:
    for name, preset in bench.PRESETS.items():
        cfg = parse_run_config(bench.run_config(preset, corpus["dataset"]))
        assert cfg.budget.tokens == (
            bench.NODES * preset["rounds"] * preset["inner_steps"] * cfg.tokens_per_step
        )
        if name == "full":  # with the test's 300-token vocabulary (the preset's 1024 adds more)
            assert Workload.from_config(cfg).numel >= 10_000_000


def test_ddp_rank_reads_the_prepared_bpe_tokens(bench, corpus) -> None:
    assert corpus["vocab_size"] == 300 and corpus["tokenizer"].startswith("bpe:300")
    preset = {**bench.PRESETS["quick"], "rounds": 1, "inner_steps": 2}
    config = bench.ddp_config(bench.run_config(preset, corpus["dataset"]), 1e-3, 1)
    cfg = parse_run_config(config)
    workload = Workload.from_config(cfg)
    assert workload.vocab_size == 300
    inputs, _ = next(workload.batches(slice_seed(cfg.seed, 0, "ddp-0")))
    assert inputs.shape == (bench.BATCH_SIZE, bench.SEQ_LEN)
    assert int(inputs.max()) >= 256  # merged BPE tokens, not bytes


def tiny_preset(bench, **overrides: object) -> dict:
    """The quick preset on a 1-layer model for 2 rounds of 3 inner steps (seconds, not minutes)."""
    return {
        **bench.PRESETS["quick"],
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "rounds": 2,
        "inner_steps": 3,
        **overrides,
    }


def test_simulated_round_counts_bytes_and_learns(bench, corpus) -> None:
    torch.set_num_threads(1)
    config = bench.run_config(tiny_preset(bench), corpus["dataset"])
    a = bench.simulate_diloco(config)
    b = bench.simulate_ddp(bench.ddp_config(config, 2e-3, 1), a["tokens"], 3)
    assert a["tokens"] == b["tokens"] == config["budget"]["tokens"]
    assert len(a["curve"]) == 3 and a["curve"][-1]["val_loss"] < a["curve"][0]["val_loss"]
    # int4 up and down: about half a byte per parameter each way, per node per round
    per_round = a["bytes_communicated"] / 2 / bench.NODES
    assert 0.9 < per_round / a["numel"] < 1.2
    assert b["bytes_communicated"] > a["bytes_communicated"]


def test_simulated_kept_inner_optimizer_carries_adam_state_across_rounds(bench, corpus) -> None:
    torch.set_num_threads(1)
    preset = tiny_preset(bench, error_feedback=False)
    fresh = bench.simulate_diloco(
        bench.run_config({**preset, "keep_inner_optimizer": False}, corpus["dataset"])
    )
    kept = bench.simulate_diloco(
        bench.run_config({**preset, "keep_inner_optimizer": True}, corpus["dataset"])
    )
    assert kept["tokens"] == fresh["tokens"]
    assert kept["bytes_communicated"] == fresh["bytes_communicated"]
    # round 0 is the same (a new optimizer either way); round 1 differs: the state was kept
    assert kept["curve"][1]["val_loss"] == fresh["curve"][1]["val_loss"]
    assert kept["curve"][2]["val_loss"] != fresh["curve"][2]["val_loss"]


def test_preset_seed_sets_both_sides_init_and_data(bench, corpus) -> None:
    """`--grid '[{"seed": ...}]'` (the sweep's seed spread) reseeds the run both sides use."""
    default = bench.run_config(tiny_preset(bench), corpus["dataset"])
    other = bench.run_config(tiny_preset(bench, seed=7), corpus["dataset"])
    assert default["seed"] == bench.PRESETS["quick"]["seed"] and other["seed"] == 7
    assert bench.ddp_config(other, 1e-3, 1)["seed"] == 7
    a, b = (Workload.from_config(parse_run_config(c)) for c in (default, other))
    assert not torch.equal(a.initial_theta(), b.initial_theta())
    first = [next(w.batches(slice_seed(w.cfg.seed, 0, "ddp-0")))[0] for w in (a, b)]
    assert not torch.equal(*first)


def test_nodes_and_ddp_clip_gradients_at_their_own_thresholds(bench, corpus) -> None:
    """`grad_clip` is the nodes' `train.grad_clip`; `ddp_grad_clip` DDP's own (its best)."""
    config = bench.run_config(tiny_preset(bench, grad_clip=0.5), corpus["dataset"])
    assert parse_run_config(config).train.grad_clip == 0.5
    ddp = bench.ddp_config(config, 1e-3, 1, 1.0)
    assert parse_run_config(ddp).train.grad_clip == 1.0 and config["train"]["grad_clip"] == 0.5
    assert bench.ddp_config(config, 1e-3, 1)["train"]["grad_clip"] == 0.5


def test_a_preset_schedule_reaches_both_sides(bench, corpus) -> None:
    """`lr_schedule`/`min_lr_ratio` are preset knobs: the nodes' run gets them (and a round
    budget, the schedule's total) and DDP decays over its own steps with the same function;
    the constant schedule is DDP's old warm-up-then-constant lr bit for bit."""
    preset = tiny_preset(bench, lr_schedule="cosine", min_lr_ratio=0.0)
    config = bench.run_config(preset, corpus["dataset"])
    cfg = parse_run_config(config)
    assert cfg.train.lr_schedule == "cosine" and cfg.train.min_lr_ratio == 0.0
    assert cfg.budget.rounds == preset["rounds"] and cfg.budget.tokens is not None
    t = parse_run_config(bench.ddp_config(config, 2e-3, 2)).train
    lrs = [bench.ddp_lr(t, step, 10) for step in range(10)]
    assert lrs[0] == 1e-3 < lrs[1] < 2e-3 and lrs[-1] < 1e-4  # warm-up, then decay
    assert all(b < a for a, b in pairwise(lrs[1:]))
    constant = bench.run_config(tiny_preset(bench), corpus["dataset"])
    assert parse_run_config(constant).budget.rounds is None  # the token budget ends it
    for warmup in (0, 3):
        t = parse_run_config(bench.ddp_config(constant, 2e-3, warmup)).train
        old = [2e-3 * min(1.0, (s + 1) / max(warmup, 1)) for s in range(10)]
        assert [bench.ddp_lr(t, s, 10) for s in range(10)] == old
    torch.set_num_threads(1)
    decayed = bench.simulate_diloco(config)  # runs, and the schedule changes what it trains
    plain = bench.simulate_diloco(
        bench.run_config({**preset, "min_lr_ratio": 1.0}, corpus["dataset"])
    )
    assert decayed["curve"][1]["val_loss"] != plain["curve"][1]["val_loss"]
