"""Corpora and deterministic data slices.

A node's batches in a round come from a generator seeded by (run seed, round, node, attempt), so the
hub (or a validator) can replay any contribution bit for bit from the same model version. A text
corpus is one tensor of byte tokens; a prepared dataset (train/dataset.py) is a list of token
shards, and a slice first picks `slice_shards` of them, so a node fetches only those.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from gridswarm.train.tokenizer import encode

BUNDLED = {"tinyshakespeare": "tinyshakespeare.txt"}


def read_text(dataset: str) -> str:
    """The text of a bundled dataset, a .txt file, or every .txt file under a folder (sorted)."""
    if dataset in BUNDLED:
        return resources.files("gridswarm.data").joinpath(BUNDLED[dataset]).read_text("utf-8")
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files under {path}")
        return "\n".join(f.read_text("utf-8", errors="replace") for f in files)
    if path.is_file():
        return path.read_text("utf-8", errors="replace")
    raise FileNotFoundError(f"dataset {dataset!r} is neither bundled nor an existing path")


@dataclass(frozen=True)
class Corpus:
    """Token ids split into a training part and a held-out evaluation part."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float, seq_len: int) -> Corpus:
        ids = encode(text)
        n_val = int(len(ids) * val_fraction)
        if len(ids) - n_val <= seq_len + 1 or n_val <= seq_len + 1:
            raise ValueError(
                f"corpus of {len(ids)} tokens is too small for seq_len {seq_len} "
                f"with val_fraction {val_fraction}"
            )
        return cls(train=ids[: len(ids) - n_val], val=ids[len(ids) - n_val :])

    def train_batches(self, seq_len: int, batch_size: int, seed: int) -> Iterator[Batch]:
        return batches(self.train, seq_len, batch_size, seed)

    def eval_batches(self, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
        return eval_batches(self.val, seq_len, batch_size, n_batches)


def slice_seed(run_seed: int, round_number: int, node_id: str, attempt: int = 0) -> int:
    """The seed of one node's data slice in one round: a stable 63-bit hash."""
    key = f"{run_seed}:{round_number}:{node_id}:{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


Batch = tuple[torch.Tensor, torch.Tensor]


def batches(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[Batch]:
    """An endless, deterministic stream of (inputs, targets) windows drawn from `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    high = len(tokens) - seq_len - 1
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        window = tokens[starts[:, None] + offsets].long()
        yield window[:, :-1], window[:, 1:]


def eval_batches(
    tokens: torch.Tensor, seq_len: int, batch_size: int, n_batches: int
) -> list[Batch]:
    """A fixed set of held-out batches, the same for every evaluation of a run."""
    stream = batches(tokens, seq_len, batch_size, seed=0)
    return [next(stream) for _ in range(n_batches)]


def shard_batches(
    shard_tokens: Sequence[int],
    open_shard: Callable[[int], np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    slice_shards: int,
) -> Iterator[Batch]:
    """An endless, deterministic stream of windows from token shards, none crossing a boundary.

    The slice first draws `slice_shards` distinct shards (weighted by how many windows each
    holds), then every row draws one of them and a start in it. Only the drawn shards are opened
    (`open_shard(i)`: fetched, verified, memory-mapped), so a node needs only its slice's shards.
    """
    generator = torch.Generator().manual_seed(seed)
    windows = torch.tensor([max(n - seq_len - 1, 0) for n in shard_tokens], dtype=torch.float64)
    usable = int((windows > 0).sum())
    if usable == 0:
        raise ValueError(f"no shard holds a window of seq_len {seq_len} + 1 tokens")
    chosen = torch.multinomial(windows, min(slice_shards, usable), generator=generator)
    arrays = {i: open_shard(i) for i in chosen.tolist()}  # fetched now, before training starts

    def stream() -> Iterator[Batch]:
        weights = windows[chosen]
        while True:
            drawn = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            picks = chosen[drawn]
            starts = torch.rand(batch_size, generator=generator, dtype=torch.float64)
            rows = [
                torch.from_numpy(arrays[i][s : s + seq_len + 1].astype(np.int64))
                for i, s in zip(
                    picks.tolist(), (starts * windows[picks]).long().tolist(), strict=True
                )
            ]
            window = torch.stack(rows)
            yield window[:, :-1], window[:, 1:]

    return stream()
