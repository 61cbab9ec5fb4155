"""Local training on a node: H inner AdamW steps from a model version, giving a pseudo-gradient.

The inner optimizer starts fresh every round (no state carried over), dropout is off and the data
stream is seeded, so the same (version, slice seed, H, thread count) reproduces the same
pseudo-gradient bit for bit on CPU: that is what makes a contribution auditable by replay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gridswarm.config import TrainConfig
from gridswarm.train.params import assign_flat, flatten

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LocalResult:
    pseudo_gradient: torch.Tensor  # theta_start - theta_end, flat fp32
    steps: int
    tokens: int
    loss_first: float
    loss_last: float
    loss_mean: float
    train_time_s: float


def loss_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def train_local(
    model: nn.Module,
    theta_start: torch.Tensor,
    stream: Iterator[Batch],
    steps: int,
    cfg: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> LocalResult:
    """`steps` AdamW steps from `theta_start`; `on_step(step, loss)` may raise to stop early."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    assign_flat(model, theta_start)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay, betas=(0.9, 0.95)
    )
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        if cfg.inner_warmup_steps:
            scale = min(1.0, (step + 1) / cfg.inner_warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = cfg.inner_lr * scale
        inputs, targets = next(stream)
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"inner loss became {value} at step {step}")
        losses.append(value)
        tokens += targets.numel()
        if on_step is not None:
            on_step(step, value)
    return LocalResult(
        pseudo_gradient=theta_start - flatten(model),
        steps=steps,
        tokens=tokens,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=sum(losses) / len(losses),
        train_time_s=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(model: nn.Module, theta: torch.Tensor, eval_set: list[Batch]) -> float:
    """Mean cross-entropy (nats per token) of `theta` on a fixed held-out set."""
    assign_flat(model, theta)
    model.eval()
    total = sum(loss_fn(model, x, y).item() for x, y in eval_set)
    return total / len(eval_set)
