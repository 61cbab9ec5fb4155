"""Robustness benchmark: DiLoCo rounds with Byzantine nodes, for every aggregator and attack.

    python bench/robustness.py --quick --out bench/results/robustness_quick.json
    python bench/robustness.py --quick --attacks all --out bench/results/robustness.json

A small byte-level GPT (gridswarm.train.model) trains on tinyshakespeare with simulated nodes in
one process: each round every honest node runs H inner AdamW steps (gridswarm.train.local) on its
own data (non-IID by default: node i draws only from the i-th contiguous shard of the text, other
plays and speakers than its neighbours; --iid draws every node from the whole text), attackers
submit what the attack harness (gridswarm.train.attacks) builds from the honest updates of that
same round (omniscient, as in the papers) or train on garbage data, every update goes through the
up-codec as an upload does, and the hub's own close path applies it: the aggregator built from the
hub's registry (`make_aggregator`, as `hub.service` does), then `outer_update` (Nesterov outer
step, down-codec with error feedback), the function `hub.service._new_version` calls.

The setting is one where honest updates disagree (tiny batches, few inner steps, non-IID shards:
the mean pairwise cosine of honest updates is measured and reported) and long enough for an
attack's bias to accumulate: in a setting where honest updates nearly coincide, ALIE and IPM rows
are simply filtered or drowned and every aggregator looks alike.

Attacks with their literature parameters (see ATTACK_VARIANTS): ALIE (Baruch et al. 2019) with
z from the paper's n/f formula and with a fixed z = 1; inner-product manipulation (Xie et al.
2019) with a small epsilon = 0.1 (aimed at Krum / median) and a large epsilon = 10 (> (n-f)/f at
every fraction here, which reverses the plain mean). --quick runs only those four; the default
preset (and --attacks all) adds sign-flip, scaling, noise and garbage data.

Reported: held-out eval loss after the same number of rounds for 0 % attackers and each attacker
fraction, per aggregator and attack, as a ratio to the clean plain mean; per attack which
aggregator wins and which fail; plus aggregation time per aggregator at 1M parameters (n=100
updates; the default preset adds 10M parameters, n=20) and a naive pairwise-loop Krum as a
same-machine baseline. Writes JSON to --out, a markdown table (.md) and a plot (.png) next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from rich.console import Console
from rich.progress import Progress

from gridswarm.config import CommConfig, ModelConfig, TrainConfig
from gridswarm.train.aggregate import AGGREGATORS, Aggregator, make_aggregator
from gridswarm.train.attacks import alie_z, apply_attack, garbage_batches
from gridswarm.train.codecs import make_codec
from gridswarm.train.data import Corpus, batches, eval_batches, read_text, slice_seed
from gridswarm.train.local import evaluate, train_local
from gridswarm.train.model import build_model, count_parameters
from gridswarm.train.outer import outer_update
from gridswarm.train.params import flatten
from gridswarm.train.tokenizer import VOCAB_SIZE

console = Console(stderr=True)


@dataclass(frozen=True)
class AttackVariant:
    """One column group of the tables: a harness attack with fixed options."""

    attack: str  # a gridswarm.train.attacks name, or "garbage-data"
    options: dict[str, float] = field(default_factory=dict)
    note: str = ""


# name -> attack. Parameters are the papers', not tuned to any aggregator.
ATTACK_VARIANTS: dict[str, AttackVariant] = {
    "sign-flip": AttackVariant("sign-flip", {}, "-1 x an honest update"),
    "scaling": AttackVariant("scaling", {}, "10 x an honest update"),
    "noise": AttackVariant("noise", {}, "N(0, (100 x honest RMS)^2)"),
    "alie": AttackVariant(
        "alie", {}, "mean - z std of the honest updates, z = Baruch et al.'s n/f formula"
    ),
    "alie-z1": AttackVariant("alie", {"z": 1.0}, "mean - 1 std (a stronger fixed z)"),
    "ipm-0.1": AttackVariant(
        "ipm", {"epsilon": 0.1}, "-0.1 x honest mean (Xie et al.: aimed at Krum / median)"
    ),
    "ipm-10": AttackVariant(
        "ipm", {"epsilon": 10.0}, "-10 x honest mean (> (n-f)/f: reverses the plain mean)"
    ),
    "garbage-data": AttackVariant("garbage-data", {}, "trains on uniform random tokens"),
}
QUICK_ATTACKS = ["alie", "alie-z1", "ipm-0.1", "ipm-10"]
FRACTIONS = [0.1, 0.2, 0.3]  # attacker fractions besides the clean 0 %
# Table rows: label -> (registry name, options), built with make_aggregator as the hub does.
# Options are chosen for up to 30 % attackers; everything else is the library default. Krum
# appears twice: the library's Multi-Krum (m = n - f) and classic Krum (m = 1), the rule the
# ALIE and IPM papers attack.
AGGREGATOR_ROWS: dict[str, tuple[str, dict]] = {
    "mean": ("mean", {}),
    "median": ("median", {}),
    "trimmed-mean": ("trimmed-mean", {"trim_fraction": 0.3}),
    "krum": ("krum", {}),
    "krum (m=1)": ("krum", {"m": 1}),
    "geometric-median": ("geometric-median", {}),
    "centered-clip": ("centered-clip", {}),
}
for _name in AGGREGATORS:  # any rule a plugin registered is benchmarked too, with its defaults
    AGGREGATOR_ROWS.setdefault(_name, (_name, {}))
CLEAN_TOLERANCE = 0.05  # "within 5 % of the clean loss"
RUINED = 1.25  # a loss 25 % above clean counts as ruined (failed)


@dataclass(frozen=True)
class Setting:
    n_nodes: int
    rounds: int
    inner_steps: int
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch_size: int
    inner_lr: float
    eval_batches: int
    non_iid: bool = True


# Tiny batches and few inner steps on non-IID shards: honest updates disagree (mean pairwise
# cosine ~0.5, reported), and 30 rounds let a per-round bias accumulate.
QUICK = Setting(10, 30, 2, 1, 32, 2, 32, 2, 1e-2, 8)
FULL = Setting(20, 40, 4, 2, 64, 4, 32, 4, 3e-3, 16)


def shakespeare() -> str:
    """The shared copy of the corpus if present (CI has shared/ beside the clone), else bundled."""
    shared = (
        Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
    )
    return shared.read_text("utf-8") if shared.is_file() else read_text("tinyshakespeare")


def attack_rows(
    variant: AttackVariant, honest: torch.Tensor, n_attackers: int, seed: int
) -> torch.Tensor:
    """What the attackers submit this round, from this round's honest uploads (omniscient)."""
    return apply_attack(variant.attack, honest, n_attackers, rng_seed=seed, **variant.options)


