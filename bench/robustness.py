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
step, down-codec with error feedback), the function `hub.closing.compute_version` calls.

The setting is the one the ALIE and IPM papers attack, SGD-like rather than DiLoCo-like: many
nodes (20), a few inner steps (H = 2) on single-sequence batches with no inner warm-up, non-IID
shards, so that honest updates disagree (reported: their mean pairwise cosine, the median over
coordinates of |mu_j| / sigma_j and the share of coordinates where sigma_j > |mu_j|), and enough
rounds (40) for an attack's bias to accumulate. In a setting where honest updates nearly
coincide, ALIE and IPM rows are simply filtered or drowned and every aggregator looks alike.
`--inner-steps` changes H alone, to see how a longer DiLoCo round weakens ALIE.

Why ALIE needs this setting here: its rows add -z sigma to the aggregate, so the weights drift
along +sigma, every coordinate the same sign, and a pre-norm weight-tied GPT is nearly blind to
such a shift (LayerNorm removes a common offset of a vector, softmax a common offset of the
logits). `shift_sensitivity` measures it on every run and the markdown reports it: at small
inner steps (the node default warm-up makes the first steps 1/10 of the lr) the accumulated
drift stays in that blind region and ALIE costs nothing; at a stated lr of 0.03 with no warm-up
the drift grows out of it.

Attacks with their literature parameters (see ATTACK_VARIANTS): ALIE (Baruch et al. 2019) with
z from the paper's n/f formula and with a fixed z = 1; inner-product manipulation (Xie et al.
2019) with a small epsilon = 0.1 (aimed at Krum / median) and a large epsilon = 10 (> (n-f)/f at
every fraction here, which reverses the plain mean). --quick runs only those four; the default
preset (and --attacks all) adds sign-flip, scaling, noise and garbage data.

Reported: held-out eval loss (the mean over the last EVAL_LAST_ROUNDS rounds of the same budget)
for 0 % attackers and each attacker fraction, per aggregator and attack, as a ratio to the clean
plain mean and to the rule's own clean run; per attack which aggregator wins and which fail; how
far each rule's aggregate was pulled from the honest mean; plus aggregation time per aggregator
at 1M parameters (n=100 updates; the default preset adds 10M parameters, n=20) and a naive
pairwise-loop Krum as a same-machine baseline. Writes JSON to --out, a markdown table (.md) and
a plot (.png) next to it.
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
# A run's loss is the mean eval loss after each of its last rounds: with noisy updates and outer
# momentum the loss after one given round wobbles by a few %, which would decide 1.05-1.10 cells.
EVAL_LAST_ROUNDS = 5
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
    # The node default (TrainConfig) warms the fresh inner AdamW up over 10 steps: with H = 2 the
    # steps would run at 1/10 and 2/10 of inner_lr. The presets set 0 so the lr is the one stated.
    inner_warmup_steps: int = 10


