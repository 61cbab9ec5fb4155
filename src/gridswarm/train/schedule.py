"""The inner learning rate over a run: a linear warm-up, times a schedule over the whole run.

`train.lr_schedule = "constant"` keeps the inner lr at `train.inner_lr` after the warm-up (the
behaviour before schedules existed, bit for bit). `"cosine"` decays it over the whole run, from
`inner_lr` at the run's first step to `min_lr_ratio * inner_lr` at its last, as DiLoCo's papers
do. The warm-up multiplies in unchanged: it counts the steps of the optimizer (a fresh one every
round, or the node's kept one), the schedule counts the run's steps.

The run's step of an inner step is `round * train.inner_steps + (steps before it in the
round's contribution)`, over `budget.rounds * train.inner_steps` steps in all. It is a pure
function of the assignment (round number, the step's index in it) and the run's settings, so
every node and the hub's replay audit compute the same lr for the same assignment. A node
planned fewer steps than `train.inner_steps` (a slower one) simply stops earlier on the same
curve. A run with no `budget.rounds` (a token budget alone) has no defined total and is refused
"cosine" when it is created (config.py). A run ended early (its token budget or privacy budget
reached first) stops before its lr has decayed all the way.

The cosine is evaluated with IEEE-754 additions and multiplications only (a fixed Taylor
polynomial, not the platform's libm `cos`), so the lr is the same double on every machine: a CPU
replay on the hub stays bit-exact with the node's run whatever libm either has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gridswarm.config import RunConfig, TrainConfig

# cos(x) = sum_k (-1)^k x^(2k) / (2k)!, for x in [0, pi/2]: 13 terms leave < 1e-21 (x^26/26!)
_COS_TERMS = tuple((-1) ** k / math.factorial(2 * k) for k in range(13))


@dataclass(frozen=True)
class RunPosition:
    """Where a call's first inner step sits in the run: its run-wide step index `step` of
    `total` steps (`schedule_total_steps`)."""

    step: int
    total: int

    def __post_init__(self) -> None:
        if self.total <= 0 or self.step < 0:
            raise ValueError(f"a run position needs 0 <= step and 0 < total, got {self}")


def schedule_total_steps(cfg: RunConfig) -> int | None:
    """The run's inner steps per node in all, `budget.rounds * train.inner_steps`; None when
    the run has no round budget (only a constant schedule runs then)."""
    if cfg.budget.rounds is None:
        return None
    return cfg.budget.rounds * cfg.train.inner_steps


def position_of(cfg: RunConfig, round_number: int, done: int = 0) -> RunPosition | None:
    """The position of the first step of round `round_number`'s contribution after `done`
    steps of it were trained; None when the run has no round budget."""
    total = schedule_total_steps(cfg)
    if total is None:
        return None
    return RunPosition(round_number * cfg.train.inner_steps + done, total)


def _cos_half_turn(x: float) -> float:
    """cos(x) for x in [0, pi/2] by Horner's rule on the Taylor polynomial in x^2."""
    x2 = x * x
    value = 0.0
    for coefficient in reversed(_COS_TERMS):
        value = value * x2 + coefficient
    return value


def cosine_factor(step: int, total: int, min_lr_ratio: float) -> float:
    """min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * step / total)) / 2, clamped to
    [min_lr_ratio, 1]: 1 at step 0, min_lr_ratio from step `total` on (later steps stay there)."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    step = min(max(step, 0), total)
    if 2 * step <= total:  # cos on [0, pi/2]
        cos = _cos_half_turn(math.pi * (step / total))
    else:  # cos(pi t) = -cos(pi (1 - t)), with 1 - t = (total - step) / total exactly
        cos = -_cos_half_turn(math.pi * ((total - step) / total))
    value = min_lr_ratio + (1.0 - min_lr_ratio) * (0.5 * (1.0 + cos))
    return min(1.0, max(min_lr_ratio, value))


def inner_lr_at(cfg: TrainConfig, optimizer_step: int, position: RunPosition | None) -> float:
    """The inner lr of one step: `optimizer_step` is how many steps the optimizer took before
    it (the warm-up's count), `position` the step's place in the run (None: the constant
    schedule's lr; refused for "cosine"). The constant schedule's lr is the warm-up's
    `inner_lr * min(1, (optimizer_step + 1) / inner_warmup_steps)` exactly as before."""
    lr = cfg.inner_lr
    if cfg.inner_warmup_steps:
        lr = cfg.inner_lr * min(1.0, (optimizer_step + 1) / cfg.inner_warmup_steps)
    if cfg.lr_schedule == "constant":
        return lr
    if position is None:
        raise ValueError(f"lr_schedule {cfg.lr_schedule!r} needs the step's place in the run")
    return lr * cosine_factor(position.step, position.total, cfg.min_lr_ratio)
