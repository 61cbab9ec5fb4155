"""DP-FedAvg: clipping, calibrated noise (central, distributed), Opacus accounting, budget stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from gridswarm.privacy.dp import (
    DPConfig,
    can_run_round,
    clip_updates,
    dp_fedavg,
    epsilon_for,
    epsilon_spent,
    noise_multiplier_for,
    privatize_node_update,
    rounds_within_budget,
    secagg_clip_range,
    should_stop,
)
from gridswarm.privacy.secagg import make_config, quantize, simulate_round

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_clip_bounds_norms_and_keeps_small_updates() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, norms = clip_updates(x, 1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    single, norm = clip_updates(torch.tensor([6.0, 8.0]), 2.0)
    assert torch.allclose(single, torch.tensor([1.2, 1.6])) and float(norm) == 10.0
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(x, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_updates(torch.tensor([[float("nan"), 1.0]]), 1.0)


def test_central_noise_is_calibrated() -> None:
    d, z, c, m = 200_000, 1.3, 0.5, 10
    out = dp_fedavg(torch.zeros(m, d), c, z, expected_nodes=m, generator=gen(0))
    assert float(out.std()) == pytest.approx(z * c / m, rel=0.01)
    assert abs(float(out.mean())) < 5 * z * c / m / np.sqrt(d)


def test_dp_fedavg_mean_of_clipped_updates() -> None:
    big = torch.full((4, 100), 10.0)  # norm 100 each -> clipped to norm 1: coordinates 0.1
    out = dp_fedavg(big, clip_norm=1.0, noise_multiplier=1e-6, expected_nodes=8, generator=gen(1))
    assert torch.allclose(out, torch.full((100,), 4 * 0.1 / 8), atol=1e-5)


def test_distributed_noise_sums_to_central_noise() -> None:
    d, z, c, n = 100_000, 1.0, 2.0, 16
    zero = torch.zeros(d)
    shares = [privatize_node_update(zero, c, z, min_nodes=n, generator=gen(i)) for i in range(n)]
    total = torch.stack(shares).sum(dim=0)
    assert float(total.std()) == pytest.approx(z * c, rel=0.01)  # same as central noise on the sum


def test_distributed_dp_under_secure_aggregation() -> None:
    n, t, d, z, c = 10, 2, 5000, 1.0, 1.0
    ids = [f"n{i}" for i in range(n)]
    clip_range = secagg_clip_range(c, z, n - t)
    cfg = make_config("dp/1", ids, d, n_neighbours=6, max_dropouts=t, clip_range=clip_range)
    raw = {nid: 5.0 * torch.randn(d, generator=gen(i)) for i, nid in enumerate(ids)}
    private = {
        nid: privatize_node_update(u, c, z, min_nodes=n - t, generator=gen(100 + i))
        for i, (nid, u) in enumerate(raw.items())
    }
    result = simulate_round(cfg, private)
    expected = np.zeros(d, dtype=np.uint32)
    for u in private.values():
        expected += quantize(u, cfg)
    assert np.array_equal(result.integer_sum, expected)
    clipped_sum = clip_updates(torch.stack(list(raw.values())), c)[0].sum(0)
    noise = result.total - clipped_sum
    assert float(noise.std()) == pytest.approx(z * c * np.sqrt(n / (n - t)), rel=0.05)


def test_epsilon_matches_opacus_and_published_reference() -> None:
    # Reference: q = 256/60000, sigma = 1.1, 60 epochs (14,062 steps), delta = 1e-5.
    q, steps = 256 / 60000, 14_062
    rdp = epsilon_for(1.1, q, steps, 1e-5, "rdp")
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=q)
    assert epsilon_for(1.1, q, 3, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5))
    assert rdp == pytest.approx(2.60, abs=0.01)
    prv = epsilon_for(1.1, q, steps, 1e-5, "prv")
    assert prv == pytest.approx(2.39, abs=0.02)
    assert prv < rdp  # PRV is the tighter of the two


def test_epsilon_monotone_and_history_composes() -> None:
    e10 = epsilon_for(1.0, 1.0, 10, 1e-5)
    assert e10 < epsilon_for(1.0, 1.0, 20, 1e-5)
    assert e10 > epsilon_for(2.0, 1.0, 10, 1e-5)
    assert e10 > epsilon_for(1.0, 0.1, 10, 1e-5)  # subsampling amplifies privacy
    split = epsilon_spent([(1.0, 1.0, 4), (1.0, 1.0, 6)], 1e-5)
    assert split == pytest.approx(e10)
    assert epsilon_spent([], 1e-5) == 0.0


def test_budget_stop() -> None:
    z, q, delta, budget = 1.0, 0.1, 1e-5, 4.0
    r = rounds_within_budget(z, q, delta, budget)
    assert epsilon_for(z, q, r, delta) <= budget < epsilon_for(z, q, r + 1, delta)
    assert can_run_round([(z, q, r - 1)], z, q, delta, budget)
    assert not can_run_round([(z, q, r)], z, q, delta, budget)
    assert should_stop(epsilon_for(z, q, r + 1, delta), budget)
    assert not should_stop(epsilon_for(z, q, r, delta), budget)
    assert rounds_within_budget(0.3, 1.0, delta, 0.5) == 0
    assert rounds_within_budget(50.0, 0.01, delta, 8.0, max_rounds=500) == 500


def test_noise_multiplier_for_budget() -> None:
    z = noise_multiplier_for(8.0, 1e-5, 0.1, 1000)
    eps = epsilon_for(z, 0.1, 1000, 1e-5)
    assert 7.5 < eps <= 8.0


def test_bad_dp_settings() -> None:
    with pytest.raises(ValueError, match="delta"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1.0, epsilon_budget=8.0)
    with pytest.raises(ValueError, match="placement"):
        DPConfig(1.0, 1.0, 1e-5, 8.0, placement="local")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling rate"):
        epsilon_for(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for(1.0, 0.5, 10, 1e-5, "gdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_nodes"):
        privatize_node_update(torch.zeros(3), 1.0, 1.0, min_nodes=0)
