"""Byte-level tokenizer: every UTF-8 byte is a token, so any text file trains with no vocabulary
to build or ship, and a node's private text never needs to be seen by anyone to be tokenised."""

from __future__ import annotations

import torch

VOCAB_SIZE = 256


def encode(text: str) -> torch.Tensor:
    """Token ids (uint8) of `text`."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of token ids; invalid UTF-8 (a sample cut mid-character) is replaced, not raised."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(int(i) for i in values).decode("utf-8", errors="replace")
