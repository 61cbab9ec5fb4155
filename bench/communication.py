"""Communication benchmark: gridswarm (DiLoCo, quantised) against synchronous data parallel.

Same model, BPE-tokenised data, initial weights and token budget, run side by side:
  (a) gridswarm: a real hub process and 4 real node processes over loopback HTTP, quantised
      pseudo-gradients up and quantised model updates down, bytes counted by the hub;
  (b) synchronous data parallel: 4 processes with torch DistributedDataParallel (gloo), gradients
      all-reduced every step; bytes = what a ring all-reduce of the fp32 gradients sends per
      worker per step, 2(n-1)/n * 4 * parameters (the least any all-reduce can send).

The corpus is the bundled tinyshakespeare text, tokenised at start by the project's own
`gridswarm data prepare` code path (a byte-level BPE trained here, nothing downloaded) into a
temporary folder that both sides read through `Workload.batches`, so they see the same tokens.

    python bench/communication.py --quick --out bench/results/communication.json
    python bench/communication.py --sweep --quick   # in-process tuner: settings table, no swarm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridswarm.config import TrainConfig, parse_run_config
from gridswarm.hub.reports import ring_allreduce_bytes
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.aggregate import make_aggregator
from gridswarm.train.codecs import ErrorFeedback, make_codec
from gridswarm.train.data import slice_seed
from gridswarm.train.dataset import prepare
from gridswarm.train.local import loss_fn
from gridswarm.train.outer import outer_update
from gridswarm.train.schedule import RunPosition, inner_lr_at
from gridswarm.train.streaming import LocalState
from gridswarm.train.streaming import Progress as StreamingProgress
from gridswarm.train.workload import Workload

NODES = 4
SEQ_LEN = 64
MAX_CURVE_POINTS = 48  # held-out evaluations per simulated run, at most (about: every k rounds)
BATCH_SIZE = 16  # per node (gridswarm) and per rank (DDP): 4 x 16 sequences per DDP step
# Every knob of a preset; `--sweep --grid` overrides them by name. `ddp_lr` is DDP's own inner
# learning rate (the best one the sweep found for it), so the reference is not handicapped.
PRESETS: dict[str, dict] = {
    # tuned with --sweep (bench/results/communication_sweep_quick.md): nodes keep their inner
    # AdamW across rounds (the largest single gain), plain averaging as the outer step (outer
    # lr 1, no momentum: lower, higher and momentum all did worse at 30 outer steps), the
    # inner lr of DDP's best, int4 without error feedback (the same loss as fp32 here), and the
    # smallest H whose live bytes ratio stays >= 100x (H = 22: ~36 live rounds, ~106x; the loss
    # gap grows with H: +4.1 % at H = 12, +4.6 % at 22, +5.2 % at 24, +5.7 % at 30 simulated,
    # seed 2024; over 3 seeds H = 22 and 24 are both +5.2 % ± 0.6)
    "quick": {
        "seed": 2024,  # init and data streams of both sides; --grid '[{"seed": 2025}]' for spread
        "vocab": 1024,
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 128},
        "inner_steps": 22,
        "rounds": 33,
        "inner_lr": 2e-3,
        "inner_warmup_steps": 10,
        # the inner lr over the run (train/schedule.py); DDP gets the same over its steps
        "lr_schedule": "constant",
        "min_lr_ratio": 0.1,
        "keep_inner_optimizer": True,
        "outer_lr": 1.0,
        "outer_momentum": 0.0,
        "codec": "int4",
        "codec_down": "int4",
        "error_feedback": False,
        "fragments": 1,
        "grad_clip": 1.0,  # the nodes' train.grad_clip
        "ddp_lr": 2e-3,
        "ddp_warmup_steps": 10,
        "ddp_grad_clip": 1.0,  # DDP's own (0.5 did worse for it: 3.730 vs 3.698)
    },
    "full": {  # >= 10 M parameters; a guess from the quick sweep, not run (see README)
        "seed": 2024,
        "vocab": 1024,
        "model": {"n_layer": 6, "n_head": 6, "n_embd": 384},
        "inner_steps": 100,
        "rounds": 60,
        "inner_lr": 3e-4,
        "inner_warmup_steps": 10,
        "lr_schedule": "constant",
        "min_lr_ratio": 0.1,
        "keep_inner_optimizer": False,
        "outer_lr": 0.5,
        "outer_momentum": 0.9,
        "codec": "int4",
        "codec_down": "int4",
        "error_feedback": True,
        "fragments": 1,
        "grad_clip": 1.0,
        "ddp_lr": 1e-3,
        "ddp_warmup_steps": 10,
        "ddp_grad_clip": 1.0,
    },
}


TARGETS = {
    "quick": {"bytes_ratio": ">= 100", "loss_gap": "<= 0.03"},
    "full": {"bytes_ratio": ">= 500", "loss_gap": "<= 0.01"},
}


def prepare_corpus(folder: Path, vocab: int, text: Path | None = None) -> dict:
    """Tokenise `text` (.txt/.jsonl/.parquet files or a folder; default: the bundled
    tinyshakespeare) into `folder` with `gridswarm data prepare`'s code path (a byte-level BPE
    of `vocab` tokens trained here, nothing downloaded); returns what the results record."""
    bundled = Path(str(resources.files("gridswarm.data").joinpath("tinyshakespeare.txt")))
    manifest, digest = prepare(
        [text or bundled], f"bpe:{vocab}", folder, val_fraction=0.1, show_progress=False
    )
    return {
        "dataset": str(folder),
        "source": str(text) if text else "tinyshakespeare (bundled, public domain)",
        "tokenizer": f"bpe:{vocab} (byte-level BPE trained locally with HF tokenizers)",
        "vocab_size": manifest.vocab_size,
        "tokens_train": manifest.tokens_train,
        "tokens_val": manifest.tokens_val,
        "manifest_sha256": digest,
    }


def run_config(preset: dict, dataset: str) -> dict:
    """The run's settings for `preset`: the token budget of `rounds` full rounds ends it; a
    decaying lr schedule also sets `budget.rounds` (its total: the run ends at the schedule's
    end even when slower nodes trained fewer steps per round)."""
    tokens = NODES * preset["rounds"] * preset["inner_steps"] * SEQ_LEN * BATCH_SIZE
    schedule = preset.get("lr_schedule", "constant")
    return {
        "name": "bench-communication",
        "seed": preset["seed"],
        "model": {"kind": "gpt", **preset["model"]},
        # every shard in every slice: one node's stream and one DDP rank's stream are alike
        "data": {"dataset": dataset, "slice_shards": 64, "eval_batches": 16},
        "train": {
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "inner_steps": preset["inner_steps"],
            "min_inner_steps": min(5, preset["inner_steps"]),
            "inner_lr": preset["inner_lr"],
            "inner_warmup_steps": preset["inner_warmup_steps"],
            "lr_schedule": schedule,
            "min_lr_ratio": preset.get("min_lr_ratio", 0.1),
            "grad_clip": preset["grad_clip"],
            "outer_lr": preset["outer_lr"],
            "outer_momentum": preset["outer_momentum"],
            "keep_inner_optimizer": preset["keep_inner_optimizer"],
        },
        "comm": {
            "codec": preset["codec"],
            "codec_down": preset["codec_down"],
            "error_feedback": preset["error_feedback"],
            "fragments": preset["fragments"],  # > 1: Streaming DiLoCo
        },
        "round": {"deadline_s": 600, "quorum": NODES, "min_nodes": NODES},
        # the token budget alone ends a constant-lr run
        "budget": {
            "rounds": None if schedule == "constant" else preset["rounds"],
            "tokens": tokens,
        },
    }


def ddp_config(config: dict, lr: float, warmup_steps: int, grad_clip: float | None = None) -> dict:
    """The run config the DDP side trains with: the same, but its own (tuned) learning rate,
    warm-up (it warms up once) and, when given, gradient clipping threshold (None: the run's)."""
    train = {**config["train"], "inner_lr": lr, "inner_warmup_steps": warmup_steps}
    if grad_clip is not None:
        train["grad_clip"] = grad_clip
    return {**config, "train": train}


def ddp_lr(t: TrainConfig, step: int, steps: int) -> float:
    """DDP's lr at `step` of its `steps`: its warm-up once (as a node's first round), times the
    run's schedule over DDP's own steps (`train/schedule.py`, the function the nodes use)."""
    if t.inner_warmup_steps == 0 and t.lr_schedule == "constant":
        return t.inner_lr
    return inner_lr_at(t, step, RunPosition(step, steps))


def run_gridswarm(config: dict, progress: Progress, codec_name: str) -> dict:
    """Side (a): a real local swarm; returns the hub's accounting and loss curve."""
    task = progress.add_task(
        f"gridswarm (4 nodes, {codec_name}), tokens", total=config["budget"]["tokens"]
    )
    swarm = Swarm(Path(tempfile.mkdtemp(prefix="bench-comm-")), free_port(), liveness_s=60)
    swarm.data_roots = [Path(config["data"]["dataset"]).parent]  # the prepared corpus's folder
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
    """One rank of side (b): DDP over gloo, AdamW, the same init and per-rank data streams.
    `config` is `ddp_config(...)`: the run's settings with DDP's own learning rate."""
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
    # the prepared dataset's shards, read the way a node reads its slice (same code path)
    stream = workload.batches(slice_seed(cfg.seed, 0, f"ddp-{rank}"))
    eval_every = cfg.train.inner_steps
    for step in range(steps):
        for group in optimizer.param_groups:  # warm-up once, the run's schedule over its steps
            group["lr"] = ddp_lr(t, step, steps)
        inputs, targets = next(stream)
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        if t.grad_clip > 0:  # 0: no clipping, as on a node (train/local.py)
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
        "parameters": numel,
        "bytes_communicated": int(per_worker_step * NODES * steps),
        "wall_s": round(time.monotonic() - started, 1),
        "curve": curve,
    }


