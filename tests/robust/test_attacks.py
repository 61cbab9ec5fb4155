"""Attack harness: each attack builds what it claims, reproducibly; bad names fail clearly."""

from __future__ import annotations

import pytest
import torch

from gridswarm.train.attacks import (
    ATTACKS,
    alie_z,
    apply_attack,
    garbage_batches,
)

torch.set_num_threads(1)


@pytest.fixture
def honest() -> torch.Tensor:
    return 1.0 + 0.2 * torch.randn(8, 500, generator=torch.Generator().manual_seed(0))


def _is_row_of(rows: torch.Tensor, honest: torch.Tensor) -> bool:
    return all(any(torch.allclose(r, h) for h in honest) for r in rows)


def test_sign_flip_and_scaling(honest: torch.Tensor) -> None:
    flipped = apply_attack("sign-flip", honest, 3, rng_seed=1)
    assert flipped.shape == (3, 500)
    assert _is_row_of(-flipped, honest)
    scaled = apply_attack("scaling", honest, 2, rng_seed=1, scale=5.0)
    assert _is_row_of(scaled / 5.0, honest)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_are_reproducible_and_shaped(name: str, honest: torch.Tensor) -> None:
    a = apply_attack(name, honest, 3, rng_seed=11)
    b = apply_attack(name, honest, 3, rng_seed=11)
    assert a.shape == (3, honest.shape[1]) and a.dtype == honest.dtype
    assert torch.equal(a, b)
    assert apply_attack(name, honest, 0, rng_seed=11).shape == (0, honest.shape[1])


def test_noise_default_sigma_and_seed(honest: torch.Tensor) -> None:
    a = apply_attack("noise", honest, 4, rng_seed=3)
    rms = float(honest.pow(2).mean().sqrt())
    assert float(a.std()) == pytest.approx(100 * rms, rel=0.05)
    assert not torch.equal(a, apply_attack("noise", honest, 4, rng_seed=4))


def test_alie_z_matches_paper_example() -> None:
    # Baruch et al.: n = 50, f = 12 -> s = 14, z = Phi^-1(36/50) ~ 0.58; n = 25, f = 5 -> ~0.47.
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)
    assert alie_z(25, 5) == pytest.approx(0.4677, abs=1e-3)
    assert alie_z(4, 0) == 0.0


def test_alie_sits_z_sigmas_below_the_mean(honest: torch.Tensor) -> None:
    rows = apply_attack("alie", honest, 2, rng_seed=0, z=1.5)
    expected = honest.mean(0) - 1.5 * honest.std(0, correction=0)
    assert torch.allclose(rows[0], expected) and torch.equal(rows[0], rows[1])


def test_ipm_points_against_the_honest_mean(honest: torch.Tensor) -> None:
    rows = apply_attack("ipm", honest, 2, rng_seed=0, epsilon=0.5)
    mean = honest.mean(0)
    assert torch.allclose(rows[1], -0.5 * mean)
    assert float(rows[0] @ mean) < 0


def test_alie_and_ipm_match_their_definitions_on_a_tiny_set() -> None:
    # 3 honest updates, 2 attackers: n = 5, f = 2 -> s = floor(5/2 + 1) - 2 = 1,
    # z = Phi^-1((5 - 1) / 5) = Phi^-1(0.8) ~ 0.8416 (Baruch et al. 2019).
    honest = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    mean = torch.tensor([3.0, 2.0])
    std = torch.full((2,), (8.0 / 3.0) ** 0.5)  # population std of (1, 3, 5) and (0, 2, 4)
    assert alie_z(5, 2) == pytest.approx(0.8416, abs=1e-4)
    rows = apply_attack("alie", honest, 2, rng_seed=0)
    assert rows.shape == (2, 2)
    assert torch.allclose(rows, (mean - 0.8416212 * std).expand(2, -1), atol=1e-5)
    assert torch.allclose(apply_attack("alie", honest, 1, rng_seed=0, z=1.0)[0], mean - std)
    # IPM (Xie et al. 2019): every attacker sends -epsilon * mean(honest).
    assert torch.equal(apply_attack("ipm", honest, 2, rng_seed=0, epsilon=0.5)[1], -0.5 * mean)
    # epsilon > (n - f) / f reverses the plain mean: here (3 - 10 * 2) / 5 * mean(honest)
    bad = apply_attack("ipm", honest, 2, rng_seed=0, epsilon=10.0)
    assert torch.allclose(torch.cat([honest, bad]).mean(0), -17.0 / 5.0 * mean)
    # omniscient: the rows follow the honest updates they are given (the same round's)
    assert torch.allclose(apply_attack("ipm", 2 * honest, 1, rng_seed=0, epsilon=0.5)[0], -mean)


def test_bad_attack_input(honest: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown attack 'flip'"):
        apply_attack("flip", honest, 1, 0)
    with pytest.raises(ValueError, match=r"no option\(s\) \['eps'\]"):
        apply_attack("ipm", honest, 1, 0, eps=1.0)
    with pytest.raises(ValueError, match="garbage_batches"):
        apply_attack("garbage-data", honest, 1, 0)
    with pytest.raises(ValueError, match="n_attackers"):
        apply_attack("ipm", honest, -1, 0)


def _stream(n: int):
    g = torch.Generator().manual_seed(9)
    for _ in range(n):
        x = torch.randint(97, 100, (4, 16), generator=g)  # only 3 distinct tokens
        yield x, torch.roll(x, -1, dims=1)


def test_garbage_uniform_replaces_data() -> None:
    batches = list(garbage_batches(_stream(5), vocab_size=256, rng_seed=1))
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (4, 16) and y.shape == (4, 16) and x.dtype == torch.int64
    tokens = torch.cat([b[0].reshape(-1) for b in batches])
    assert tokens.unique().numel() > 50  # the originals had 3 distinct tokens
    assert int(tokens.max()) < 256


def test_garbage_flip_targets_and_shuffle() -> None:
    clean = list(_stream(2))
    flipped = list(garbage_batches(iter(clean), 256, 1, kind="flip-targets"))
    assert torch.equal(flipped[0][0], clean[0][0])
    assert torch.equal(flipped[0][1], 255 - clean[0][1])
    shuffled = list(garbage_batches(iter(clean), 256, 1, kind="shuffle"))
    assert torch.equal(
        shuffled[0][0].reshape(-1).sort().values, clean[0][0].reshape(-1).sort().values
    )
    assert not torch.equal(shuffled[0][0], clean[0][0])


def test_garbage_bad_kind_fails_at_once() -> None:
    with pytest.raises(ValueError, match="unknown garbage kind 'zeros'"):
        garbage_batches(_stream(1), 256, 0, kind="zeros")
