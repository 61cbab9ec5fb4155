"""Model weights as one flat fp32 vector, and the safetensors framing every blob uses.

Flat vectors make codecs, aggregators and the outer optimizer shape-agnostic: a model version, a
pseudo-gradient and the outer momentum are each one tensor of `numel` floats in the model's
parameter order.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class BlobFormatError(ValueError):
    """Bytes that are not a well-formed gridswarm blob."""


def flatten(model: nn.Module) -> torch.Tensor:
    """All trainable parameters (tied ones once) as one new fp32 vector."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@torch.no_grad()
def assign_flat(model: nn.Module, theta: torch.Tensor) -> None:
    """Copy the flat vector `theta` into the model's parameters, in place."""
    numel = sum(p.numel() for p in model.parameters())
    if theta.numel() != numel:
        raise ValueError(f"flat vector has {theta.numel()} values, model has {numel} parameters")
    offset = 0
    for p in model.parameters():
        p.copy_(theta[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def named_tensors(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """`theta` split into the model's named parameters (for export)."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return out


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, object] | None = None) -> bytes:
    """Serialise tensors (+ JSON metadata) as safetensors bytes; same input, same bytes."""
    meta = {"gridswarm": json.dumps(metadata or {}, sort_keys=True, separators=(",", ":"))}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Inverse of `pack`; raises BlobFormatError on anything malformed."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = json.loads(header.get("__metadata__", {}).get("gridswarm", "{}"))
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise BlobFormatError(f"not a safetensors blob: {exc}") from exc
    if not isinstance(metadata, dict):
        raise BlobFormatError("blob metadata is not a JSON object")
    return tensors, metadata


def pack_vector(theta: torch.Tensor, metadata: dict[str, object] | None = None) -> bytes:
    return pack({"theta": theta.float()}, metadata)


def unpack_vector(data: bytes) -> torch.Tensor:
    tensors, _ = unpack(data)
    if "theta" not in tensors:
        raise BlobFormatError("blob has no 'theta' tensor")
    return tensors["theta"]
