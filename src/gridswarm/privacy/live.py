"""What hub and node must agree on to run secure aggregation and DP in live rounds.

Pure functions of the run's settings: the SecAgg session name and clip range of a round, the
vector a node masks (weighted, clipped, noised as the run says), and the denominator the hub
divides the recovered sum by. Both sides call these, so neither can drift from the other, and a
node checks the hub's round config against them before it reveals anything.
"""

from __future__ import annotations

import torch

from gridswarm.config import RunConfig
from gridswarm.privacy.dp import clip_updates, privatize_node_update
from gridswarm.privacy.dp import secagg_clip_range as dp_secagg_clip_range
from gridswarm.privacy.secagg import SecAggConfig, SecAggError

# The codec a SecAgg contribution claims: masked 32-bit words (no compression survives masking).
SECAGG_CODEC = "secagg-u32"


def session_name(run_id: str, round_number: int, attempt: int) -> str:
    """The SecAgg session of one round attempt: binds every key and mask to it."""
    return f"{run_id}/{round_number}/{attempt}"


def tokens_ref(cfg: RunConfig) -> int:
    """Tokens of a full assignment: a node scales its update by tokens / tokens_ref (<= 1)."""
    return cfg.train.inner_steps * cfg.tokens_per_step


def min_noisy_nodes(cfg: RunConfig, n_nodes: int) -> int:
    """Survivors guaranteed under SecAgg (n - t): distributed noise is sized for them."""
    t = cfg.privacy.secagg.max_dropouts if cfg.privacy.secagg else 0
    return max(1, n_nodes - t)


def clip_range(cfg: RunConfig, n_nodes: int) -> float:
    """SecAgg's per-coordinate clip range R for a round of `n_nodes`."""
    if cfg.privacy.secagg is None:
        raise ValueError("clip_range is for runs with privacy.secagg")
    dp = cfg.privacy.dp
    if dp is None:
        return cfg.privacy.secagg.clip_range
    if dp.noise == "central":
        return dp.clip_norm  # |coordinate| <= L2 norm <= C
    return dp_secagg_clip_range(dp.clip_norm, dp.noise_multiplier, min_noisy_nodes(cfg, n_nodes))


def node_vector(
    cfg: RunConfig,
    pseudo_gradient: torch.Tensor,
    tokens: int,
    n_nodes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """What a node feeds into SecAgg: without DP its update weighted by tokens / tokens_ref (the
    hub divides the sum by the survivors' total weight: the token-weighted mean); with DP its
    update clipped to C, plus its share of the noise when the noise is distributed."""
    dp = cfg.privacy.dp
    if dp is None:
        return pseudo_gradient * (tokens / tokens_ref(cfg))
    if dp.noise == "central":
        return clip_updates(pseudo_gradient, dp.clip_norm)[0]
    return privatize_node_update(
        pseudo_gradient,
        dp.clip_norm,
        dp.noise_multiplier,
        min_noisy_nodes(cfg, n_nodes),
        generator,
    )


def sum_denominator(cfg: RunConfig, survivor_tokens: list[int], n_nodes: int) -> float:
    """What the recovered sum is divided by: the survivors' total weight (no DP), or the fixed
    number of the round's SecAgg participants (DP-FedAvg's fixed denominator)."""
    if cfg.privacy.dp is None:
        return sum(survivor_tokens) / tokens_ref(cfg)
    return float(n_nodes)


def check_round_config(
    config: SecAggConfig,
    cfg: RunConfig,
    run_id: str,
    round_number: int,
    attempt: int,
    node_id: str,
    numel: int,
) -> None:
    """A node's check of the hub's round config before it shares anything: a hub that raised the
    dropout tolerance, shrank the graph or the participant set could unmask single updates."""
    sa = cfg.privacy.secagg
    if sa is None:
        raise SecAggError("this run does not use secure aggregation")
    n = len(config.node_ids)
    problems = []
    if config.session != session_name(run_id, round_number, attempt):
        problems.append(f"session {config.session!r} is not this round's")
    if node_id not in config.node_ids:
        problems.append("this node is not a participant")
    if n < max(2, cfg.round.quorum):
        problems.append(f"{n} participants, fewer than the quorum {cfg.round.quorum}")
    if config.max_dropouts != sa.max_dropouts:
        problems.append(f"max_dropouts {config.max_dropouts} != the run's {sa.max_dropouts}")
    if config.n_neighbours != sa.neighbours:
        problems.append(f"n_neighbours {config.n_neighbours} != the run's {sa.neighbours}")
    if config.vector_length != numel:
        problems.append(f"vector_length {config.vector_length} != the model's {numel}")
    if config.clip_range != clip_range(cfg, n):
        problems.append(f"clip_range {config.clip_range} != {clip_range(cfg, n)}")
    if problems:
        raise SecAggError("refusing the hub's SecAgg round config: " + "; ".join(problems))
