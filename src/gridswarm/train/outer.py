"""The outer optimizer: SGD with Nesterov momentum over the aggregated pseudo-gradient (DiLoCo).

Pure tensor arithmetic with the same update rule as torch.optim.SGD(nesterov=True), on flat vectors,
so the hub can keep its state in blobs and apply it after a restart with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gridswarm.train.codecs import chunk_alignment, concat_encodings, make_codec


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


# values per piece of the hub's outer step: its temporaries are a few pieces, not a few models
CHUNK_VALUES = 1 << 22  # 16 MiB of fp32


def outer_update(
    theta: torch.Tensor,
    pseudo_gradient: torch.Tensor,
    momentum: torch.Tensor | None,
    residual: torch.Tensor | None,
    **options: Any,
) -> OuterUpdate:
    """`outer_update_` (its keyword `options`: lr, mu, codec_down, block_size, fragment) on
    copies: the inputs are left as they were (benchmarks and tests that keep the old weights;
    the hub, which does not, calls `outer_update_`)."""
    return outer_update_(
        theta.clone(),
        pseudo_gradient,
        None if momentum is None else momentum.clone(),
        None if residual is None else residual.clone(),
        **options,
    )


def outer_update_(
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
    chunk_values: int = CHUNK_VALUES,
) -> OuterUpdate:
    """The hub's close after aggregation, in place: a Nesterov step (`nesterov_step`),
    compressed for download with error feedback (`ErrorFeedback`); the weights move by exactly
    what nodes will decode, so hub and nodes agree. The hub's `_close`, and through
    `outer_update` `bench/robustness.py` and `bench/communication.py`, call this.

    `theta`, and `momentum` and `residual` when given, are overwritten with their new values
    and returned in the `OuterUpdate` (a missing momentum or residual starts as a new vector).
    When the down-codec encodes independent pieces (`codecs.chunk_alignment`: fp32, fp16, the
    blockwise int8/int4) the step runs piece by piece of about `chunk_values` values, so its
    temporaries are a few pieces, not a few models (the step over whole vectors held five or
    more model-sized temporaries at once); the bits are those of one step over the whole vector.

    `fragment` = [start, end) (Streaming DiLoCo): `pseudo_gradient` holds that slice only; the
    step, momentum and residual update only that slice (the rest is unchanged) and the delta
    encodes only the slice's end - start values. `theta`, momentum and residual stay full vectors.
    """
    start, end = (0, theta.numel()) if fragment is None else fragment
    if not 0 <= start < end <= theta.numel() or pseudo_gradient.numel() != end - start:
        raise ValueError(
            f"fragment [{start}, {end}) does not fit {theta.numel()} weights and a "
            f"{pseudo_gradient.numel()}-value pseudo-gradient"
        )
    codec = make_codec(codec_down, block_size)
    align = chunk_alignment(codec)
    piece = end - start if align is None else max(align, chunk_values // align * align)
    momentum_new = torch.zeros_like(theta) if momentum is None else momentum
    residual_new = torch.zeros_like(theta) if residual is None else residual
    encoded: list[dict[str, torch.Tensor]] = []
    for offset in range(0, end - start, piece):
        g = pseudo_gradient[offset : offset + piece]
        at = slice(start + offset, start + offset + g.numel())
        buf = momentum_new[at]  # buf = mu * buf + g (g itself on the first step)
        if momentum is None:
            buf.copy_(g)
        else:
            buf.mul_(mu).add_(g)
        update = (buf * mu).add_(g).mul_(lr)  # lr * (g + mu * buf)
        target = update if residual is None else update.add_(residual_new[at])
        encoded.append(codec.encode(target))
        decoded = codec.decode(encoded[-1], g.numel())
        torch.sub(target, decoded, out=residual_new[at])  # carried to the next close
        theta[at].sub_(decoded)
    delta = encoded[0] if len(encoded) == 1 else concat_encodings(encoded)
    return OuterUpdate(theta, delta, momentum_new, residual_new)
