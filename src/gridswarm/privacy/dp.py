"""DP-FedAvg (McMahan et al. 2018): node-level differential privacy for a run's pseudo-gradients.

The unit of privacy is one node's whole data: each round every participating node's
pseudo-gradient is clipped to L2 norm C, the clipped updates are summed, and Gaussian noise of
standard deviation z * C (z = noise multiplier) is added to the sum, either

- centrally, by the hub after summing (the hub sees the clipped updates: trusted hub), or
- distributed, each node adding N(0, (z C)^2 / n_min) to its own update before secure
  aggregation, so that any n_min contributions carry at least the full noise and the hub never
  sees an update in the clear.

The mean is taken with a fixed denominator (the expected number of nodes), which keeps the
sensitivity of the released value at C / m. The privacy cost is computed by Opacus's RDP or PRV
accountant over the run's history of (noise multiplier, sampling rate, rounds); the run stops
before a round would take epsilon over its budget.

Sampling rate: q = nodes per round / population. Amplification by subsampling assumes the
participants are drawn at random and the draw is secret; an energy-aware scheduler's choice is
neither, so use q = 1 unless nodes are Poisson-sampled.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

AccountantName = Literal["rdp", "prv"]
# One accounting entry: (noise multiplier, sampling rate, rounds run with them).
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class DPConfig:
    """A run's differential-privacy settings."""

    clip_norm: float  # C: L2 bound on each node's pseudo-gradient
    noise_multiplier: float  # z: noise std on the sum is z * C
    delta: float  # the run's delta (e.g. < 1 / population)
    epsilon_budget: float  # the run stops before epsilon would pass this
    placement: Literal["central", "distributed"] = "central"
    accountant: AccountantName = "rdp"

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not self.epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be > 0, got {self.epsilon_budget}")
        if self.placement not in ("central", "distributed"):
            raise ValueError(
                f"placement must be 'central' or 'distributed', got {self.placement!r}"
            )
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")


# --------------------------------------------------------------------------- clipping and noise


def clip_updates(updates: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of `[n, d]` (or a single `[d]` vector) to L2 norm <= clip_norm.
    Returns (clipped, original norms)."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    rows = updates.unsqueeze(0) if updates.dim() == 1 else updates
    if rows.dim() != 2:
        raise ValueError(f"updates must be [d] or [n, d], got shape {tuple(updates.shape)}")
    norms = rows.double().norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("an update has non-finite values; it cannot be clipped")
    factors = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0).to(rows.dtype)
    clipped = rows * factors[:, None]
    return (clipped[0], norms[0]) if updates.dim() == 1 else (clipped, norms)


def _fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def gaussian_noise(
    shape: int | tuple[int, ...], std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """N(0, std^2) float32 noise. Without a generator, one seeded from os.urandom is used.
    (Float sampling is not side-channel hardened; Opacus's secure_mode needs torchcsprng.)"""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return std * torch.randn(shape, generator=generator or _fresh_generator())


def central_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Noise std on the SUM of clipped updates: z * C."""
    return noise_multiplier * clip_norm


def node_noise_std(noise_multiplier: float, clip_norm: float, min_nodes: int) -> float:
    """Each node's share of distributed noise: z C / sqrt(min_nodes), so that the sum of any
    min_nodes contributions (e.g. sampled nodes minus SecAgg's max_dropouts) has std >= z C."""
    if min_nodes < 1:
        raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
    return noise_multiplier * clip_norm / math.sqrt(min_nodes)


def privatize_node_update(
    update: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    min_nodes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Node side of distributed DP: clip, then add this node's share of the noise (before any
    codec or SecAgg quantisation)."""
    clipped, _ = clip_updates(update, clip_norm)
    std = node_noise_std(noise_multiplier, clip_norm, min_nodes)
    return clipped + gaussian_noise(tuple(clipped.shape), std, generator)


def dp_fedavg(
    updates: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    expected_nodes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Central DP-FedAvg: (sum_i clip(x_i) + N(0, (z C)^2)) / expected_nodes."""
    if expected_nodes < 1:
        raise ValueError(f"expected_nodes must be >= 1, got {expected_nodes}")
    clipped, _ = clip_updates(updates, clip_norm)
    total = clipped.sum(dim=0)
    std = central_noise_std(noise_multiplier, clip_norm)
    return (total + gaussian_noise(tuple(total.shape), std, generator)) / expected_nodes


def secagg_clip_range(
    clip_norm: float, noise_multiplier: float, min_nodes: int, sigmas: float = 6.0
) -> float:
    """A SecAgg clip_range that almost never clips a clipped-and-noised coordinate:
    |coordinate| <= C, plus `sigmas` standard deviations of the node's noise."""
    return clip_norm + sigmas * node_noise_std(noise_multiplier, clip_norm, min_nodes)


# --------------------------------------------------------------------------- accounting


def _check_history(history: Sequence[HistoryEntry]) -> None:
    for z, q, rounds in history:
        if not z > 0:
            raise ValueError(f"noise multiplier must be > 0, got {z}")
        if not 0 < q <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {q}")
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")


def epsilon_spent(
    history: Sequence[HistoryEntry], delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon at `delta` after the rounds in `history`, from Opacus's RDP or PRV accountant."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    _check_history(history)
    entries = [(float(z), float(q), int(r)) for z, q, r in history if r > 0]
    if not entries:
        return 0.0
    # Opacus is imported here, not at the top: it costs every hub and node process ~2.5 s to load
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        acc = RDPAccountant()
        acc.history = entries
        with warnings.catch_warnings():
            # "optimal order is the smallest alpha": the bound is valid, only loose (large eps).
            warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
            return float(acc.get_epsilon(delta))
    if accountant == "prv":
        acc = PRVAccountant()
        acc.history = entries
        # PRV's q = 1 path takes log(0) on purpose (masked out): silence numpy about it.
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(acc.get_epsilon(delta))
    raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")


def epsilon_for(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Epsilon after `rounds` identical rounds."""
    return epsilon_spent([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def should_stop(epsilon_spent: float, epsilon_budget: float) -> bool:
    """True once the budget is used up."""
    return epsilon_spent >= epsilon_budget


def can_run_round(
    history: Sequence[HistoryEntry],
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    epsilon_budget: float,
    accountant: AccountantName = "rdp",
) -> bool:
    """Whether one more round with these settings keeps epsilon within the budget; the hub asks
    this before opening a round, so a run never overshoots its budget."""
    after = epsilon_spent([*history, (noise_multiplier, sample_rate, 1)], delta, accountant)
    return not after > epsilon_budget


def rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    epsilon_budget: float,
    accountant: AccountantName = "rdp",
    max_rounds: int = 1_000_000,
) -> int:
    """The most rounds (<= max_rounds) whose epsilon stays within the budget (to plan a run)."""

    def within(rounds: int) -> bool:
        return epsilon_for(noise_multiplier, sample_rate, rounds, delta, accountant) <= (
            epsilon_budget
        )

    if not within(1):
        return 0
    if within(max_rounds):
        return max_rounds
    # epsilon grows with rounds: gallop to the first count over budget, then bisect.
    lo, hi = 1, 2
    while hi < max_rounds and within(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, max_rounds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


def noise_multiplier_for(
    epsilon_budget: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: AccountantName = "rdp",
) -> float:
    """The smallest noise multiplier (Opacus's search) that keeps `rounds` rounds within budget."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    from opacus.accountants.utils import get_noise_multiplier  # lazily: see epsilon_spent

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon_budget,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant=accountant,
        )
    )
