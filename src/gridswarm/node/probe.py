"""What a node reports about itself: hardware, and its speed on a fixed reference model."""

from __future__ import annotations

import os
import platform
import time

import torch

from gridswarm.config import ModelConfig, TrainConfig
from gridswarm.protocol import Hardware
from gridswarm.train.local import train_local
from gridswarm.train.model import build_model, count_parameters
from gridswarm.train.params import flatten

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


def hardware() -> Hardware:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Hardware(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        memory_gb=memory_gb(),
        gpu=gpu,
        torch=torch.__version__,
    )


def probe_speed(steps: int = 4) -> tuple[float, int]:
    """(tokens/s, parameters) of a few training steps of the reference GPT, after one warm-up."""
    model = build_model(REFERENCE_MODEL, REFERENCE_TRAIN.seq_len, seed=0)
    g = torch.Generator().manual_seed(0)
    shape = (REFERENCE_TRAIN.batch_size, REFERENCE_TRAIN.seq_len)

    def stream():
        while True:
            x = torch.randint(0, 256, shape, generator=g)
            yield x, x

    theta = flatten(model)
    train_local(model, theta, stream(), 1, REFERENCE_TRAIN)
    started = time.perf_counter()
    result = train_local(model, theta, stream(), steps, REFERENCE_TRAIN)
    return result.tokens / (time.perf_counter() - started), count_parameters(model)
