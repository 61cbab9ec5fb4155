"""Node overhead: tokens/s of one node's training path against a plain torch loop, side by side.

Same model, initial weights, batches and device, one process, trials interleaved:
  plain      a single-process torch loop as anyone would write it (AdamW, grad clip, bf16
             autocast on CUDA, one .item() at the end): the best this hardware does (= 100 %)
  node       gridswarm's `Workload.train` (the node's path: deterministic data slice, warm-up,
             per-step loss check) — target >= 95 % of plain (>= 90 % on a GPU)
  node+send  the same plus what a contribution adds: int8 encoding and safetensors packing
  micro      the node path with micro-batches of a quarter of the batch (the hard case: a node
             short of memory), against the same plain loop

    python bench/node_overhead.py --out bench/results/node_overhead.json
    python bench/node_overhead.py --model 6,6,384 --batch-size 8   # 10.8 M parameters
    python bench/node_overhead.py --config examples/run_125m.toml --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from gridswarm.config import RunConfig, load_run_config, parse_run_config
from gridswarm.train.codecs import make_codec
from gridswarm.train.data import batches, slice_seed
from gridswarm.train.device import resolve_device, synchronize
from gridswarm.train.local import autocast_for
from gridswarm.train.model import set_activation_checkpointing
from gridswarm.train.params import assign_flat, pack
from gridswarm.train.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = {  # a 3.2 M-parameter GPT: big enough that the step dominates, small for 2 cores
    "model": {"kind": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 256},
    "train": {"seq_len": 64, "batch_size": 16, "inner_steps": 20, "min_inner_steps": 1},
}


def plain_loop(w: Workload, theta: torch.Tensor, data: list, device: torch.device) -> float:
    """Seconds for a plain torch training loop over `data`."""
    t, model = w.cfg.train, w.model
    set_activation_checkpointing(model, t.activation_checkpointing)
    assign_flat(model, theta)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.inner_lr, weight_decay=t.inner_weight_decay, betas=(0.9, 0.95)
    )
    synchronize(device)
    started = time.perf_counter()
    for x, y in data:
        x, y = x.to(device), y.to(device)
        with autocast_for(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
    loss.item()
    synchronize(device)
    return time.perf_counter() - started


def node_path(w: Workload, theta: torch.Tensor, steps: int, micro: int | None, send: bool) -> float:
    """Seconds for the node's training path (and, with `send`, encoding and packing)."""
    device = next(w.model.parameters()).device
    synchronize(device)
    started = time.perf_counter()
    result = w.train(theta, 0, "bench-node", steps, micro_batch_size=micro)
    if send:
        codec = make_codec(w.cfg.comm.codec, w.cfg.comm.block_size)
        pack(codec.encode(result.pseudo_gradient), {"steps": result.steps})
    synchronize(device)
    return time.perf_counter() - started


def measure(cfg: RunConfig, device: torch.device, steps: int, trials: int) -> dict:
    """Interleaved trials of the plain loop and the node's paths on `cfg`'s model; medians.

    Returns the figures `main` prints and saves (also used by bench/utilisation.py)."""
    w = Workload.from_config(cfg).to(device)
    theta = w.initial_theta()
    t = cfg.train
    seed = slice_seed(cfg.seed, 0, "bench-node", 0)
    stream = batches(w.corpus.train, t.seq_len, t.batch_size, seed)
    data = [next(stream) for _ in range(steps)]
    micro = max(1, t.batch_size // 4)
    runs = {
        "plain": lambda: plain_loop(w, theta, data, device),
        "node": lambda: node_path(w, theta, steps, None, False),
        "node+send": lambda: node_path(w, theta, steps, None, True),
        f"micro ({micro} rows)": lambda: node_path(w, theta, steps, micro, False),
    }
    runs["plain"]()  # warm-up (allocator, kernels)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(trials):  # interleaved, so load on a shared machine hits all alike
        for name, fn in runs.items():
            seconds[name].append(fn())
    tokens = steps * t.batch_size * t.seq_len
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rate = {name: tokens / s for name, s in median.items()}
    return {
        "device": str(device),
        "parameters": w.numel,
        "steps": steps,
        "tokens_per_trial": tokens,
        "trials": trials,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "share_of_plain": {k: round(v / rate["plain"], 4) for k, v in rate.items()},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a run.toml (default: a 3.2 M GPT)")
    parser.add_argument(
        "--model",
        help="N_LAYER,N_HEAD,N_EMBD of the default GPT (e.g. 6,6,384: 10.8 M parameters)",
    )
    parser.add_argument("--batch-size", type=int, help="rows per step of the default GPT")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda[:i] | mps")
    parser.add_argument("--steps", type=int, default=None, help="steps per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/node_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.config:
        cfg = load_run_config(args.config)
    else:
        run = json.loads(json.dumps(DEFAULT_RUN))
        if args.model:
            n_layer, n_head, n_embd = (int(v) for v in args.model.split(","))
            run["model"].update(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if args.batch_size:
            run["train"]["batch_size"] = args.batch_size
        cfg = parse_run_config(run)
    steps = args.steps or min(cfg.train.inner_steps, 20)
    result = measure(cfg, device, steps, args.trials)
    result["command"] = " ".join(["python", *sys.argv])
    rate, tokens, numel = result["tokens_per_s"], result["tokens_per_trial"], result["parameters"]
    runs = list(rate)
    table = Table(title=f"{numel / 1e6:.1f} M parameters on {device}, {tokens} tokens/trial")
    for col in ("path", "tokens/s (median)", "share of plain"):
        table.add_column(col)
    for name in runs:
        table.add_row(name, f"{rate[name]:,.0f}", f"{rate[name] / rate['plain']:.1%}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Node overhead: {numel / 1e6:.1f} M parameters on {device}",
        "",
        f"`{result['command']}` — {args.trials} interleaved trials of {steps} steps "
        f"({tokens} tokens), median.",
        "",
        "| path | tokens/s | share of plain |",
        "|---|---|---|",
        *[f"| {n} | {rate[n]:,.0f} | {rate[n] / rate['plain']:.1%} |" for n in runs],
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
