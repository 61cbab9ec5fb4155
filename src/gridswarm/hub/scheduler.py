"""How much work each node gets: inner steps from its measured speed and the time left.

Speeds are in tokens per second for the run's model. A node's first estimate comes from its probe
(parameter-tokens per second on a reference model, divided by this model's size); afterwards an
exponential moving average of what it actually achieved. The fastest live node does the run's
`inner_steps`; slower nodes do proportionally fewer (but at least `min_inner_steps`), so all finish
near the same time (DyLU-style), and nobody is given more than fits before the round's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

EWMA_ALPHA = 0.5


def speed_from_probe(probe_rate: float, numel: int) -> float:
    """Tokens/s on a model of `numel` parameters, from parameter-tokens/s on the reference model."""
    return probe_rate / max(numel, 1)


def update_speed(previous_tokens_per_s: float | None, tokens: int, train_time_s: float) -> float:
    """Moving average of achieved tokens/s."""
    observed = tokens / max(train_time_s, 1e-6)
    if previous_tokens_per_s is None:
        return observed
    return EWMA_ALPHA * observed + (1 - EWMA_ALPHA) * previous_tokens_per_s


@dataclass(frozen=True)
class StepPlan:
    inner_steps: int
    expected_duration_s: float


def plan_inner_steps(
    tokens_per_s: float,
    fastest_tokens_per_s: float,
    tokens_per_step: int,
    inner_steps: int,
    min_inner_steps: int,
    time_left_s: float,
    reserve_s: float,
    work_share: float = 1.0,
) -> StepPlan | None:
    """Inner steps for one node, or None if not even `min_inner_steps` fit before the deadline.

    `work_share` in [0, 1] lets an energy policy shrink a node's work (1 = as much as speed allows).
    """
    steps = int(
        inner_steps_many(
            tokens_per_s,
            fastest_tokens_per_s,
            tokens_per_step,
            inner_steps,
            min_inner_steps,
            time_left_s,
            reserve_s,
            work_share,
        )
    )
    if steps == 0:
        return None
    return StepPlan(inner_steps=steps, expected_duration_s=steps * tokens_per_step / tokens_per_s)


def inner_steps_many(
    tokens_per_s: ArrayLike,
    fastest_tokens_per_s: ArrayLike,
    tokens_per_step: float,
    inner_steps: int,
    min_inner_steps: int,
    time_left_s: ArrayLike,
    reserve_s: float,
    work_share: ArrayLike = 1.0,
) -> np.ndarray:
    """`plan_inner_steps` for many nodes at once (arrays broadcast): the steps, 0 where none fit.

    One rule for the live hub (one node per request) and the simulator (every node each round).
    """
    tps = np.asarray(tokens_per_s, dtype=float)
    share = np.minimum(np.asarray(work_share, dtype=float), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.minimum(1.0, tps / np.maximum(fastest_tokens_per_s, tps))
        # however slow, a node gets at least min_inner_steps if they fit: else it could never join
        steps = np.maximum(np.rint(inner_steps * relative * share), min_inner_steps)
        in_time = np.floor(
            tps * np.maximum(np.subtract(time_left_s, reserve_s), 0.0) / tokens_per_step
        )
    steps = np.minimum(steps, in_time)
    fits = (tps > 0) & (share > 0) & (steps >= min_inner_steps)
    return np.where(fits, steps, 0).astype(np.int64)
