"""bench/robustness.py: its attack variants are the papers' definitions with valid options, the
large IPM epsilon reverses the plain mean at every fraction it reports, and a (tiny) simulated
round goes through the hub's close path with the crafted rows uploaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gridswarm.train.aggregate import make_aggregator
from tests.benches import load_bench

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench():
    return load_bench("robustness")


def test_variants_are_valid_and_defined_as_in_the_papers(bench) -> None:
    honest = 1.0 + 0.1 * torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    for name, variant in bench.ATTACK_VARIANTS.items():
        if variant.attack == "garbage-data":
            continue
        rows = bench.attack_rows(variant, honest, 3, seed=1)
        assert rows.shape == (3, 50), name
    mean, std = honest.mean(0), honest.std(0, correction=0)
    ipm = bench.attack_rows(bench.ATTACK_VARIANTS["ipm-0.1"], honest, 2, seed=0)
    assert torch.allclose(ipm[0], -0.1 * mean)
    alie = bench.attack_rows(bench.ATTACK_VARIANTS["alie-z1"], honest, 2, seed=0)
    assert torch.allclose(alie[1], mean - std)
    assert set(bench.QUICK_ATTACKS) <= set(bench.ATTACK_VARIANTS)
    # the rows are built from the registry, as the hub builds its aggregator
    for name, options in bench.AGGREGATOR_ROWS.values():
        make_aggregator(name, **options)


@pytest.mark.parametrize("preset", ["QUICK", "FULL"])
def test_large_ipm_reverses_the_mean_at_every_fraction(bench, preset: str) -> None:
    n = getattr(bench, preset).n_nodes
    epsilon = bench.ATTACK_VARIANTS["ipm-10"].options["epsilon"]
    for fraction in bench.FRACTIONS:
        f = round(fraction * n)
        assert f >= 1 and epsilon > (n - f) / f, (preset, fraction)


def test_tiny_swarm_round_trip_through_the_close(bench) -> None:
    setting = bench.Setting(6, 2, 1, 1, 16, 2, 16, 2, 1e-2, 2)
    swarm = bench.Swarm(setting, seed=0)
    mean = make_aggregator("mean")
    clean = swarm.run(mean, None, 0)
    again = swarm.run(mean, None, 0)
    assert clean["eval_loss"] == again["eval_loss"]  # seeded, one thread: reproducible
    assert -1.0 <= clean["honest_cosine"] <= 1.0
    reversed_ = swarm.run(mean, bench.ATTACK_VARIANTS["ipm-10"], 2)
    assert reversed_["eval_loss"] > clean["eval_loss"]  # the attack reaches the weights


def test_round_stats_on_known_rows(bench) -> None:
    # coordinate 0: mu = 2, sigma = 1; coordinate 1: all equal (sigma 0, left out of the ratio)
    honest = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    stats = bench.round_stats(honest, honest.mean(0))
    assert stats["snr"] == pytest.approx(2.0)
    assert stats["agg_cos"] == pytest.approx(1.0) and stats["agg_norm"] == pytest.approx(1.0)
    flipped = bench.round_stats(honest, -2.0 * honest.mean(0))
    assert flipped["agg_cos"] == pytest.approx(-1.0) and flipped["agg_norm"] == pytest.approx(2.0)


def test_alie_diagnostics_and_shift_sensitivity(bench) -> None:
    setting = bench.Setting(6, 2, 1, 1, 16, 2, 16, 2, 1e-2, 2, inner_warmup_steps=0)
    swarm = bench.Swarm(setting, seed=0)
    assert swarm.cfg.inner_warmup_steps == 0  # the preset's warm-up reaches the inner AdamW
    mean = make_aggregator("mean")
    clean = swarm.run(mean, None, 0, keep_state=True)
    assert clean["aggregate_cosine"] == pytest.approx(1.0, abs=1e-5)  # the mean of honest rows
    assert clean["honest_snr"] > 0 and clean["honest"].shape == (6, swarm.theta0.numel())
    attacked = swarm.run(mean, bench.ATTACK_VARIANTS["alie-z1"], 2)
    assert attacked["aggregate_cosine"] < 0.999  # the crafted rows moved the aggregate
    shift = bench.shift_sensitivity(swarm, clean["theta"], clean["honest"])
    assert shift["sigma_norm"] > 0
    for t in bench.SHIFT_MULTIPLES:
        cell = shift["multiples"][str(t)]
        assert all(math.isfinite(v) for v in cell.values()), cell


def test_verdict_separates_attack_cost_from_clean_cost_and_renders(bench, tmp_path) -> None:
    fractions = [str(f) for f in bench.FRACTIONS]
    clean = {agg: 3.0 for agg in bench.AGGREGATOR_ROWS} | {"median": 3.6}  # 1.2x the mean
    attacked = {agg: dict.fromkeys(fractions, 3.0) for agg in bench.AGGREGATOR_ROWS}
    attacked["median"] = dict.fromkeys(fractions, 3.6)  # the attack costs it nothing
    attacked["mean"] = dict.fromkeys(fractions, math.inf)  # diverged
    res = {
        "setting": bench.QUICK.__dict__,
        "attacks": ["ipm-10"],
        "clean": clean,
        "clean_loss": 3.0,
        "initial_loss": 5.5,
        "attacked": {"ipm-10": attacked},
        "model_parameters": 1000,
        "honest_cosine": 0.5,
        "wall_s": 1.0,
        "machine": "test",
        "timing": {"1M params, n=100": {"mean": 0.1}},
        "command": "python bench/robustness.py --quick",
    }
    verdict = bench.verdicts(res)["ipm-10"]
    assert "median" in verdict["hurt"] and verdict["worst_own_ratio"]["median"] == 1.0
    assert "mean" in verdict["failed"] and verdict["worst_own_ratio"]["mean"] == math.inf
    path = tmp_path / "r.json"
    path.write_text(json.dumps(bench.finite_or_none(res)))
    bench.render(path)
    text = path.with_suffix(".md").read_text()
    assert "| median | 1.20 | 1.00 |" in text and "| mean | 1.00 | diverged |" in text
