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
    """One outer step: buf = mu*buf + g; update = lr * (g + mu*buf).

    Written in place on two new buffers (the same IEEE operations, so the same bits) because
    the hub applies it to whole models: no third model-sized temporary."""
    buf = pseudo_gradient.clone() if momentum is None else (momentum * mu).add_(pseudo_gradient)
    update = (buf * mu).add_(pseudo_gradient).mul_(lr)
    return OuterStep(update=update, momentum=buf)


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
    fragment: tuple[int, int] | None = None,
) -> OuterUpdate:
    """The hub's close after aggregation: a Nesterov step, compressed for download with error
    feedback; the weights move by exactly what nodes will decode, so hub and nodes agree. The
    hub's `_close` and `bench/robustness.py` both call this.

    `fragment` = [start, end) (Streaming DiLoCo): `pseudo_gradient` holds that slice only; the
    step, momentum and residual update only that slice (the rest is unchanged) and the delta
    encodes only the slice's end - start values. `theta`, momentum and residual stay full vectors.
    """
    if fragment is None:
        step = nesterov_step(pseudo_gradient, momentum, lr, mu)
        feedback = ErrorFeedback(make_codec(codec_down, block_size), residual)
        encoded = feedback.encode(step.update)
        momentum_new = step.momentum
        del step  # the update is in `encoded` and the residual now: free it before the weights
        theta_new = theta - feedback.codec.decode(encoded, theta.numel())
        assert feedback.residual is not None
        return OuterUpdate(theta_new, encoded, momentum_new, feedback.residual)
    start, end = fragment
    if not 0 <= start < end <= theta.numel() or pseudo_gradient.numel() != end - start:
        raise ValueError(
            f"fragment [{start}, {end}) does not fit {theta.numel()} weights and a "
            f"{pseudo_gradient.numel()}-value pseudo-gradient"
        )
    part = slice(start, end)
    inner = outer_update(
        theta[part],
        pseudo_gradient,
        None if momentum is None else momentum[part],
        None if residual is None else residual[part],
        lr=lr,
        mu=mu,
        codec_down=codec_down,
        block_size=block_size,
    )
    theta_new, momentum_new = theta.clone(), _full_or_zeros(momentum, theta)
    residual_new = _full_or_zeros(residual, theta)
    theta_new[part], momentum_new[part], residual_new[part] = (
        inner.theta,
        inner.momentum,
        inner.residual,
    )
    return OuterUpdate(theta_new, inner.delta, momentum_new, residual_new)


def _full_or_zeros(vector: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A copy of `vector`, or zeros shaped like `like` when there is none yet."""
    return torch.zeros_like(like) if vector is None else vector.clone()
