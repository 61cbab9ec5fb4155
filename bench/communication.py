"""Communication benchmark: gridswarm (DiLoCo, int8) against synchronous data parallel.

Same model, data, initial weights and token budget, run side by side in one invocation:
  (a) gridswarm: a real hub process and 4 real node processes over loopback HTTP, int8
      pseudo-gradients up and int8 model updates down, bytes counted by the hub;
  (b) synchronous data parallel: 4 processes with torch DistributedDataParallel (gloo), gradients
      all-reduced every step; bytes = what a ring all-reduce of the fp32 gradients sends per
      worker per step, 2(n-1)/n * 4 * parameters (the least any all-reduce can send).

    python bench/communication.py --quick --out bench/results/communication.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridswarm.config import parse_run_config
from gridswarm.hub.service import ring_allreduce_bytes
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.data import batches, slice_seed
from gridswarm.train.local import loss_fn
from gridswarm.train.workload import Workload

NODES = 4
PRESETS = {
    "quick": {"model": {"n_layer": 2, "n_head": 4, "n_embd": 128}, "inner_steps": 60, "rounds": 12},
    "full": {"model": {"n_layer": 4, "n_head": 4, "n_embd": 192}, "inner_steps": 100, "rounds": 40},
}


def run_config(preset: dict) -> dict:
    tokens = NODES * preset["rounds"] * preset["inner_steps"] * 64 * 16
    return {
        "name": "bench-communication",
        "seed": 2024,
        "model": {"kind": "gpt", **preset["model"]},
        "train": {
            "seq_len": 64,
            "batch_size": 16,
            "inner_steps": preset["inner_steps"],
            "min_inner_steps": 5,
            "inner_lr": 3e-3,
        },
        "comm": {"codec": "int8", "codec_down": "int8"},
        "round": {"deadline_s": 600, "quorum": NODES, "min_nodes": NODES},
        "budget": {"rounds": None, "tokens": tokens},  # the token budget alone ends the run
    }


def run_gridswarm(config: dict, progress: Progress) -> dict:
    """Side (a): a real local swarm; returns the hub's accounting and loss curve."""
    task = progress.add_task("gridswarm (4 nodes, int8), tokens", total=config["budget"]["tokens"])
    swarm = Swarm(Path(tempfile.mkdtemp(prefix="bench-comm-")), free_port(), liveness_s=60)
    try:
        swarm.start_hub()
        sponsor = HubClient(swarm.url, Identity.generate())
        run_id = sponsor.create_run(config).run_id
        for i in range(NODES):
            swarm.start_node(f"node-{i}", run_id)
        started = time.monotonic()
        while True:
            status = sponsor.run_status(run_id)
            progress.update(task, completed=status["tokens_total"])
            if status["status"] == "finished":
                break
            if time.monotonic() - started > 1800:
                raise TimeoutError("gridswarm side did not finish in 30 minutes")
            time.sleep(0.5)
        return {
            "final_eval_loss": status["val_loss"][-1],
            "tokens": status["tokens_total"],
            "bytes_up": status["bytes_up_total"],
            "bytes_down": status["bytes_down_total"],
            "bytes_communicated": status["bytes_up_total"] + status["bytes_down_total"],
            "rounds": status["version"],
            "wall_s": round(time.monotonic() - started, 1),
            "curve": status["curve"],
        }
    finally:
        swarm.stop()