# SGD-like, as in the ALIE / IPM papers: 20 nodes, 2 inner steps on one sequence each, non-IID
# shards, lr 0.03 with no warm-up (honest updates disagree: statistics reported), and 40 rounds
# for a per-round bias to accumulate. The earlier quick preset (10 nodes, 30 rounds x 2 steps of
# 2 sequences, lr 0.01 with the node's 10-step warm-up, so 0.001 and 0.002 in effect) left
# ALIE's drift where the model does not see it: no rule was hurt.
QUICK = Setting(20, 40, 2, 1, 32, 2, 32, 1, 3e-2, 8, True, 0)
FULL = Setting(20, 40, 4, 2, 64, 4, 32, 4, 3e-3, 16, True, 0)


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
            inner_warmup_steps=s.inner_warmup_steps,
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

    def run(
        self,
        aggregator: Aggregator,
        variant: AttackVariant | None,
        n_attackers: int,
        keep_state: bool = False,
    ) -> dict:
        """Train for the setting's rounds; returns the eval loss (mean over the last
        EVAL_LAST_ROUNDS rounds), time spent aggregating and
        per-round diagnostics over rounds: the honest updates' mean pairwise cosine, their
        per-coordinate signal to noise (median over coordinates of |mu_j| / sigma_j; the median
        over rounds) and share of coordinates with sigma_j > |mu_j|, and
        the aggregate's cosine with and norm relative to the honest mean (how far the rule was
        pulled). `keep_state` adds the final weights and the last round's honest uploads."""
        theta, momentum, residual = self.theta0.clone(), None, None
        n_honest = self.s.n_nodes - n_attackers
        agg_s = 0.0
        stats: dict[str, list[float]] = {
            k: [] for k in ("cos", "snr", "noisy", "agg_cos", "agg_norm")
        }
        honest = torch.zeros(0)
        last_losses: list[float] = []
        try:
            for rnd in range(self.s.rounds):
                honest = torch.stack([self.local(theta, rnd, i, False) for i in range(n_honest)])
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
                for key, value in round_stats(honest, pseudo_gradient).items():
                    stats[key].append(value)
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
                if rnd >= self.s.rounds - EVAL_LAST_ROUNDS:
                    last_losses.append(evaluate(self.model, theta, self.eval_set))
            loss = sum(last_losses) / len(last_losses)
        except FloatingPointError:
            loss = math.inf
        if not math.isfinite(loss):
            loss = math.inf
        result = {
            "eval_loss": loss,
            "aggregate_s": agg_s,
            "honest_cosine": _average(stats["cos"]),
            "honest_snr": _median(stats["snr"]),
            "honest_noisy_share": _average(stats["noisy"]),
            "aggregate_cosine": _average(stats["agg_cos"]),
            "aggregate_norm_ratio": _average(stats["agg_norm"]),
        }
        if keep_state:
            result |= {"theta": theta, "honest": honest}
        return result


