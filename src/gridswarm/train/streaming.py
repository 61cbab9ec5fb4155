"""A node's persistent local state in a Streaming DiLoCo run (`comm.fragments > 1` or
`comm.overlap`): its local weights (held in the run's model) and its inner AdamW, kept across
rounds, and the model version its anchors come from.

Classic DiLoCo starts every round from the published weights with a fresh optimizer. Streaming
DiLoCo keeps training the node's own copy: a round syncs one fragment (train/fragments.py), so
when version v arrives the node merges only the fragment that version v's round synced
(`local[g] = mix * local[g] + (1 - mix) * global_v[g]`, mix = 0 without overlap) and keeps the
rest of its local progress. Its upload for round r is `global_v[f] - local[f]` of fragment
f = r % fragments: fragment f of the global model changes only when f is synced, so global_v[f]
is the anchor the node's local fragment drifted from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gridswarm.train.data import Batch
from gridswarm.train.fragments import FragmentBounds
from gridswarm.train.local import CPU, inner_optimizer, inner_steps
from gridswarm.train.model import set_activation_checkpointing
from gridswarm.train.params import assign_flat, flatten
from gridswarm.train.schedule import position_of
from gridswarm.train.workload import Workload


@dataclass
class Progress:
    """Inner steps trained toward one contribution (possibly in two parts: ahead and rest)."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    compute_s: float = 0.0  # seconds spent in inner steps (throttle sleeps included)

    @property
    def steps(self) -> int:
        return len(self.losses)


class LocalState:
    """The node's own weights and inner optimizer for one run, kept across rounds."""

    def __init__(self, workload: Workload, theta: torch.Tensor, version: int) -> None:
        """Start from the published weights `theta` of `version` with a fresh optimizer."""
        self.workload = workload
        self.version = version  # the version whose fragments the local weights are anchored to
        cfg = workload.cfg.train
        self.micro_batch_size = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
        model = workload.model
        set_activation_checkpointing(model, cfg.activation_checkpointing)
        assign_flat(model, theta)
        model.train()
        self.optimizer = inner_optimizer(model, cfg)
        self.steps_taken = 0  # by this optimizer: the warm-up continues across rounds

    def theta(self) -> torch.Tensor:
        """The local weights as a flat fp32 CPU vector (a copy)."""
        return flatten(self.workload.model).to(CPU)

    def merge(
        self,
        global_theta: torch.Tensor,
        fragment: FragmentBounds | None,
        mix: float,
        version: int,
    ) -> None:
        """Take fragment `fragment` (None: all) from `global_theta` of `version`:
        local <- mix * local + (1 - mix) * global there (mix = 0 copies it exactly)."""
        if not 0.0 <= mix < 1.0:
            raise ValueError(f"mix must be in [0, 1), got {mix}")
        local = self.theta()
        start, end = fragment or (0, local.numel())
        if mix == 0.0:
            local[start:end] = global_theta[start:end]
        else:
            local[start:end] = mix * local[start:end] + (1.0 - mix) * global_theta[start:end]
        assign_flat(self.workload.model, local)
        self.version = version

    def train(
        self,
        stream: Iterator[Batch],
        steps: int,
        progress: Progress,
        round_number: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        """`steps` more inner steps from where the local state is, recorded in `progress`, toward
        round `round_number`'s contribution (its lr schedule position: the round and the steps
        `progress` already holds; the warm-up counts this optimizer's steps)."""
        position = position_of(self.workload.cfg, round_number, progress.steps)
        started = time.perf_counter()
        try:
            losses, tokens = inner_steps(
                self.workload.model,
                self.optimizer,
                stream,
                steps,
                self.workload.cfg.train,
                self.micro_batch_size,
                on_step,
                self.steps_taken,
                position,
            )
        finally:
            progress.compute_s += time.perf_counter() - started
        self.steps_taken += steps
        progress.losses.extend(losses)
        progress.tokens += tokens

    def pseudo_gradient(
        self, global_theta: torch.Tensor, fragment: FragmentBounds | None
    ) -> torch.Tensor:
        """What round's upload carries: global[f] - local[f] (the whole vector when None)."""
        local = self.theta()
        start, end = fragment or (0, local.numel())
        return global_theta[start:end] - local[start:end]
