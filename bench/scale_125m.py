"""Scale check: the ~125 M-parameter Llama of examples/run_125m.toml, end to end on this CPU.

A real hub process and 1–2 real node processes on loopback train a few rounds with a small H
(micro-batches and activation checkpointing on, as on a GPU node). Model versions and deltas move
in 8 MiB HTTP Range chunks, each download checked against its sha256. The headline is memory:
the peak RSS (VmHWM) of the hub and of each node, against the model's size in fp32 bytes. The
floor for a node is 4× the model (weights, gradients and AdamW's two moments) plus activations;
the hub holds weights, outer momentum, the down-link residual and each decoded contribution.

    python bench/scale_125m.py --out bench/results/scale_125m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gridswarm.config import load_run_config
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm, free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "run_125m.toml"
POLL_S = 0.5


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def small_run(rounds: int, steps: int, nodes: int) -> dict:
    """examples/run_125m.toml with a CPU-sized batch, H and budget (the model is unchanged)."""
    cfg = load_run_config(CONFIG).model_dump()
    cfg["train"] |= {
        "seq_len": 64,
        "batch_size": 2,
        "micro_batch_size": 1,
        "inner_steps": steps,
        "min_inner_steps": 1,
        "inner_warmup_steps": 1,
    }
    cfg["data"]["eval_batches"] = 1
    cfg["round"] |= {"deadline_s": 3600, "quorum": nodes, "min_nodes": nodes}
    cfg["budget"] = {"rounds": rounds, "tokens": None}
    cfg["trust"] |= {"audit_max_rate": 0.0, "audit_min_rate": 0.0}  # a replay doubles the time
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--gpu-nodes", type=int, default=0, help="of --nodes, on --device cuda")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="inner steps H per round")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scale_125m.json")
    args = parser.parse_args()
    console = Console()
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="gridswarm-125m-")  # kept (with the logs) if anything fails
    swarm = Swarm(Path(tmp), free_port())
    # the hub's memory estimate (train/memory.py) is far above what this run uses (see the
    # table): lift its budget so the check measures instead of refusing
    swarm.hub_extra = ["--max-run-memory-mb", "65536"]
    try:
        try:
            swarm.start_hub()
        except TimeoutError:  # a loaded machine imports torch slowly: give it longer
            wait_healthy(swarm.url, swarm.hub, timeout_s=600)
        sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=60, timeout_s=600)
        created = sponsor.create_run(small_run(args.rounds, args.steps, args.nodes))
        console.print(f"run {created.run_id}: {created.numel:,} parameters")
        names = {}
        for i in range(args.nodes):
            gpu = i < args.gpu_nodes
            name = f"gpu{i}" if gpu else f"cpu{i}"
            extra = ["--device", "cuda"] if gpu else []
            names[swarm.start_node(name, created.run_id, extra=extra)] = name
        peaks = {"hub": 0} | {name: 0 for name in names.values()}
        procs = {"hub": swarm.hub} | {names[k]: p for k, p in swarm.nodes.items()}
        status = sponsor.run_status(created.run_id)
        while status["status"] != "finished":
            if time.monotonic() - started > args.timeout_s:
                raise SystemExit(f"timed out after {args.timeout_s} s at {status['round']}")
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                raise SystemExit(f"{dead} exited early; see the logs in {tmp}")
            for name, proc in procs.items():
                peaks[name] = max(peaks[name], peak_rss_bytes(proc.pid))
            time.sleep(POLL_S)
            status = sponsor.run_status(created.run_id)
        for name, proc in procs.items():  # the peak so far, before anything exits
            peaks[name] = max(peaks[name], peak_rss_bytes(proc.pid))
    finally:
        swarm.stop()
    shutil.rmtree(tmp)
    model_bytes = created.numel * 4
    result = {
        "parameters": created.numel,
        "model_fp32_bytes": model_bytes,
        "rounds_completed": status["version"],
        "inner_steps": args.steps,
        "nodes": args.nodes,
        "gpu_nodes": args.gpu_nodes,
        "contributions": {n["name"]: n["contributions"] for n in status["nodes"]},
        "tokens": {n["name"]: n["tokens"] for n in status["nodes"]},
        "wall_s": round(time.monotonic() - started, 1),
        "val_loss": status["val_loss"],
        "bytes_up_total": status["bytes_up_total"],
        "bytes_down_total": status["bytes_down_total"],
        "peak_rss_bytes": peaks,
        "peak_rss_over_model": {k: round(v / model_bytes, 2) for k, v in peaks.items()},
        "cpu": os.cpu_count(),
        "command": " ".join(["python", *sys.argv]),
    }
    table = Table(title=f"{created.numel / 1e6:.1f} M parameters, {status['version']} rounds")
    for col in ("process", "peak RSS (GB)", "× model fp32", "floor (× model)"):
        table.add_column(col)
    for name, peak in peaks.items():
        floor = "weights + momentum + residual ≈ 3" if name == "hub" else "4 + activations"
        table.add_row(name, f"{peak / 1e9:.2f}", f"{peak / model_bytes:.2f}", floor)
    console.print(table)
    console.print(f"val loss {status['val_loss']}, wall {result['wall_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Scale: {created.numel / 1e6:.1f} M-parameter Llama on CPU",
        "",
        f"`{result['command']}` — {args.nodes} node(s), {status['version']} rounds of H = "
        f"{args.steps}, batch 2 × 64 tokens in micro-batches of 1, activation checkpointing; "
        f"{result['wall_s']} s on {os.cpu_count()} shared cores. Model size (fp32): "
        f"{model_bytes / 1e9:.2f} GB.",
        "",
        "| process | peak RSS (GB) | × model fp32 |",
        "|---|---|---|",
        *[f"| {n} | {p / 1e9:.2f} | {p / model_bytes:.2f} |" for n, p in peaks.items()],
        "",
        f"Held-out loss per version: {', '.join(f'{v:.3f}' for v in status['val_loss'])}. "
        f"Bytes up {status['bytes_up_total']:,}, down {status['bytes_down_total']:,}.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
