"""Everything one process needs to train or evaluate a run: the model skeleton, the corpus and the
held-out set, built from the run's settings alone so hub, nodes and auditors agree exactly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from gridswarm.config import RunConfig
from gridswarm.train.data import Corpus, batches, eval_batches, read_text, slice_seed
from gridswarm.train.local import LocalResult, evaluate, train_local
from gridswarm.train.model import build_model, count_parameters
from gridswarm.train.params import flatten

log = logging.getLogger("gridswarm.train")


@dataclass
class Workload:
    cfg: RunConfig
    model: nn.Module
    corpus: Corpus

    @classmethod
    def from_config(cls, cfg: RunConfig, text: str | None = None) -> Workload:
        """Build the run's model and corpus; `text` replaces the run's dataset (federated mode)."""
        corpus = Corpus.from_text(
            read_text(cfg.data.dataset) if text is None else text,
            cfg.data.val_fraction,
            cfg.train.seq_len,
        )
        return cls(
            cfg=cfg, model=build_model(cfg.model, cfg.train.seq_len, cfg.seed), corpus=corpus
        )

    @property
    def numel(self) -> int:
        return count_parameters(self.model)

    def initial_theta(self) -> torch.Tensor:
        fresh = build_model(self.cfg.model, self.cfg.train.seq_len, self.cfg.seed)
        return flatten(fresh)

    @cached_property
    def eval_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.cfg.train
        return eval_batches(self.corpus.val, t.seq_len, t.batch_size, self.cfg.data.eval_batches)

    def evaluate(self, theta: torch.Tensor) -> float:
        return evaluate(self.model, theta, self.eval_set)

    def to(self, device: torch.device) -> Workload:
        """Train on `device` from now on (the model moves; vectors stay on the CPU)."""
        self.model.to(device)
        return self

    def train(
        self,
        theta: torch.Tensor,
        round_number: int,
        node_id: str,
        steps: int,
        attempt: int = 0,
        on_step=None,
        micro_batch_size: int | None = None,
        fit_memory: bool = False,
    ) -> LocalResult:
        """The work of one assignment: `steps` inner steps on the node's deterministic slice.

        `fit_memory`: on running out of device memory, halve the micro-batch and start the
        assignment again (a node fitting the batch to its memory; the result records the size
        used, so a replay can use the same)."""
        t = self.cfg.train
        seed = slice_seed(self.cfg.seed, round_number, node_id, attempt)
        micro = micro_batch_size or t.micro_batch_size or t.batch_size
        while True:
            stream = batches(self.corpus.train, t.seq_len, t.batch_size, seed)
            try:
                return train_local(self.model, theta, stream, steps, t, on_step, micro)
            except torch.OutOfMemoryError:
                if not fit_memory or micro == 1:
                    raise
                micro //= 2
                log.warning("out of device memory: retrying with micro-batches of %d", micro)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
