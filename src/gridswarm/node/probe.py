"""What a node reports about itself: hardware, its training device, and its measured speed.

The speed is measured on the run's own model when the node knows the run (training a few steps
of it on random tokens on its device, with the run's micro-batches), so the hub plans inner steps
across CPU and GPU nodes from what each achieves on that model; otherwise on a small reference GPT.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from gridswarm.config import ModelConfig, TrainConfig
from gridswarm.protocol import Hardware
from gridswarm.train.device import device_class, synchronize
from gridswarm.train.local import train_local
from gridswarm.train.model import build_model, count_parameters, vocab_size_of
from gridswarm.train.params import flatten
from gridswarm.train.schedule import RunPosition

REFERENCE_MODEL = ModelConfig()  # the default small GPT
REFERENCE_TRAIN = TrainConfig(seq_len=64, batch_size=16)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return 0.0


def hardware(device: torch.device | None = None) -> Hardware:
    """This machine, and the device the node trains on with its memory in GB."""
    device = device or torch.device("cpu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device_memory_gb = memory_gb()
    if device.type == "cuda":
        device_memory_gb = round(torch.cuda.get_device_properties(device).total_memory / 1024**3, 1)
    return Hardware(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        memory_gb=memory_gb(),
        gpu=gpu,
        torch=torch.__version__,
        device=device_class(device),
        device_memory_gb=device_memory_gb,
    )


def probe_speed(
    model: torch.nn.Module | None = None,
    train: TrainConfig = REFERENCE_TRAIN,
    device: torch.device | None = None,
    steps: int = 3,
) -> tuple[float, int]:
    """(tokens/s, parameters) of `steps` training steps of `model` (default: the reference GPT)
    on `device`, after one warm-up step; random tokens, so it needs no data."""
    device = device or torch.device("cpu")
    if model is None:
        model = build_model(REFERENCE_MODEL, train.seq_len, seed=0)
    model.to(device)
    vocab = vocab_size_of(model)
    g = torch.Generator().manual_seed(0)
    shape = (train.batch_size, train.seq_len)

    def stream():
        while True:
            x = torch.randint(0, vocab, shape, generator=g)
            yield x, x

    theta = flatten(model).cpu()
    start = RunPosition(0, 1)  # a schedule's first lr: the speed does not depend on it
    train_local(model, theta, stream(), 1, train, position=start)
    synchronize(device)
    started = time.perf_counter()
    result = train_local(model, theta, stream(), steps, train, position=start)
    synchronize(device)
    return result.tokens / (time.perf_counter() - started), count_parameters(model)
