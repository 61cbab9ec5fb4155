"""Compute utilisation over slow links, and the swarm's own overhead on one node.

Part 1, utilisation. A real hub process and N real node processes; each node reaches the hub
through its own link proxy (gridswarm.netlink: a token-bucket rate and RTT/2 delay per direction
on loopback), a >= 10 M-parameter GPT, int8 pseudo-gradients up and int8 updates down. Per node:

    utilisation = time in training steps / wall time from its first assignment to its last
                  contribution acknowledged

measured from the hub's own records after the run (so it works for any node code): the
assignments' creation times, the contributions' storage times and their `train_time_s` (the
node's seconds inside `Workload.train`). Hub and nodes share one clock (one machine). "steady"
leaves out the first round (its full fp32 model download and first-step warm-up): from the
first contribution acknowledged to the last. Beside the limited links: the oracle (100 %: a node
that never waits) and a control (the same swarm with no link limit), and a hard case.

Sides: `no-overlap` (the node trains, then uploads, then waits for the next version) and
`overlap` (`comm.overlap = true`: a node trains on while it uploads and downloads, Streaming
DiLoCo; only on a branch that has it — elsewhere the hub refuses the run config).

Part 2, the swarm's own overhead: tokens/s of one node's training path (`Workload.train`)
against a plain single-process torch loop, same model, batch and AdamW, interleaved trials,
medians (bench/node_overhead.py's `measure`).

    python bench/utilisation.py --quick --sides no-overlap
    python bench/utilisation.py --sides no-overlap,overlap       # 4 nodes, longer rounds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import create_engine, select

from gridswarm.config import parse_run_config
from gridswarm.hub import models as m
from gridswarm.identity import Identity
from gridswarm.netlink import LinkProxy
from gridswarm.node.client import HubClient, HubRequestError
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"kind": "gpt", "n_layer": 6, "n_head": 6, "n_embd": 384}  # 10.8 M parameters
SEQ_LEN, BATCH_SIZE = 64, 8  # ~0.3 s a step on one core of this machine
# name -> (rate in bit/s or None, round trip in s); "control" goes to the hub directly
LINKS: dict[str, tuple[float | None, float]] = {
    "control": (None, 0.0),
    "100M-50ms": (100e6, 0.05),
    "20M-200ms": (20e6, 0.2),
}
PRESETS = {
    "quick": {"nodes": 2, "inner_steps": 30, "rounds": 3, "overhead_steps": 6, "trials": 3},
    "full": {"nodes": 4, "inner_steps": 200, "rounds": 5, "overhead_steps": 20, "trials": 5},
}
RUN_TIMEOUT_S = 1800.0  # one swarm run
NODE_LOG = re.compile(r"compute_s=([0-9.]+)\s+wall_s=([0-9.]+)")  # the overlap branch's lines


def run_config(nodes: int, inner_steps: int, rounds: int, overlap: bool) -> dict:
    """The run: fixed H (min = max inner steps), every node in every round, verification off
    (hub replay audits and usefulness scoring cost hub time that is not the link's: see notes)."""
    comm: dict = {"codec": "int8", "codec_down": "int8"}
    if overlap:
        comm["overlap"] = True
    return {
        "name": "bench-utilisation",
        "seed": 2026,
        "model": MODEL,
        "train": {
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "inner_steps": inner_steps,
            "min_inner_steps": inner_steps,
            "inner_lr": 3e-3,
        },
        "comm": comm,
        "round": {"deadline_s": 900, "quorum": nodes, "min_nodes": nodes},
        "budget": {"rounds": rounds},
        "trust": {"audit_min_rate": 0.0, "audit_max_rate": 0.0, "usefulness": False},
    }


def node_utilisation(
    assigned: list[float],
    acked: list[tuple[float, float, int, int]],
    round_last_ack: dict[int, float],
    opened_at: dict[int, float],
) -> dict:
    """One node's figures from the hub's records, all in hub seconds: `assigned` its
    assignments' creation times, `acked` its contributions as (stored at, train_time_s, steps,
    round); `round_last_ack` the last contribution stored per round, `opened_at` when each
    round opened.

    Its wall time splits into compute, waiting for slower peers (its ack to the round's last
    ack), the hub's close (the round's last ack to the next round's opening: aggregation, the
    new version, its held-out loss) and the rest: downloads,
    uploads, encoding, polling, round trips. The split reads rounds as sequential (no
    overlap); each part is clamped to the node's window."""
    acked = sorted(acked)
    first, last = min(assigned), acked[-1][0]
    compute = sum(c[1] for c in acked)
    wall = last - first
    steps = sum(c[2] for c in acked)
    peers = hub = 0.0
    for stored_at, _, _, rnd in acked:
        done = min(round_last_ack.get(rnd, stored_at), last)
        peers += max(0.0, done - stored_at)
        if rnd + 1 in opened_at:
            hub += max(0.0, min(opened_at[rnd + 1], last) - max(done, stored_at))
    out = {
        "contributions": len(acked),
        "compute_s": round(compute, 3),
        "wall_s": round(wall, 3),
        "peers_s": round(peers, 3),
        "hub_close_s": round(hub, 3),
        "link_and_rest_s": round(max(0.0, wall - compute - peers - hub), 3),
        "utilisation": round(compute / wall, 4) if wall > 0 else None,
        "step_s": round(compute / steps, 4) if steps else None,
        "waiting_s_per_round": round((wall - compute) / len(acked), 3),
    }
    if len(acked) >= 2:  # steady: from the first ack to the last, the rounds after the first
        steady_wall = last - acked[0][0]
        steady_compute = sum(c[1] for c in acked[1:])
        out["steady_utilisation"] = round(steady_compute / steady_wall, 4)
        out["steady_waiting_s_per_round"] = round(
            (steady_wall - steady_compute) / (len(acked) - 1), 3
        )
    return out


def read_hub_records(db_url: str, run_id: str) -> tuple[dict[str, dict], dict[int, float]]:
    """Per node id: its assignments' times and its contributions, from the hub's database;
    and when each round opened."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assigns = conn.execute(
                select(m.Assignment.node_id, m.Assignment.created_at).where(
                    m.Assignment.run_id == run_id
                )
            ).all()
            contribs = conn.execute(
                select(
                    m.Contribution.node_id,
                    m.Contribution.created_at,
                    m.Contribution.train_time_s,
                    m.Contribution.steps,
                    m.Contribution.bytes_up,
                    m.Contribution.round,
                ).where(m.Contribution.run_id == run_id)
            ).all()
            rounds = conn.execute(
                select(m.Round.number, m.Round.opened_at).where(m.Round.run_id == run_id)
            ).all()
    finally:
        engine.dispose()
    nodes: dict[str, dict] = {}
    for node_id, created in assigns:
        nodes.setdefault(node_id, {"assigned": [], "acked": [], "bytes_up": 0})
        nodes[node_id]["assigned"].append(created)
    for node_id, created, train_s, steps, bytes_up, rnd in contribs:
        nodes[node_id]["acked"].append((created, train_s, steps, rnd))
        nodes[node_id]["bytes_up"] += bytes_up
    return nodes, {number: opened for number, opened in rounds if opened is not None}


def node_log_totals(path: Path) -> dict | None:
    """Sums of the node's own per-round `compute_s=… wall_s=…` log lines, where it writes them
    (the overlap branch); None where it does not."""
    if not path.exists():
        return None
    pairs = NODE_LOG.findall(path.read_text(errors="replace"))
    if not pairs:
        return None
    compute, wall = sum(float(c) for c, _ in pairs), sum(float(w) for _, w in pairs)
    return {"rounds": len(pairs), "compute_s": compute, "wall_s": wall, "share": compute / wall}


def run_case(side: str, link: str, preset: dict, progress: Progress) -> dict:
    """One swarm run: a hub, `preset['nodes']` nodes each behind its own `link`; per-node
    utilisation from the hub's records."""
    nodes, rounds = preset["nodes"], preset["rounds"]
    rate, rtt = LINKS[link]
    config = run_config(nodes, preset["inner_steps"], rounds, side == "overlap")
    task = progress.add_task(f"{side}, {link}: rounds", total=rounds)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-util-{side}-{link}-"))
    swarm = Swarm(workdir, free_port(), liveness_s=120)
    proxies: dict[str, LinkProxy] = {}
    try:
        swarm.start_hub()
        sponsor = HubClient(swarm.url, Identity.generate())
        try:
            run_id = sponsor.create_run(config).run_id
        except HubRequestError as exc:
            if side == "overlap" and "overlap" in exc.detail:
                raise SystemExit(f"this hub has no comm.overlap (Streaming DiLoCo): {exc}") from exc
            raise
        for i in range(nodes):
            name = f"node-{i}"
            url = None
            if link != "control":
                proxies[name] = LinkProxy("127.0.0.1", swarm.port, rate_bit_s=rate, rtt_s=rtt)
                proxies[name].start()
                url = proxies[name].url
            swarm.start_node(name, run_id, hub_url=url)
        started = time.monotonic()
        load_at_start = os.getloadavg()[0]
        while True:
            status = sponsor.run_status(run_id)
            progress.update(task, completed=status["version"])
            if status["status"] == "finished":
                break
            if status["status"] in ("stalled", "stopped"):
                raise RuntimeError(f"the run ended {status['status']}: see {workdir}")
            if time.monotonic() - started > RUN_TIMEOUT_S:
                raise TimeoutError(f"{side}/{link} did not finish in {RUN_TIMEOUT_S:.0f} s")
            time.sleep(1.0)
        wall_s = time.monotonic() - started
        load = (round(load_at_start, 2), round(os.getloadavg()[0], 2))
    finally:
        swarm.stop()
        for proxy in proxies.values():
            proxy.stop()
    records, opened_at = read_hub_records(swarm.db_url, run_id)
    for blobs in [workdir / "blobs", *workdir.glob("node-*/blobs")]:  # logs and hub.db stay
        shutil.rmtree(blobs, ignore_errors=True)
    round_last_ack: dict[int, float] = {}
    for rec in records.values():
        for stored_at, _, _, rnd in rec["acked"]:
            round_last_ack[rnd] = max(round_last_ack.get(rnd, stored_at), stored_at)
    per_node = {}
    for node_id, rec in sorted(records.items(), key=lambda kv: swarm.names.get(kv[0], kv[0])):
        name = swarm.names.get(node_id, node_id[:8])
        figures = node_utilisation(rec["assigned"], rec["acked"], round_last_ack, opened_at)
        figures["bytes_up_per_round"] = rec["bytes_up"] // max(len(rec["acked"]), 1)
        if name in proxies:
            c = proxies[name].counters
            figures["link_bytes"] = {"up": c.bytes_up, "down": c.bytes_down}
        figures["node_log"] = node_log_totals(workdir / f"{name}.log")
        per_node[name] = figures
    utils = [n["utilisation"] for n in per_node.values() if n["utilisation"] is not None]
    steady = [n["steady_utilisation"] for n in per_node.values() if "steady_utilisation" in n]
    waiting = [
        n["steady_waiting_s_per_round"] for n in per_node.values() if "steady_utilisation" in n
    ]
    step_s = statistics.median(n["step_s"] for n in per_node.values() if n["step_s"])
    # the H at which this round's waiting would be 5 % of the wall time (no overlap)
    h_95 = math.ceil(19 * statistics.mean(waiting) / step_s) if waiting else None
    return {
        "side": side,
        "link": link,
        "rate_bit_s": rate,
        "rtt_s": rtt,
        "nodes": nodes,
        "rounds": rounds,
        "inner_steps": preset["inner_steps"],
        "wall_s": round(wall_s, 1),
        "load_avg_1min_start_end": load,
        "per_node": per_node,
        "mean_utilisation": round(statistics.mean(utils), 4) if utils else None,
        "mean_shares": {
            part: round(statistics.mean(n[f"{part}_s"] / n["wall_s"] for n in per_node.values()), 4)
            for part in ("compute", "peers", "hub_close", "link_and_rest")
        },
        "mean_steady_utilisation": round(statistics.mean(steady), 4) if steady else None,
        "mean_steady_waiting_s_per_round": round(statistics.mean(waiting), 3) if waiting else None,
        "median_step_s": round(step_s, 4),
        "inner_steps_for_95pct": h_95,
        "workdir": str(workdir),
    }


def overhead(preset: dict) -> dict:
    """Part 2: one node's training path against a plain torch loop on the same model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from node_overhead import measure  # bench/node_overhead.py

    cfg = parse_run_config(
        {
            "model": MODEL,
            "train": {"seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "inner_steps": 20},
        }
    )
    return measure(cfg, torch.device("cpu"), preset["overhead_steps"], preset["trials"])


def add_link_costs(cases: list[dict]) -> None:
    """Each limited case's steady waiting per round beyond its side's control (no limit)."""
    control = {c["side"]: c for c in cases if c["link"] == "control"}
    for c in cases:
        base = control.get(c["side"])
        if base is not None and c is not base:
            c["link_cost_s_per_round"] = round(
                c["mean_steady_waiting_s_per_round"] - base["mean_steady_waiting_s_per_round"], 3
            )


def plot(cases: list[dict], path: Path) -> None:
    """Per node and case: compute (green) and the rest (grey) as shares of its wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {  # part -> (colour, legend)
        "compute": ("tab:green", "training"),
        "peers": ("tab:orange", "waiting for slower peers"),
        "hub_close": ("tab:blue", "hub closing the round"),
        "link_and_rest": ("0.75", "link (down/upload), polling, rest"),
    }
    labels, steady = ["oracle"], [1.0]
    shares: dict[str, list[float]] = {part: [1.0 if part == "compute" else 0.0] for part in parts}
    for case in cases:
        for name, n in case["per_node"].items():
            labels.append(f"{case['side']} {case['link']} {name}")
            steady.append(n.get("steady_utilisation") or 0.0)
            for part in parts:
                shares[part].append(n[f"{part}_s"] / n["wall_s"] if n["wall_s"] else 0.0)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 2.4))
    ys = range(len(labels))
    left = [0.0] * len(labels)
    for part, (colour, legend) in parts.items():
        ax.barh(ys, shares[part], left=left, color=colour, label=legend)
        left = [a + b for a, b in zip(left, shares[part], strict=True)]
    ax.plot(steady, ys, "k|", markersize=14, label="steady (after round 1)")
    ax.axvline(0.95, color="tab:red", linestyle="--", linewidth=1, label="target 95 %")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the node's wall time (first assignment → last contribution acked)")
    ax.set_title("Compute utilisation per node")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    preset, cases, ov = result["preset"], result["cases"], result["overhead"]
    lines = [
        f"# Compute utilisation over slow links ({result['preset_name']})",
        "",
        f"`{result['command']}` — {result['machine']}",
        "",
        f"{result['parameters'] / 1e6:.1f} M-parameter GPT (6 layers, 384 wide), seq {SEQ_LEN} × "
        f"batch {BATCH_SIZE}, H = {preset['inner_steps']} inner steps, {preset['rounds']} rounds, "
        f"{preset['nodes']} nodes, int8 up and down, one hub; each node behind its own link "
        "proxy (gridswarm.netlink). Utilisation per node = time in training steps / wall time "
        "from its first assignment to its last contribution acknowledged (hub records); "
        "*steady* leaves out the first round (full fp32 model download).",
        "",
        "| side | link | per node | mean | steady mean | waiting s/round (steady) "
        "| of which peers / hub / link+rest | step s | H for 95 % | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| oracle | — | 100 % | 100 % | 100 % | 0 | — | — | — | — |",
    ]
    for c in cases:
        per = ", ".join(f"{n['utilisation']:.1%}" for n in c["per_node"].values())
        sh = c["mean_shares"]
        split = f"{sh['peers']:.1%} / {sh['hub_close']:.1%} / {sh['link_and_rest']:.1%}"
        lines.append(
            f"| {c['side']} | {c['link']} | {per} | **{c['mean_utilisation']:.1%}** | "
            f"{c['mean_steady_utilisation']:.1%} | {c['mean_steady_waiting_s_per_round']} | "
            f"{split} | {c['median_step_s']} | {c['inner_steps_for_95pct']} | {c['wall_s']} |"
        )
    lines += [
        "",
        "Target ≥ 95 % (OpenDiLoCo reports 90–95 %, INTELLECT-1 83–96 %). *H for 95 %*: the "
        "inner steps per round at which the measured steady waiting would be 5 % of a "
        "round (no overlap). *peers / hub / link+rest*: shares of the wall time (all rounds) "
        "spent waiting for slower peers to contribute, for the hub to make the next version, "
        "and the rest (downloads, uploads, encoding, polling, round trips).",
        "",
        "Link cost per round (steady waiting beyond the control's, same side): "
        + (
            ", ".join(
                f"{c['side']} {c['link']} {c['link_cost_s_per_round']:+.2f} s"
                for c in cases
                if "link_cost_s_per_round" in c
            )
            or "no control run"
        )
        + ". Machine load (1-min average at start, end of each run): "
        + ", ".join(f"{c['link']} {c['load_avg_1min_start_end']}" for c in cases)
        + ".",
    ]
    if ov:
        rate = ov["tokens_per_s"]
        lines += [
            "",
            f"## The swarm's own overhead ({ov['parameters'] / 1e6:.1f} M, one node, CPU)",
            "",
            f"{ov['trials']} interleaved trials of {ov['steps']} steps "
            f"({ov['tokens_per_trial']} tokens), median; plain = a single-process torch loop "
            "(AdamW, clip), same batches.",
            "",
            "| path | tokens/s | share of plain |",
            "|---|---|---|",
            *[f"| {n} | {rate[n]:,.0f} | {ov['share_of_plain'][n]:.1%} |" for n in rate],
            "",
            "Target: node ≥ 95 % of plain.",
        ]
    lines += [
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in result["notes"]],
        "",
        f"![utilisation]({Path(result['out']).with_suffix('.png').name})",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 nodes, H = 30, 3 rounds (~6 min)")
    parser.add_argument("--sides", default="no-overlap", help="no-overlap,overlap")
    parser.add_argument("--links", default=",".join(LINKS), help=f"of {', '.join(LINKS)}")
    parser.add_argument("--nodes", type=int, help="nodes per swarm (default: the preset's)")
    parser.add_argument("--inner-steps", type=int, help="H (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="rounds per swarm run (default: the preset's)")
    parser.add_argument("--skip-overhead", action="store_true", help="part 1 only")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the plot and table from --out's JSON"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/utilisation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.replot:
        result = json.loads(args.out.read_text())
        plot(result["cases"], args.out.with_suffix(".png"))
        args.out.with_suffix(".md").write_text(markdown(result))
        return
    preset_name = "quick" if args.quick else "full"
    preset = dict(PRESETS[preset_name])
    for key in ("nodes", "inner_steps", "rounds"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    sides = [s for s in args.sides.split(",") if s]
    links = [name for name in args.links.split(",") if name]
    for side in sides:
        if side not in ("no-overlap", "overlap"):
            parser.error(f"unknown side {side!r}")
    for link in links:
        if link not in LINKS:
            parser.error(f"unknown link {link!r}")
    console = Console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    cases = []
    with Progress(*columns, console=console) as progress:
        for side in sides:
            for link in links:
                cases.append(run_case(side, link, preset, progress))
    add_link_costs(cases)
    ov = {} if args.skip_overhead else overhead(preset)
    parameters = Workload.from_config(parse_run_config(run_config(1, 1, 1, False))).numel
    result = {
        "command": " ".join(["python", "bench/utilisation.py", *sys.argv[1:]]),
        "preset_name": preset_name,
        "preset": preset,
        "parameters": parameters,
        "definition": "per node: sum(train_time_s) / (last contribution stored - first "
        "assignment created), hub clock; steady: rounds after the first, from the first ack",
        "cases": cases,
        "overhead": ov,
        "targets": {"utilisation": ">= 0.95", "node_share_of_plain": ">= 0.95"},
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
        "out": str(args.out),
        "notes": [
            f"All {preset['nodes']} nodes, the hub and the proxies share this machine's "
            f"{os.cpu_count()} cores: each node's step is slower than alone, which makes "
            "compute a larger share than on separate machines with the same links (and the "
            "hub's aggregation competes with the nodes).",
            "Hub replay audits and usefulness scoring are off: they are hub work on the "
            "round's critical path unrelated to the link (bench/ledger.py prices them).",
            "Times are the hub's: a node receives its assignment RTT/2 after the hub made it, "
            "and its ack RTT/2 after the hub stored the contribution — the window is "
            "within one RTT of the node's own.",
            "Without overlap every round waits for the upload, the hub's aggregation of all "
            "contributions (quorum = all nodes) and the download of the next version; "
            "`--sides overlap` measures Streaming DiLoCo where the branch has it.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(cases, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(markdown(result))
    table = Table("side", "link", "per node", "mean", "steady", "waiting s/round", "H for 95 %")
    for c in cases:
        table.add_row(
            c["side"],
            c["link"],
            ", ".join(f"{n['utilisation']:.1%}" for n in c["per_node"].values()),
            f"{c['mean_utilisation']:.1%}",
            f"{c['mean_steady_utilisation']:.1%}",
            str(c["mean_steady_waiting_s_per_round"]),
            str(c["inner_steps_for_95pct"]),
        )
    console.print(table)
    if ov:
        console.print(f"node path: {ov['share_of_plain']['node']:.1%} of a plain torch loop")


if __name__ == "__main__":
    main()
