"""Everything one process needs to train or evaluate a run: the model skeleton, the corpus and the
held-out set, built from the run's settings alone so hub, nodes and auditors agree exactly.
A prepared dataset (train/dataset.py) also sets the model's vocabulary; its shards are read
through a `BlobSource` (the hub's store, or a node's cache that fetches what a slice needs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from gridswarm.config import RunConfig
from gridswarm.train.data import Batch, Corpus, read_text, slice_seed
from gridswarm.train.dataset import BlobSource, PreparedCorpus, is_prepared
from gridswarm.train.fragments import FragmentBounds, fragment_bounds, fragment_of_round
from gridswarm.train.local import LocalResult, evaluate, train_local
from gridswarm.train.model import build_model, count_parameters
from gridswarm.train.params import flatten
from gridswarm.train.schedule import position_of
from gridswarm.train.tokenizer import VOCAB_SIZE

log = logging.getLogger("gridswarm.train")


@dataclass
class Workload:
    cfg: RunConfig
    model: nn.Module
    corpus: Corpus | PreparedCorpus
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def from_config(
        cls, cfg: RunConfig, text: str | None = None, source: BlobSource | None = None
    ) -> Workload:
        """Build the run's model and corpus; `text` replaces the run's dataset (federated mode);
        `source` holds or fetches the blobs of a `manifest:<sha256>` dataset."""
        t = cfg.train
        if text is None and is_prepared(cfg.data.dataset):
            if cfg.data.data == "local":
                raise ValueError("federated runs (data = 'local') train on byte-level text only")
            corpus = PreparedCorpus.open(cfg.data.dataset, source)
            corpus.check_fits(t.seq_len)
            vocab_size = corpus.manifest.vocab_size
        else:
            text = read_text(cfg.data.dataset) if text is None else text
            corpus = Corpus.from_text(text, cfg.data.val_fraction, t.seq_len)
            vocab_size = VOCAB_SIZE
        model = build_model(cfg.model, t.seq_len, cfg.seed, vocab_size)
        return cls(cfg=cfg, model=model, corpus=corpus, vocab_size=vocab_size)

    @property
    def numel(self) -> int:
        return count_parameters(self.model)

    @cached_property
    def fragments(self) -> list[FragmentBounds]:
        """Streaming DiLoCo's [start, end) ranges of the flat vector (one range: the whole)."""
        sizes = [p.numel() for p in self.model.parameters()]
        return fragment_bounds(sizes, self.cfg.comm.fragments)

    def fragment(self, round_number: int) -> FragmentBounds | None:
        """The range round `round_number` syncs, or None when every round syncs everything."""
        if self.cfg.comm.fragments == 1:
            return None
        return self.fragments[fragment_of_round(round_number, len(self.fragments))]

    def initial_theta(self) -> torch.Tensor:
        t = self.cfg.train
        return flatten(build_model(self.cfg.model, t.seq_len, self.cfg.seed, self.vocab_size))

    @cached_property
    def eval_set(self) -> list[Batch]:
        t = self.cfg.train
        return self.corpus.eval_batches(t.seq_len, t.batch_size, self.cfg.data.eval_batches)

    def batches(self, seed: int) -> Iterator[Batch]:
        """The deterministic stream of one slice (prepared datasets: of its drawn shards)."""
        t = self.cfg.train
        if isinstance(self.corpus, PreparedCorpus):
            return self.corpus.train_batches(
                t.seq_len, t.batch_size, seed, self.cfg.data.slice_shards
            )
        return self.corpus.train_batches(t.seq_len, t.batch_size, seed)

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
        used, so a replay can use the same). The inner lr follows the run's schedule at round
        `round_number` (train/schedule.py), so a replay of the same assignment uses the same."""
        t = self.cfg.train
        seed = slice_seed(self.cfg.seed, round_number, node_id, attempt)
        micro = micro_batch_size or t.micro_batch_size or t.batch_size
        position = position_of(self.cfg, round_number)
        while True:
            stream = self.batches(seed)
            try:
                return train_local(self.model, theta, stream, steps, t, on_step, micro, position)
            except torch.OutOfMemoryError:
                if not fit_memory or micro == 1:
                    raise
                micro //= 2
                log.warning("out of device memory: retrying with micro-batches of %d", micro)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
