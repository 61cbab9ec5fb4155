"""The outer optimizer: SGD with Nesterov momentum over the aggregated pseudo-gradient (DiLoCo).

Pure tensor arithmetic with the same update rule as torch.optim.SGD(nesterov=True), on flat vectors,
so the hub can keep its state in blobs and apply it after a restart with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridswarm.train.codecs import ErrorFeedback, make_codec


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


@dataclass(frozen=True)
class OuterUpdate:
    """What a round's close publishes: the new weights, the compressed delta nodes download,
    and the state the next close needs (momentum, down-codec residual)."""

    theta: torch.Tensor
    delta: dict[str, torch.Tensor]  # `codec_down` encoding of the step (theta_old - theta_new)
    momentum: torch.Tensor
    residual: torch.Tensor


def outer_update(
    theta: torch.Tensor,
    pseudo_gradient: torch.Tensor,
    momentum: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    lr: float,
    mu: float,
    codec_down: str,
    block_size: int,
) -> OuterUpdate:
    """The hub's close after aggregation: a Nesterov step, compressed for download with error
    feedback; the weights move by exactly what nodes will decode, so hub and nodes agree. The
    hub's `_close` and `bench/robustness.py` both call this."""
    step = nesterov_step(pseudo_gradient, momentum, lr, mu)
    feedback = ErrorFeedback(make_codec(codec_down, block_size), residual)
    encoded = feedback.encode(step.update)
    theta_new = theta - feedback.codec.decode(encoded, theta.numel())
    assert feedback.residual is not None
    return OuterUpdate(theta_new, encoded, step.momentum, feedback.residual)