def encoded_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes of an encoded vector (the blob adds a small safetensors header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def simulate_diloco(config: dict) -> dict:
    """Side (a) in one process, for tuning: 4 nodes trained one after another with the node's
    real `Workload.train` and codec (with error feedback when set), the hub's real aggregator and
    `outer_update`. Bytes are payload bytes (no headers, no initial weights download).

    When nodes keep state across rounds (`train.keep_inner_optimizer`, or Streaming DiLoCo's
    `comm.fragments`), each node has its own `train/streaming.LocalState` (the node's class):
    it merges the fragment the last round synced, trains on, and uploads `global[f] - local[f]`
    of this round's fragment, which `outer_update` applies to that fragment alone."""
    cfg = parse_run_config(config)
    t, c = cfg.train, cfg.comm
    if c.overlap:
        raise ValueError("the simulation does not model comm.overlap (training ahead)")
    workload = Workload.from_config(cfg)
    numel = workload.numel
    theta = workload.initial_theta()
    aggregate = make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
    codec = make_codec(c.codec, c.block_size)
    feedback = {i: ErrorFeedback(codec) for i in range(NODES)}
    # nodes keeping state need a model each (LocalState holds the local weights in it)
    local: dict[int, LocalState] = {}
    node_workloads = (
        [Workload.from_config(cfg) for _ in range(NODES)] if cfg.keeps_node_state else []
    )
    momentum = residual = None
    rounds = cfg.budget.tokens // (NODES * t.inner_steps * cfg.tokens_per_step)
    eval_every = max(1, rounds // MAX_CURVE_POINTS)  # H = 1 controls run hundreds of rounds
    bytes_up = bytes_down = tokens = 0
    curve = [{"tokens": 0, "val_loss": workload.evaluate(theta)}]
    for rnd in range(rounds):
        fragment = workload.fragment(rnd)
        updates, weights = [], []
        for i in range(NODES):
            stream_seed = slice_seed(cfg.seed, rnd, f"node-{i}")
            if cfg.keeps_node_state:
                if i in local:
                    local[i].merge(theta, workload.fragment(rnd - 1), 0.0, rnd)
                else:
                    local[i] = LocalState(node_workloads[i], theta, rnd)
                progress = StreamingProgress()
                stream = node_workloads[i].batches(stream_seed)
                local[i].train(stream, t.inner_steps, progress, rnd)
                pg, trained = local[i].pseudo_gradient(theta, fragment), progress.tokens
            else:
                result = workload.train(theta, rnd, f"node-{i}", t.inner_steps)
                pg, trained = result.pseudo_gradient, result.tokens
            encoded = feedback[i].encode(pg) if c.error_feedback else codec.encode(pg)
            bytes_up += encoded_bytes(encoded)
            updates.append(codec.decode(encoded, pg.numel()))
            weights.append(float(trained))
            tokens += trained
        out = outer_update(
            theta,
            aggregate(torch.stack(updates), torch.tensor(weights)),
            momentum,
            residual,
            lr=t.outer_lr,
            mu=t.outer_momentum,
            codec_down=c.codec_down,
            block_size=c.block_size,
            fragment=fragment,
        )
        theta, momentum, residual = out.theta, out.momentum, out.residual
        bytes_down += NODES * encoded_bytes(out.delta)
        if (rnd + 1) % eval_every == 0 or rnd + 1 == rounds:
            curve.append({"tokens": tokens, "val_loss": workload.evaluate(theta)})
    return {
        "final_eval_loss": curve[-1]["val_loss"],
        "tokens": tokens,
        "bytes_communicated": bytes_up + bytes_down,
        "numel": numel,
        "curve": curve,
    }


def simulate_ddp(config: dict, tokens: int, eval_every: int) -> dict:
    """Side (b) in one process, for tuning: AdamW on the concatenation of the 4 DDP ranks'
    batches (what DDP's averaged gradient is, up to float rounding), same warm-up and clipping."""
    cfg = parse_run_config(config)
    t = cfg.train
    workload = Workload.from_config(cfg)
    model = workload.model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.inner_lr, weight_decay=t.inner_weight_decay, betas=(0.9, 0.95)
    )
    streams = [workload.batches(slice_seed(cfg.seed, 0, f"ddp-{r}")) for r in range(NODES)]
    steps = tokens // (NODES * cfg.tokens_per_step)
    curve = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = ddp_lr(t, step, steps)
        inputs, targets = (
            torch.cat(parts) for parts in zip(*(next(s) for s in streams), strict=True)
        )
        model.train()
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:  # 0: no clipping, as on a node (train/local.py)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            from gridswarm.train.params import flatten

            curve.append(
                {
                    "tokens": (step + 1) * NODES * cfg.tokens_per_step,
                    "val_loss": workload.evaluate(flatten(model)),
                }
            )
    return {
        "final_eval_loss": curve[-1]["val_loss"],
        "tokens": steps * NODES * cfg.tokens_per_step,
        "steps": steps,
        "bytes_communicated": int(ring_allreduce_bytes(workload.numel, NODES) * NODES * steps),
        "curve": curve,
    }


def sweep(
    preset: dict,
    grid: list[dict],
    ddp_lrs: list[float],
    out: Path,
    console: Console,
    text: Path | None = None,
) -> None:
    """The tuner: every setting of `grid` (overrides of `preset`) simulated in-process against
    the simulated DDP reference at each of `ddp_lrs` (the best is the reference); a table."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-comm-data-") as tmp:
        data = prepare_corpus(Path(tmp) / "corpus", preset["vocab"], text)
        ddp_cache: dict[tuple, dict] = {}
        rows = []
        for overrides in grid:
            p = {**preset, **overrides}
            config = run_config(p, data["dataset"])
            started = time.monotonic()
            a = simulate_diloco(config)
            a_wall = time.monotonic() - started
            refs = []
            steps = a["tokens"] // (NODES * SEQ_LEN * BATCH_SIZE)  # DDP's, for its curve
            for lr in ddp_lrs:
                key = (lr, a["tokens"], p["ddp_warmup_steps"], p["ddp_grad_clip"], p["seed"])
                key += (p.get("lr_schedule", "constant"), p.get("min_lr_ratio", 0.1))
                key += (json.dumps(p["model"]),)
                if key not in ddp_cache:
                    ddp_cache[key] = {
                        "lr": lr,
                        **simulate_ddp(
                            ddp_config(config, lr, p["ddp_warmup_steps"], p["ddp_grad_clip"]),
                            a["tokens"],
                            max(p["inner_steps"], steps // MAX_CURVE_POINTS),
                        ),
                    }
                    console.print(f"  DDP lr {lr:g}: {ddp_cache[key]['final_eval_loss']:.4f}")
                refs.append(ddp_cache[key])
            b = min(refs, key=lambda r: r["final_eval_loss"])
            row = {
                "overrides": overrides,
                "settings": {k: v for k, v in p.items() if k != "model"},
                "numel": a["numel"],
                "tokens": a["tokens"],
                "diloco_loss": a["final_eval_loss"],
                "ddp_loss": b["final_eval_loss"],
                "ddp_best_lr": b["lr"],
                "ddp_losses": {str(r["lr"]): r["final_eval_loss"] for r in refs},
                "loss_gap": (a["final_eval_loss"] - b["final_eval_loss"]) / b["final_eval_loss"],
                "bytes_ratio_payload": b["bytes_communicated"] / a["bytes_communicated"],
                "diloco_wall_s": round(a_wall, 1),
                "diloco_curve": a["curve"],
            }
            rows.append(row)
            console.print(
                f"{json.dumps(overrides)}: DiLoCo {row['diloco_loss']:.4f} vs DDP "
                f"{row['ddp_loss']:.4f} (lr {row['ddp_best_lr']:g}) "
                f"gap {100 * row['loss_gap']:+.2f} % "
                f"ratio {row['bytes_ratio_payload']:.0f}x ({a_wall:.0f} s)"
            )
            out.write_text(json.dumps({"data": data, "preset": preset, "rows": rows}, indent=2))
    lines = [
        "| overrides | DiLoCo loss | DDP loss (best lr) | loss gap | bytes ratio (payload) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{json.dumps(r['overrides'])}` | {r['diloco_loss']:.4f} | {r['ddp_loss']:.4f} "
            f"({r['ddp_best_lr']:g}) | {100 * r['loss_gap']:+.2f} % "
            f"| {r['bytes_ratio_payload']:.0f}× |"
        )
    out.with_suffix(".md").write_text(
        "# Communication sweep (in-process: real Workload.train, codecs, aggregator, "
        "outer_update; 4 nodes sequential; DDP = AdamW on the 4 ranks' batches)\n\n"
        f"Data: {data['tokenizer']}, {data['tokens_train']:,} train tokens. "
        f"Base preset: `{json.dumps(preset)}`\n\n" + "\n".join(lines) + "\n"
    )


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
        label=f"gridswarm DiLoCo {result['codec']} ({a['bytes_communicated'] / 1e6:.1f} MB)",
    )
    ax.plot(
        [0] + [c["tokens"] / 1e6 for c in b["curve"]],
        [a["curve"][0]["val_loss"]] + [c["val_loss"] for c in b["curve"]],
        "s--",
        label=f"sync data parallel, AdamW lr {result['ddp']['inner_lr']:g} "
        f"({b['bytes_communicated'] / 1e6:.0f} MB)",
    )
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel(f"held-out loss (nats per {result['data']['tokenizer'].split()[0]} token)")
    ax.set_title(
        f"Same tokens: {result['bytes_ratio']:.0f}× fewer bytes, "
        f"loss gap {100 * result['loss_gap']:+.1f} %"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_markdown(result: dict, path: Path) -> None:
    """The results page beside the .json (from the result alone, so it can be re-rendered)."""
    config, data, a, b = result["config"], result["data"], result["gridswarm"], result["sync_dp"]
    t, codec_name, target = config["train"], result["codec"], result["targets"]
    optimizer = (
        "kept across rounds (`train.keep_inner_optimizer`: warm-up once per node)"
        if t.get("keep_inner_optimizer")
        else f"fresh each round (warm-up {t['inner_warmup_steps']} steps each round)"
    )
    outer = (
        "plain averaging (outer SGD lr 1, no momentum)"
        if t["outer_lr"] == 1.0 and t["outer_momentum"] == 0.0
        else f"outer Nesterov lr {t['outer_lr']:g} momentum {t['outer_momentum']:g}"
    )
    path.write_text(
        f"# Communication: gridswarm vs synchronous data parallel ({result['preset']})\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Data: {data['source']}, {data['tokenizer']}: vocabulary {data['vocab_size']:,}, "
        f"{data['tokens_train']:,} train + {data['tokens_val']:,} held-out tokens "
        f"(manifest `{data['manifest_sha256'][:12]}…`), read by both sides through "
        f"`Workload.batches`. Model: GPT {json.dumps(config['model'])}, "
        f"{result['parameters']:,} parameters. gridswarm: H = {t['inner_steps']} for the "
        f"fastest node ({a['rounds']} rounds), inner AdamW lr {t['inner_lr']:g} "
        f"(warm-up {t['inner_warmup_steps']} steps) {optimizer}, {outer}, {codec_name} up, "
        f"{config['comm']['codec_down']} down. DDP: AdamW lr {result['ddp']['inner_lr']:g} "
        f"(its best in the sweep), warm-up {result['ddp']['warmup_steps']} steps once; both "
        f"sides clip gradients (nodes at {t.get('grad_clip', 1.0):g}, DDP at "
        f"{result['ddp'].get('grad_clip', t.get('grad_clip', 1.0)):g}) with weight decay 0.1.\n\n"
        "| side | tokens | final eval loss | bytes communicated | wall s |\n|---|---|---|---|---|\n"
        f"| gridswarm DiLoCo {codec_name}, 4 nodes | {a['tokens']:,} | "
        f"{a['final_eval_loss']:.4f} | {a['bytes_communicated']:,} | {a['wall_s']} |\n"
        f"| sync data parallel, 4 × DDP gloo | {b['tokens']:,} | {b['final_eval_loss']:.4f} | "
        f"{b['bytes_communicated']:,} | {b['wall_s']} |\n\n"
        f"**bytes_ratio** (b/a, up+down) = {result['bytes_ratio']:.0f}× "
        f"(upload only: {result['bytes_ratio_upload_only']:.0f}×); "
        f"**loss_gap** (a−b)/b = {result['loss_gap']:+.4f}. "
        f"Targets: {target['bytes_ratio']} and {target['loss_gap']}.\n\n"
        f"![loss curves]({path.with_suffix('.png').name})\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few rounds (~4 min)")
    parser.add_argument("--out", type=Path, default=None, help="results .json (.md, .png beside)")
    parser.add_argument(
        "--text", type=Path, default=None, help="corpus files/folder (default: tinyshakespeare)"
    )
    parser.add_argument("--sweep", action="store_true", help="in-process tuner instead")
    parser.add_argument(
        "--grid", type=json.loads, default=[{}], help="--sweep: JSON list of preset overrides"
    )
    parser.add_argument(
        "--ddp-lrs", type=json.loads, default=None, help="--sweep: JSON list of DDP lrs to try"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset_name = "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    console = Console()
    if args.sweep:
        out = args.out or Path(f"bench/results/communication_sweep_{preset_name}.json")
        lrs = args.ddp_lrs or [preset["ddp_lr"]]
        sweep(preset, args.grid, lrs, out, console, args.text)
        return
    args.out = args.out or Path("bench/results/communication.json")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-comm-data-"))
    data = prepare_corpus(data_dir / "corpus", preset["vocab"], args.text)
    config = run_config(preset, data["dataset"])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    codec_name = preset["codec"] + (" + error feedback" if preset["error_feedback"] else "")
    try:
        with Progress(*columns, console=console) as progress:
            a = run_gridswarm(config, progress, codec_name)
            b = run_ddp(
                ddp_config(
                    config, preset["ddp_lr"], preset["ddp_warmup_steps"], preset["ddp_grad_clip"]
                ),
                a["tokens"],
                progress,
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    result = {
        "command": " ".join(["python", "bench/communication.py", *sys.argv[1:]]),
        "preset": preset_name,
        "codec": codec_name,
        "config": config,
        "ddp": {
            "inner_lr": preset["ddp_lr"],
            "warmup_steps": preset["ddp_warmup_steps"],
            "grad_clip": preset["ddp_grad_clip"],
        },
        "data": data,
        "nodes": NODES,
        "parameters": b["parameters"],
        "gridswarm": a,
        "sync_dp": b,
        "bytes_ratio": b["bytes_communicated"] / a["bytes_communicated"],
        "bytes_ratio_upload_only": b["bytes_communicated"] / a["bytes_up"],
        "loss_gap": (a["final_eval_loss"] - b["final_eval_loss"]) / b["final_eval_loss"],
        "targets": TARGETS[preset_name],
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    table = Table("side", "tokens", "final eval loss", "bytes communicated", "wall s")
    table.add_row(
        f"gridswarm DiLoCo, {codec_name} (4 nodes)",
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
    write_markdown(result, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