def _average(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else math.nan


def round_stats(honest: torch.Tensor, aggregate: torch.Tensor) -> dict[str, float]:
    """One round's diagnostics: honest agreement (mean pairwise cosine), honest per-coordinate
    signal to noise (median over coordinates with sigma_j > 0 of |mu_j| / sigma_j; ALIE's shift
    z sigma dominates where this is small) and the share of coordinates where sigma_j > |mu_j|,
    and the aggregate against the honest mean mu (cosine,
    norm ratio)."""
    mu = honest.mean(dim=0)
    sigma = honest.std(dim=0, correction=0)
    noisy = sigma > 0
    snr = float((mu[noisy].abs() / sigma[noisy]).median()) if bool(noisy.any()) else math.nan
    mu_norm = float(mu.norm())
    cos = float(torch.nn.functional.cosine_similarity(aggregate, mu, dim=0))
    return {
        "cos": mean_pairwise_cosine(honest) if honest.shape[0] > 1 else math.nan,
        "snr": snr,
        "noisy": float((sigma > mu.abs()).float().mean()),
        "agg_cos": cos,
        "agg_norm": float(aggregate.norm()) / mu_norm if mu_norm > 0 else math.nan,
    }


SHIFT_MULTIPLES = (10.0, 30.0, 100.0)


def shift_sensitivity(swarm: Swarm, theta: torch.Tensor, honest: torch.Tensor) -> dict:
    """How much the eval loss moves when the weights move along ALIE's direction.

    ALIE's rows are mu - z sigma: against the honest mean they add -z sigma to the aggregate,
    so the weights drift by +sigma (every coordinate the same sign) round after round. Returned:
    the loss change at theta + t sigma and at theta + t (sigma * random signs), the same
    per-coordinate magnitudes in a direction with no structure, for t in SHIFT_MULTIPLES
    (sigma of the given honest uploads). A pre-norm, weight-tied GPT barely notices a
    same-sign shift (LayerNorm removes per-vector offsets, softmax a common logit offset)."""
    sigma = honest.std(dim=0, correction=0)
    signs = torch.randint(0, 2, sigma.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    base = evaluate(swarm.model, theta, swarm.eval_set)
    out: dict = {"base_loss": base, "sigma_norm": float(sigma.norm()), "multiples": {}}
    for t in SHIFT_MULTIPLES:
        same = evaluate(swarm.model, theta + t * sigma, swarm.eval_set) - base
        rand = evaluate(swarm.model, theta + t * sigma * signs, swarm.eval_set) - base
        out["multiples"][str(t)] = {"same_sign": same, "random_sign": rand}
    return out


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
            # what the attack itself costs each rule: worst attacked loss / the rule's clean loss
            "worst_own_ratio": {
                agg: max(cells[agg][str(f)] for f in FRACTIONS) / res["clean"][agg]
                for agg in AGGREGATOR_ROWS
            },
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
        f"warm-up {s.get('inner_warmup_steps', 10)} steps, "
        f"batch {s['batch_size']}x{s['seq_len']}), outer Nesterov lr {cfg.outer_lr} momentum "
        f"{cfg.outer_momentum} (the hub's close: `make_aggregator` from the registry, then "
        f"`outer_update`; every upload, crafted ones included, through the int8 up-codec; int8 "
        f"down with error feedback); "
        f"{'non-IID (a contiguous shard per node)' if s.get('non_iid', True) else 'IID'} slices. "
        f"Honest updates' mean pairwise cosine: {res['honest_cosine']:.2f}, per-coordinate "
        f"signal to noise (median over coordinates of |mu_j| / sigma_j): "
        f"{res.get('honest_snr', math.nan):.2f} (median over rounds), share of coordinates "
        f"with sigma_j > |mu_j|: {res.get('honest_noisy_share', math.nan):.0%} (clean mean run). "
        f"Attackers are omniscient: they craft their rows from the "
        f"honest uploads of the same round. Run time {res['wall_s']:.0f} s on {res['machine']}.",
        "",
        f"Clean plain mean (0 % attackers): **{res['clean_loss']:.3f}** (initial "
        f"{res['initial_loss']:.3f}). Cells: eval loss (mean over the last {EVAL_LAST_ROUNDS} "
        f"rounds) / ratio to the clean plain mean; "
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
    lines += shift_lines(res)
    top_label = f"{int(FRACTIONS[-1] * 100)} %"
    for attack in res["attacks"]:
        lines += [
            f"## {attack}",
            "",
            "| aggregator | 0 % | "
            + " | ".join(f"{int(f * 100)} %" for f in FRACTIONS)
            + f" | {top_label} / own clean | cos, norm vs honest mean at {top_label} |",
        ]
        lines.append("|---" * (len(FRACTIONS) + 4) + "|")
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
            own = res["attacked"][attack][agg][str(FRACTIONS[-1])] / res["clean"][agg]
            cells.append(f"{own:.2f}" if math.isfinite(own) else "-")
            pull = res.get("pull", {}).get(attack, {}).get(agg, {}).get(str(FRACTIONS[-1]))
            cells.append(f"{pull['cosine']:+.2f}, {pull['norm_ratio']:.2f}" if pull else "-")
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
    attacks = list(res["verdict"])
    lines += [
        "",
        "What each attack costs each rule, apart from the rule's own clean cost: worst attacked "
        "loss over the fractions / the rule's clean loss (a rule that is worse than the mean "
        "without attackers is marked hurt above for that alone).",
        "",
        "| aggregator | clean / clean mean | " + " | ".join(attacks) + " |",
        "|---" * (len(attacks) + 2) + "|",
    ]
    for agg in AGGREGATOR_ROWS:
        own = [res["verdict"][a].get("worst_own_ratio", {}).get(agg, math.nan) for a in attacks]
        lines.append(
            f"| {agg} | {res['clean'][agg] / res['clean_loss']:.2f} | "
            + " | ".join(f"{r:.2f}" if math.isfinite(r) else "diverged" for r in own)
            + " |"
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


def shift_lines(res: dict) -> list[str]:
    """The markdown paragraph on how much ALIE's direction costs this model (shift_sensitivity)."""
    shift = res.get("shift_sensitivity")
    if not shift:
        return []
    cells = "; ".join(
        f"{float(t):.0f} sigma: {v['same_sign']:+.3f} vs {v['random_sign']:+.3f}"
        for t, v in shift["multiples"].items()
    )
    return [
        "ALIE's direction: the rows are mu - z sigma, so against the honest mean they pull the "
        "weights along +sigma (the same sign in every coordinate) every round. Eval loss change "
        f"when the clean mean run's final weights (loss {shift['base_loss']:.3f}) move by t x "
        "the last round's honest sigma, all signs + vs random signs (same magnitudes): "
        f"{cells}. With the outer Nesterov momentum a bias that persists is applied about "
        f"lr / (1 - momentum) = {TrainConfig().outer_lr / (1 - TrainConfig().outer_momentum):.0f}"
        " times per round.",
        "",
    ]


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


def _inf_for_none(value):
    """The inverse of finite_or_none: a diverged loss (null in JSON) back to infinity."""
    if value is None:
        return math.inf
    if isinstance(value, dict):
        return {k: _inf_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_inf_for_none(v) for v in value]
    return value


def render(path: Path) -> None:
    """Rewrite the markdown and plot of a result JSON with this version's layout and verdict."""
    res = _inf_for_none(json.loads(path.read_text()))
    res["verdict"] = verdicts(res)
    path.write_text(json.dumps(finite_or_none(res), indent=2))
    write_markdown(path.with_suffix(".md"), res, res["command"])
    plot(path.with_suffix(".png"), res)
    console.print(f"rendered {path.with_suffix('.md')} and .png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small model, ALIE and IPM only (~6 min idle)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/robustness.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iid", action="store_true", help="every node draws from the whole text")
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="override the preset's inner steps per round (H), everything else unchanged",
    )
    parser.add_argument(
        "--attacks",
        default=None,
        help="comma-separated attack variants, or 'all' (default: --quick ALIE and IPM only, "
        f"else all); variants: {', '.join(ATTACK_VARIANTS)}",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="rewrite the .md and .png of an existing result JSON (no training) and exit",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.render is not None:
        render(args.render)
        return
    setting = QUICK if args.quick else FULL
    if args.iid:
        setting = Setting(**{**setting.__dict__, "non_iid": False})
    if args.inner_steps is not None:
        if not 1 <= args.inner_steps <= 10_000:
            parser.error(f"--inner-steps must be in [1, 10000], got {args.inner_steps}")
        setting = Setting(**{**setting.__dict__, "inner_steps": args.inner_steps})
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
        # per cell: the aggregate's cosine with / norm relative to the honest mean (round average)
        "pull": {a: {g: {} for g in AGGREGATOR_ROWS} for a in attacks},
        "aggregate_s": {g: 0.0 for g in AGGREGATOR_ROWS},
    }
    res["alie_z"] = {str(f): alie_z(setting.n_nodes, round(f * setting.n_nodes)) for f in FRACTIONS}
    with Progress(console=console) as progress:
        task = progress.add_task(
            "training runs", total=len(AGGREGATOR_ROWS) * (1 + len(attacks) * len(FRACTIONS))
        )
        for label, (name, options) in AGGREGATOR_ROWS.items():
            agg = make_aggregator(name, **options)
            out = swarm.run(agg, None, 0, keep_state=label == "mean")
            res["clean"][label] = out["eval_loss"]
            if label == "mean":
                res["honest_cosine"] = out["honest_cosine"]
                res["honest_snr"] = out["honest_snr"]
                res["honest_noisy_share"] = out["honest_noisy_share"]
                res["shift_sensitivity"] = shift_sensitivity(swarm, out["theta"], out["honest"])
            progress.advance(task)
            for attack in attacks:
                for f in FRACTIONS:
                    n_attackers = round(f * setting.n_nodes)
                    out = swarm.run(agg, ATTACK_VARIANTS[attack], n_attackers)
                    res["attacked"][attack][label][str(f)] = out["eval_loss"]
                    res["pull"][attack][label][str(f)] = {
                        "cosine": out["aggregate_cosine"],
                        "norm_ratio": out["aggregate_norm_ratio"],
                    }
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
