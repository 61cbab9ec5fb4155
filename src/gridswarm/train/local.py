"""Local training on a node: H inner AdamW steps from a model version, giving a pseudo-gradient.

The inner optimizer starts fresh every round (no state carried over), dropout is off and the data
stream is seeded, so the same (version, slice seed, H, thread count, micro-batch size) reproduces
the same pseudo-gradient bit for bit on CPU: that is what makes a contribution auditable by replay.

On a GPU the same loop runs under bf16 autocast; each batch may be split into micro-batches whose
gradients are accumulated (the mean over the whole batch, up to float rounding), so a node fits
the batch to its memory, and activation checkpointing trades compute for memory further.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gridswarm.config import TrainConfig
from gridswarm.train.model import set_activation_checkpointing
from gridswarm.train.params import assign_flat, flatten
from gridswarm.train.schedule import RunPosition, inner_lr_at

Batch = tuple[torch.Tensor, torch.Tensor]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class LocalResult:
    pseudo_gradient: torch.Tensor  # theta_start - theta_end, flat fp32 on the CPU
    steps: int
    tokens: int
    loss_first: float
    loss_last: float
    loss_mean: float
    train_time_s: float
    micro_batch_size: int  # samples per forward/backward actually used


def loss_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def accumulate_gradients(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, micro_batch_size: int
) -> float:
    """Backward of the batch's mean loss, `micro_batch_size` rows at a time; returns the loss.

    Each micro-batch's mean loss is weighted by its share of the rows, so the accumulated
    gradient is the full batch's gradient up to float rounding (and bit-identical to it when
    one micro-batch holds the whole batch)."""
    rows = inputs.shape[0]
    if micro_batch_size >= rows:
        with autocast_for(inputs.device):
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        return loss.item()
    total = torch.zeros((), device=inputs.device)
    for x, y in zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True):
        with autocast_for(inputs.device):
            loss = loss_fn(model, x, y) * (x.shape[0] / rows)
        loss.backward()
        total += loss.detach()
    return total.item()


def train_local(
    model: nn.Module,
    theta_start: torch.Tensor,
    stream: Iterator[Batch],
    steps: int,
    cfg: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    micro_batch_size: int | None = None,
    position: RunPosition | None = None,
) -> LocalResult:
    """`steps` AdamW steps from `theta_start` on the model's device; `on_step(step, loss)` may
    raise to stop early. `micro_batch_size` overrides the run's (None: the run's, or the batch).
    `position`: the first step's place in the run, for a decaying lr schedule (train/schedule.py;
    None only with the constant one)."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    micro = micro_batch_size or cfg.micro_batch_size or cfg.batch_size
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    assign_flat(model, theta_start)
    model.train()
    optimizer = inner_optimizer(model, cfg)
    started = time.perf_counter()
    losses, tokens = inner_steps(
        model, optimizer, stream, steps, cfg, micro, on_step, position=position
    )
    return LocalResult(
        pseudo_gradient=theta_start - flatten(model).to(CPU),
        steps=steps,
        tokens=tokens,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=sum(losses) / len(losses),
        train_time_s=time.perf_counter() - started,
        micro_batch_size=min(micro, cfg.batch_size),
    )


def inner_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The inner AdamW over the model's parameters, as every round's training builds it."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay, betas=(0.9, 0.95)
    )


def inner_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Iterator[Batch],
    steps: int,
    cfg: TrainConfig,
    micro_batch_size: int,
    on_step: Callable[[int, float], None] | None = None,
    first_step: int = 0,
    position: RunPosition | None = None,
) -> tuple[list[float], int]:
    """`steps` optimizer steps on the model as it is; returns (losses, tokens trained).

    `first_step`: how many steps this optimizer has taken before (the warm-up continues from
    there; Streaming DiLoCo keeps one optimizer across rounds). `position`: the run-wide place
    of this call's first step, which a decaying `train.lr_schedule` needs (train/schedule.py).
    `on_step(step, loss)` gets the step's index within this call and may raise to stop."""
    device = next(model.parameters()).device
    losses: list[float] = []
    tokens = 0
    scheduled = cfg.inner_warmup_steps > 0 or cfg.lr_schedule != "constant"
    for step in range(steps):
        if scheduled:
            at = None if position is None else RunPosition(position.step + step, position.total)
            lr = inner_lr_at(cfg, first_step + step, at)
            for group in optimizer.param_groups:
                group["lr"] = lr
        inputs, targets = next(stream)
        optimizer.zero_grad(set_to_none=True)
        value = accumulate_gradients(model, inputs.to(device), targets.to(device), micro_batch_size)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if not math.isfinite(value):
            raise FloatingPointError(f"inner loss became {value} at step {first_step + step}")
        losses.append(value)
        tokens += targets.numel()
        if on_step is not None:
            on_step(step, value)
    return losses, tokens


@torch.no_grad()
def evaluate(model: nn.Module, theta: torch.Tensor, eval_set: list[Batch]) -> float:
    """Mean cross-entropy (nats per token) of `theta` on a fixed held-out set."""
    assign_flat(model, theta)
    model.eval()
    device = next(model.parameters()).device
    with autocast_for(device):
        total = sum(loss_fn(model, x.to(device), y.to(device)).item() for x, y in eval_set)
    return total / len(eval_set)
