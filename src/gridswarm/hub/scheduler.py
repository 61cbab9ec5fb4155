"""How much work each node gets: inner steps from its measured speed and the time left.

Speeds are in tokens per second for the run's model. A node's first estimate comes from its probe
(parameter-tokens per second on a reference model, divided by this model's size); afterwards an
exponential moving average of what it actually achieved. The fastest live node does the run's
`inner_steps`; slower nodes do proportionally fewer (but at least `min_inner_steps`), so all finish
near the same time (DyLU-style), and nobody is given more than fits before the round's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if tokens_per_s <= 0 or work_share <= 0:
        return None
    relative = min(1.0, tokens_per_s / max(fastest_tokens_per_s, tokens_per_s))
    # however slow, a node gets at least min_inner_steps if they fit: else it could never join
    steps = max(round(inner_steps * relative * min(work_share, 1.0)), min_inner_steps)
    steps_in_time = int(tokens_per_s * max(time_left_s - reserve_s, 0.0) / tokens_per_step)
    steps = min(steps, steps_in_time)
    if steps < min_inner_steps:
        return None
    return StepPlan(inner_steps=steps, expected_duration_s=steps * tokens_per_step / tokens_per_s)
