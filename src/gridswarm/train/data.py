"""Corpora and deterministic data slices.

A node's batches in a round come from a generator seeded by (run seed, round, node, attempt), so the
hub (or a validator) can replay any contribution bit for bit from the same model version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


def slice_seed(run_seed: int, round_number: int, node_id: str, attempt: int = 0) -> int:
    """The seed of one node's data slice in one round: a stable 63-bit hash."""
    key = f"{run_seed}:{round_number}:{node_id}:{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def batches(
    tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of held-out batches, the same for every evaluation of a run."""
    stream = batches(tokens, seq_len, batch_size, seed=0)
    return [next(stream) for _ in range(n_batches)]