def ddp_worker(rank: int, config: dict, steps: int, port: int, queue) -> None:
    """One rank of side (b): DDP over gloo, AdamW, the same init and per-rank data streams."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NODES
    )
    cfg = parse_run_config(config)
    workload = Workload.from_config(cfg)
    model = torch.nn.parallel.DistributedDataParallel(workload.model)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.inner_lr, weight_decay=t.inner_weight_decay, betas=(0.9, 0.95)
    )
    stream = batches(
        workload.corpus.train, t.seq_len, t.batch_size, slice_seed(cfg.seed, 0, f"ddp-{rank}")
    )
    eval_every = cfg.train.inner_steps
    for step in range(steps):
        for group in optimizer.param_groups:  # the same warm-up as a gridswarm round's start
            group["lr"] = t.inner_lr * min(1.0, (step + 1) / max(t.inner_warmup_steps, 1))
        inputs, targets = next(stream)
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == steps):
            from gridswarm.train.params import flatten

            tokens = (step + 1) * NODES * cfg.tokens_per_step
            queue.put({"tokens": tokens, "val_loss": workload.evaluate(flatten(workload.model))})
            model.train()
    dist.destroy_process_group()


def run_ddp(config: dict, tokens: int, progress: Progress) -> dict:
    """Side (b): synchronous data parallel for the same number of tokens."""
    cfg = parse_run_config(config)
    steps = tokens // (NODES * cfg.tokens_per_step)
    task = progress.add_task("sync data parallel (4 × DDP/gloo)", total=steps)
    numel = Workload.from_config(cfg).numel
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    started = time.monotonic()
    procs = [
        ctx.Process(target=ddp_worker, args=(r, config, steps, free_port_shared(), queue))
        for r in range(NODES)
    ]
    for p in procs:
        p.start()
    curve = []
    while len(curve) == 0 or curve[-1]["tokens"] < steps * NODES * cfg.tokens_per_step:
        try:
            curve.append(queue.get(timeout=600))
        except Exception as exc:
            raise RuntimeError("a DDP worker stopped reporting") from exc
        progress.update(task, completed=curve[-1]["tokens"] // (NODES * cfg.tokens_per_step))
    for p in procs:
        p.join(timeout=60)
    per_worker_step = ring_allreduce_bytes(numel, NODES)
    return {
        "final_eval_loss": curve[-1]["val_loss"],
        "tokens": steps * NODES * cfg.tokens_per_step,
        "steps": steps,
        "bytes_communicated": int(per_worker_step * NODES * steps),
        "wall_s": round(time.monotonic() - started, 1),
        "curve": curve,
    }


_PORT = None


def free_port_shared() -> int:
    global _PORT
    if _PORT is None:
        _PORT = free_port()
    return _PORT


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    a, b = result["gridswarm"], result["sync_dp"]
    ax.plot(
        [c["tokens"] / 1e6 for c in a["curve"]],
        [c["val_loss"] for c in a["curve"]],
        "o-",
        label=f"gridswarm DiLoCo int8 ({a['bytes_communicated'] / 1e6:.1f} MB)",
    )
    ax.plot(
        [0] + [c["tokens"] / 1e6 for c in b["curve"]],
        [a["curve"][0]["val_loss"]] + [c["val_loss"] for c in b["curve"]],
        "s--",
        label=f"sync data parallel ({b['bytes_communicated'] / 1e6:.0f} MB)",
    )
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(
        f"Same tokens: {result['bytes_ratio']:.0f}× fewer bytes, "
        f"loss gap {100 * result['loss_gap']:+.1f} %"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few rounds (~3 min)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/communication.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset_name = "quick" if args.quick else "full"
    config = run_config(PRESETS[preset_name])
    console = Console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        a = run_gridswarm(config, progress)
        b = run_ddp(config, a["tokens"], progress)
    result = {
        "command": " ".join(["python", "bench/communication.py", *sys.argv[1:]]),
        "preset": preset_name,
        "config": config,
        "nodes": NODES,
        "gridswarm": a,
        "sync_dp": b,
        "bytes_ratio": b["bytes_communicated"] / a["bytes_communicated"],
        "bytes_ratio_upload_only": b["bytes_communicated"] / a["bytes_up"],
        "loss_gap": (a["final_eval_loss"] - b["final_eval_loss"]) / b["final_eval_loss"],
        "targets": {"bytes_ratio": ">= 100", "loss_gap": "<= 0.03"},
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    table = Table("side", "tokens", "final eval loss", "bytes communicated", "wall s")
    table.add_row(
        "gridswarm DiLoCo, int8 (4 nodes)",
        f"{a['tokens']:,}",
        f"{a['final_eval_loss']:.4f}",
        f"{a['bytes_communicated']:,}",
        str(a["wall_s"]),
    )
    table.add_row(
        "sync data parallel (4 × DDP)",
        f"{b['tokens']:,}",
        f"{b['final_eval_loss']:.4f}",
        f"{b['bytes_communicated']:,}",
        str(b["wall_s"]),
    )
    console.print(table)
    console.print(
        f"bytes_ratio {result['bytes_ratio']:.0f}× (upload only "
        f"{result['bytes_ratio_upload_only']:.0f}×), loss_gap {result['loss_gap']:+.4f}"
    )
    args.out.with_suffix(".md").write_text(
        f"# Communication: gridswarm vs synchronous data parallel ({preset_name})\n\n"
        f"Command: `{result['command']}`\n\n"
        "| side | tokens | final eval loss | bytes communicated | wall s |\n|---|---|---|---|---|\n"
        f"| gridswarm DiLoCo int8, 4 nodes | {a['tokens']:,} | {a['final_eval_loss']:.4f} | "
        f"{a['bytes_communicated']:,} | {a['wall_s']} |\n"
        f"| sync data parallel, 4 × DDP gloo | {b['tokens']:,} | {b['final_eval_loss']:.4f} | "
        f"{b['bytes_communicated']:,} | {b['wall_s']} |\n\n"
        f"**bytes_ratio** (b/a, up+down) = {result['bytes_ratio']:.0f}× "
        f"(upload only: {result['bytes_ratio_upload_only']:.0f}×); "
        f"**loss_gap** (a−b)/b = {result['loss_gap']:+.4f}. Targets: ≥ 100× and ≤ 0.03.\n\n"
        f"![loss curves]({args.out.with_suffix('.png').name})\n"
    )


if __name__ == "__main__":
    main()
