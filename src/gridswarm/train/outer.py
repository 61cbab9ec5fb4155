"""The outer optimizer: SGD with Nesterov momentum over the aggregated pseudo-gradient (DiLoCo).

Pure tensor arithmetic with the same update rule as torch.optim.SGD(nesterov=True), on flat vectors,
so the hub can keep its state in blobs and apply it after a restart with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OuterStep:
    update: torch.Tensor  # what to subtract from the weights
    momentum: torch.Tensor  # the new momentum buffer


def nesterov_step(
    pseudo_gradient: torch.Tensor, momentum: torch.Tensor | None, lr: float, mu: float
) -> OuterStep:
    """One outer step: buf = mu*buf + g; update = lr * (g + mu*buf)."""
    buf = pseudo_gradient.clone() if momentum is None else mu * momentum + pseudo_gradient
    return OuterStep(update=lr * (pseudo_gradient + mu * buf), momentum=buf)
