"""Which torch device a process trains on, and the device class replays must match."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:i` or `mps`; ValueError naming
    what is wrong when the device does not exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ValueError("device mps: this machine has no MPS backend")
        return torch.device("mps")
    if kind != "cuda":
        raise ValueError(f"device {name!r}: want auto, cpu, cuda, cuda:INDEX or mps")
    count = torch.cuda.device_count()
    if index and not index.isdigit():
        raise ValueError(f"device {name!r}: the CUDA index must be a number")
    i = int(index or 0)
    if i >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return torch.device("cuda", i)


def device_class(device: torch.device) -> str:
    """What replays must match to be comparable: `cpu`, or the accelerator's model name."""
    if device.type == "cuda":
        return f"cuda/{torch.cuda.get_device_name(device)}"
    return device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