def mean_pairwise_cosine(updates: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows: how much honest updates agree."""
    unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-30)
    n = updates.shape[0]
    return float(((unit @ unit.T).sum() - n) / (n * (n - 1)))


class Swarm:
    """Simulated DiLoCo rounds in one process."""

    def __init__(self, s: Setting, seed: int) -> None:
        self.s = s
        self.seed = seed
        self.model = build_model(
            ModelConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head), s.seq_len, seed
        )
        self.theta0 = flatten(self.model)
        self.cfg = TrainConfig(
            seq_len=s.seq_len,
            batch_size=s.batch_size,
            inner_steps=s.inner_steps,
            min_inner_steps=1,
            inner_lr=s.inner_lr,
        )
        corpus = Corpus.from_text(shakespeare(), 0.1, s.seq_len)
        self.train_tokens = corpus.train
        shard = len(corpus.train) // s.n_nodes
        self.shards = [
            corpus.train[i * shard : (i + 1) * shard] if s.non_iid else corpus.train
            for i in range(s.n_nodes)
        ]
        self.comm = CommConfig()
        self.up_codec = make_codec(self.comm.codec, self.comm.block_size)
        self.eval_set = eval_batches(corpus.val, s.seq_len, 16, s.eval_batches)
        self.first_round: dict[tuple[int, bool], torch.Tensor] = {}

    def upload(self, update: torch.Tensor) -> torch.Tensor:
        """What the hub decodes from a node's upload of `update` (the up-codec round trip)."""
        return self.up_codec.decode(self.up_codec.encode(update), update.numel())

    def local(self, theta: torch.Tensor, rnd: int, node: int, garbage: bool) -> torch.Tensor:
        # Round 0 starts from theta0 in every run: its updates are computed once per node.
        if rnd == 0 and (node, garbage) in self.first_round:
            return self.first_round[(node, garbage)]
        seed = slice_seed(self.seed, rnd, f"node-{node}")
        stream = batches(self.shards[node], self.s.seq_len, self.s.batch_size, seed)
        if garbage:
            stream = garbage_batches(stream, VOCAB_SIZE, rng_seed=seed)
        update = train_local(
            self.model, theta, stream, self.s.inner_steps, self.cfg
        ).pseudo_gradient
        update = self.upload(update)
        if rnd == 0:
            self.first_round[(node, garbage)] = update
        return update

    def run(self, aggregator: Aggregator, variant: AttackVariant | None, n_attackers: int) -> dict:
        """Train for the setting's rounds; returns final eval loss, time spent aggregating and
        the honest updates' mean pairwise cosine (averaged over rounds)."""
        theta, momentum, residual = self.theta0.clone(), None, None
        n_honest = self.s.n_nodes - n_attackers
        agg_s, cosines = 0.0, []
        try:
            for rnd in range(self.s.rounds):
                honest = torch.stack([self.local(theta, rnd, i, False) for i in range(n_honest)])
                cosines.append(mean_pairwise_cosine(honest))
                if n_attackers == 0 or variant is None:
                    bad = honest[:0]
                elif variant.attack == "garbage-data":
                    ids = range(n_honest, self.s.n_nodes)
                    bad = torch.stack([self.local(theta, rnd, i, True) for i in ids])
                else:  # crafted rows are uploaded too: the hub decodes every contribution
                    crafted = attack_rows(variant, honest, n_attackers, self.seed * 997 + rnd)
                    bad = torch.stack([self.upload(row) for row in crafted])
                updates = torch.cat([honest, bad])
                tokens = torch.full((self.s.n_nodes,), float(self.cfg.inner_steps))
                t0 = time.perf_counter()
                pseudo_gradient = aggregator(updates, tokens)
                agg_s += time.perf_counter() - t0
                out = outer_update(
                    theta,
                    pseudo_gradient,
                    momentum,
                    residual,
                    lr=self.cfg.outer_lr,
                    mu=self.cfg.outer_momentum,
                    codec_down=self.comm.codec_down,
                    block_size=self.comm.block_size,
                )
                theta, momentum, residual = out.theta, out.momentum, out.residual
            loss = evaluate(self.model, theta, self.eval_set)
        except FloatingPointError:
            loss = math.inf
        if not math.isfinite(loss):
            loss = math.inf
        cosine = sum(cosines) / len(cosines) if cosines else math.nan
        return {"eval_loss": loss, "aggregate_s": agg_s, "honest_cosine": cosine}


def time_aggregators(n: int, d: int, reps: int, naive_krum: bool) -> dict:
    """Seconds per aggregation call (best of reps) on n random updates of d parameters."""
    g = torch.Generator().manual_seed(0)
    updates = 0.01 * torch.randn(n, d, generator=g) + 0.001
    weights = torch.ones(n)
    out = {}
    for name in AGGREGATORS:
        agg = make_aggregator(name, **AGGREGATOR_ROWS.get(name, (name, {}))[1])
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            agg(updates, weights)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    if naive_krum:  # what Flower's Krum does: one distance per pair, in a Python loop
        t0 = time.perf_counter()
        dist = torch.zeros(n, n)
        for i in range(n):
            for j in range(i + 1, n):
                dist[i, j] = dist[j, i] = (updates[i] - updates[j]).pow(2).sum()
        f = (n - 3) // 2
        scores = dist.sort(dim=1).values[:, 1 : n - f - 1].sum(dim=1)
        updates[scores.topk(n - f, largest=False).indices].mean(dim=0)
        out["krum (pairwise Python loop)"] = time.perf_counter() - t0
    return out


def finite_or_none(value):
    """JSON has no infinity: a diverged run's loss is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def fmt_loss(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.3f}"


def verdicts(res: dict) -> dict:
    """Per attack: the winner (lowest loss at the highest fraction), and for every aggregator its
    worst ratio to the clean plain mean over the fractions, classed as failed (> RUINED), hurt
    (> 1 + CLEAN_TOLERANCE) or held."""
    clean = res["clean_loss"]
    out = {}
    top = str(FRACTIONS[-1])
    for attack in res["attacks"]:
        cells = res["attacked"][attack]
        worst = {agg: max(cells[agg][str(f)] for f in FRACTIONS) / clean for agg in AGGREGATOR_ROWS}
        winner = min(AGGREGATOR_ROWS, key=lambda a: cells[a][top])
        out[attack] = {
            "winner_at_top_fraction": winner,
            "winner_ratio": cells[winner][top] / clean,
            "worst_ratio": worst,
            "failed": [a for a, r in worst.items() if r > RUINED],
            "hurt": [a for a, r in worst.items() if 1 + CLEAN_TOLERANCE < r <= RUINED],
            "held": [a for a, r in worst.items() if r <= 1 + CLEAN_TOLERANCE],
        }
    return out


def write_markdown(path: Path, res: dict, command: str) -> None:
    s = res["setting"]
    cfg = TrainConfig()
    lines = [
        "# Robustness: eval loss under Byzantine nodes",
        "",
        f"Command: `{command}`",
        "",
        f"Model: byte-level GPT, {res['model_parameters']:,} parameters "
        f"({s['n_layer']} layer, n_embd {s['n_embd']}), tinyshakespeare; {s['n_nodes']} nodes, "
        f"{s['rounds']} rounds x {s['inner_steps']} inner AdamW steps (lr {s['inner_lr']}, "
        f"batch {s['batch_size']}x{s['seq_len']}), outer Nesterov lr {cfg.outer_lr} momentum "
        f"{cfg.outer_momentum} (the hub's close: `make_aggregator` from the registry, then "
        f"`outer_update`; every upload, crafted ones included, through the int8 up-codec; int8 "
        f"down with error feedback); "
        f"{'non-IID (a contiguous shard per node)' if s.get('non_iid', True) else 'IID'} slices. "
        f"Honest updates' mean pairwise cosine: {res['honest_cosine']:.2f} (clean mean run, "
        f"averaged over rounds). Attackers are omniscient: they craft their rows from the "
        f"honest uploads of the same round. Run time {res['wall_s']:.0f} s on {res['machine']}.",
        "",
        f"Clean plain mean (0 % attackers): **{res['clean_loss']:.3f}** (initial "
        f"{res['initial_loss']:.3f}). Cells: eval loss / ratio to the clean plain mean; "
        f"**bold** ratio > {RUINED} (failed), _italic_ > {1 + CLEAN_TOLERANCE:.2f} (hurt).",
        "",
        "Attacks:",
        "",
    ]
    lines += [f"- `{a}`: {ATTACK_VARIANTS[a].note}" for a in res["attacks"]]
    if "alie" in res["attacks"]:
        zs = ", ".join(f"{round(float(f) * 100)} %: z = {z:.2f}" for f, z in res["alie_z"].items())
        lines.append(f"  (formula z at n = {s['n_nodes']}: {zs})")
    lines.append("")
    for attack in res["attacks"]:
        lines += [
            f"## {attack}",
            "",
            "| aggregator | 0 % | " + " | ".join(f"{int(f * 100)} %" for f in FRACTIONS) + " |",
        ]
        lines.append("|---" * (len(FRACTIONS) + 2) + "|")
        for agg in AGGREGATOR_ROWS:
            cells = [fmt_loss(res["clean"][agg])]
            for f in FRACTIONS:
                loss = res["attacked"][attack][agg][str(f)]
                ratio = loss / res["clean_loss"]
                mark = "**" if ratio > RUINED else "_" if ratio > 1 + CLEAN_TOLERANCE else ""
                cells.append(
                    f"{fmt_loss(loss)} / {mark}{ratio:.2f}{mark}"
                    if math.isfinite(loss)
                    else "**diverged**"
                )
            lines.append(f"| {agg} | " + " | ".join(cells) + " |")
        lines.append("")
    top = int(FRACTIONS[-1] * 100)
    lines += [
        "## Verdict",
        "",
        f"Winner: lowest loss at {top} % attackers. Failed: worst ratio over "
        f"{', '.join(f'{int(f * 100)}' for f in FRACTIONS)} % above {RUINED}; hurt: above "
        f"{1 + CLEAN_TOLERANCE:.2f}; held: the rest.",
        "",
        "| attack | winner (ratio) | failed | hurt | held |",
        "|---|---|---|---|---|",
    ]
    for attack, v in res["verdict"].items():
        lines.append(
            f"| {attack} | {v['winner_at_top_fraction']} ({v['winner_ratio']:.3f}) | "
            f"{', '.join(v['failed']) or '-'} | {', '.join(v['hurt']) or '-'} | "
            f"{', '.join(v['held']) or '-'} |"
        )
    lines += [
        "",
        "## Aggregation time (s per call, 1 thread)",
        "",
        "| aggregator | " + " | ".join(res["timing"]) + " |",
        "|---" * (len(res["timing"]) + 1) + "|",
    ]
    names = list(next(iter(res["timing"].values())))
    for name in names:
        row = [
            f"{res['timing'][k][name]:.3f}" if name in res["timing"][k] else "not run"
            for k in res["timing"]
        ]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Flower 1.41's Krum at n=100, d=1M: 4.1 s on a similar 2-core box (fl-privacy-anchors.md).",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, res: dict) -> None:
    attacks = res["attacks"]
    cols = min(4, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), sharey=True, squeeze=False)
    cap = 1.5 * res["clean_loss"]
    xs = [0.0, *FRACTIONS]
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for agg in AGGREGATOR_ROWS:
            ys = [res["clean"][agg]] + [res["attacked"][attack][agg][str(f)] for f in FRACTIONS]
            ys = [min(y, cap) if math.isfinite(y) else cap for y in ys]
            ax.plot([100 * f for f in xs], ys, marker="o", label=agg)
        ax.axhline(res["clean_loss"] * (1 + CLEAN_TOLERANCE), color="grey", ls=":", lw=1)
        ax.axhline(res["clean_loss"] * RUINED, color="red", ls=":", lw=1)
        ax.set_title(attack)
        ax.set_xlabel("attackers (%)")
        ax.set_ylim(res["clean_loss"] * 0.95, cap * 1.02)
    for ax in axes.flat[len(attacks) :]:
        ax.axis("off")
    for r in range(rows):
        axes[r, 0].set_ylabel("eval loss (nats/token)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "Eval loss after the same budget vs attacker fraction "
        f"(grey: clean mean + {CLEAN_TOLERANCE:.0%}, red: x{RUINED} ruined; capped at x1.5)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small model, ALIE and IPM only (~5 min idle)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/robustness.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iid", action="store_true", help="every node draws from the whole text")
    parser.add_argument(
        "--attacks",
        default=None,
        help="comma-separated attack variants, or 'all' (default: --quick ALIE and IPM only, "
        f"else all); variants: {', '.join(ATTACK_VARIANTS)}",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = QUICK if args.quick else FULL
    if args.iid:
        setting = Setting(**{**setting.__dict__, "non_iid": False})
    attacks = QUICK_ATTACKS if args.quick else list(ATTACK_VARIANTS)
    if args.attacks == "all":
        attacks = list(ATTACK_VARIANTS)
    elif args.attacks:
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        unknown = sorted(set(attacks) - set(ATTACK_VARIANTS))
        if unknown or not attacks:
            parser.error(
                f"unknown attack variant(s) {unknown}; choose from {list(ATTACK_VARIANTS)}"
            )
    started = time.perf_counter()
    swarm = Swarm(setting, args.seed)
    res: dict = {
        "setting": setting.__dict__,
        "attacks": attacks,
        "attack_options": {a: ATTACK_VARIANTS[a].options for a in attacks},
        "aggregators": {k: {"name": v[0], "options": v[1]} for k, v in AGGREGATOR_ROWS.items()},
        "fractions": FRACTIONS,
        "model_parameters": count_parameters(swarm.model),
        "initial_loss": evaluate(swarm.model, swarm.theta0, swarm.eval_set),
        "clean": {},
        "attacked": {a: {g: {} for g in AGGREGATOR_ROWS} for a in attacks},
        "aggregate_s": {g: 0.0 for g in AGGREGATOR_ROWS},
    }
    res["alie_z"] = {str(f): alie_z(setting.n_nodes, round(f * setting.n_nodes)) for f in FRACTIONS}
    with Progress(console=console) as progress:
        task = progress.add_task(
            "training runs", total=len(AGGREGATOR_ROWS) * (1 + len(attacks) * len(FRACTIONS))
        )
        for label, (name, options) in AGGREGATOR_ROWS.items():
            agg = make_aggregator(name, **options)
            out = swarm.run(agg, None, 0)
            res["clean"][label] = out["eval_loss"]
            if label == "mean":
                res["honest_cosine"] = out["honest_cosine"]
            progress.advance(task)
            for attack in attacks:
                for f in FRACTIONS:
                    n_attackers = round(f * setting.n_nodes)
                    out = swarm.run(agg, ATTACK_VARIANTS[attack], n_attackers)
                    res["attacked"][attack][label][str(f)] = out["eval_loss"]
                    res["aggregate_s"][label] += out["aggregate_s"]
                    progress.advance(task)
        task = progress.add_task("aggregation timing", total=1 if args.quick else 2)
        res["timing"] = {"1M params, n=100": time_aggregators(100, 1_000_000, 2, naive_krum=True)}
        progress.advance(task)
        if not args.quick:
            res["timing"]["10M params, n=20"] = time_aggregators(20, 10_000_000, 1, False)
            progress.advance(task)

    res["clean_loss"] = res["clean"]["mean"]
    res["verdict"] = verdicts(res)
    res["wall_s"] = time.perf_counter() - started
    res["machine"] = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    )
    command = "python bench/robustness.py " + " ".join(sys.argv[1:])
    res["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite_or_none(res), indent=2))
    write_markdown(args.out.with_suffix(".md"), res, command)
    plot(args.out.with_suffix(".png"), res)
    for attack, v in res["verdict"].items():
        console.print(
            f"{attack:>13}: winner {v['winner_at_top_fraction']} x{v['winner_ratio']:.3f}; "
            f"failed {v['failed']}; hurt {v['hurt']}"
        )
    console.print(f"wrote {args.out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
