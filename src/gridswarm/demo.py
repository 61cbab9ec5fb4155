"""`gridswarm demo`: a real hub process and real node processes on this machine.

Nodes get different speeds (an idle fraction per node), one is killed with SIGKILL in the middle of
a round and a new one joins later; the run carries on. A live view shows rounds, loss, nodes and
bytes; at the end a summary table, a JSON summary and a text sample from the trained model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from gridswarm.hub.lifecycle import RunState
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.report import human_bytes, status_table
from gridswarm.swarm import Swarm, free_port

DEMO_RUN = {
    "name": "demo-shakespeare",
    "seed": 1337,
    "model": {"kind": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 128},
    "data": {"dataset": "tinyshakespeare", "eval_batches": 8},
    "train": {
        "seq_len": 64,
        "batch_size": 16,
        "inner_steps": 60,
        "min_inner_steps": 5,
        "inner_lr": 3e-3,
    },
    "comm": {"codec": "int8", "codec_down": "int8"},
    "round": {"deadline_s": 40, "quorum": 2, "min_nodes": 2, "aggregator": "mean"},
}
THROTTLES = [0.0, 0.3, 0.5, 0.65, 0.2, 0.4]
TIMEOUT_S = 280.0
# each node on a grid with a constant signal at that grid's mean intensity in the shared traces
DEMO_GRIDS = [("FR", 56), ("DE", 313), ("CISO", 256), ("AZPS", 575), ("BPAT", 55), ("GB", 213)]


def demo_energy(workdir: Path, i: int) -> list[str]:
    """`--energy` for demo node i: a small TOML with its region and constant signal."""
    region, g = DEMO_GRIDS[i % len(DEMO_GRIDS)]
    path = workdir / f"energy-{i + 1}.toml"
    path.write_text(
        f'[energy]\nregion = "{region}"\n'
        f'signal = {{ kind = "constant", intensity_g_per_kwh = {g} }}\n'
    )
    return ["--energy", str(path)]


@dataclass
class DemoOptions:
    nodes: int = 4
    rounds: int = 20
    workdir: Path | None = None
    port: int = 0
    chaos: bool = True


def live_view(status: dict, events: list[str], names: dict[str, str], elapsed_s: float) -> Group:
    losses = status["val_loss"]
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]round[/bold] {status['round']}",
        f"[bold]version[/bold] {status['version']}",
        f"[bold]val loss[/bold] {losses[0]:.3f} → [green]{losses[-1]:.3f}[/green]",
        f"[bold]up[/bold] {human_bytes(status['bytes_up_total'])}",
        f"[bold]down[/bold] {human_bytes(status['bytes_down_total'])}",
        f"[bold]sync-DP would send[/bold] {human_bytes(status['bytes_sync_dp_equivalent'])}",
        f"{elapsed_s:.0f} s",
    )
    nodes = Table("node", "status", "contributions", "tokens", "bytes up", box=None)
    done = {n["id"]: n for n in status["nodes"]}
    live = {n["id"]: n["status"] for n in status["live_nodes"]}
    for node_id, name in names.items():
        n = done.get(node_id, {"contributions": 0, "tokens": 0, "bytes_up": 0})
        state = live.get(node_id, "[red]gone[/red]")
        nodes.add_row(
            name, state, str(n["contributions"]), f"{n['tokens']:,}", human_bytes(n["bytes_up"])
        )
    return Group(
        Panel(head, title=f"gridswarm demo — run {status['id']}"),
        nodes,
        *[f"[yellow]• {e}[/yellow]" for e in events[-4:]],
    )


def run_demo(opts: DemoOptions, console: Console) -> dict:
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="gridswarm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(workdir, opts.port or free_port())
    started = time.monotonic()
    events: list[str] = []
    kills = joins = 0
    console.print(f"[bold]gridswarm demo[/bold]: hub + {opts.nodes} nodes in {workdir}")
    try:
        swarm.start_hub()
        client = HubClient(swarm.url, Identity.load_or_create(workdir / "sponsor.key"))
        config = {**DEMO_RUN, "budget": {"rounds": opts.rounds}}
        run_id = client.create_run(config).run_id
        for i in range(opts.nodes):
            throttle = THROTTLES[i % len(THROTTLES)]
            swarm.start_node(f"node-{i + 1}", run_id, throttle, demo_energy(workdir, i))
        victim = list(swarm.nodes)[min(1, opts.nodes - 1)]
        kill_round = max(1, opts.rounds // 3)
        join_round = max(kill_round + 1, 2 * opts.rounds // 3)
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() - started < TIMEOUT_S:
                status = client.run_status(run_id)
                states = {n["id"]: n["status"] for n in status["live_nodes"]}
                if (
                    opts.chaos
                    and kills == 0
                    and status["round"] >= kill_round
                    and states.get(victim) == "training"
                    and opts.nodes > 1
                ):
                    swarm.kill_node(victim)
                    kills += 1
                    events.append(
                        f"round {status['round']}: SIGKILL {swarm.names[victim]} "
                        "mid-round — the round closes without it"
                    )
                if opts.chaos and joins == 0 and status["round"] >= join_round:
                    extra = demo_energy(workdir, opts.nodes)
                    swarm.start_node(f"node-{opts.nodes + 1}", run_id, 0.1, extra)
                    joins += 1
                    events.append(
                        f"round {status['round']}: node-{opts.nodes + 1} joins "
                        f"and starts from version {status['version']}"
                    )
                live.update(live_view(status, events, swarm.names, time.monotonic() - started))
                if status["status"] == RunState.FINISHED:
                    break
                time.sleep(0.5)
        status = client.run_status(run_id)
        console.print(status_table(status))
        from gridswarm.hub.energy import format_run_report

        console.print(format_run_report(client.run_report(run_id)), markup=False, highlight=False)
        sample = ""
        if status["version"] > 0:
            from gridswarm.export import export_run, sample_text

            model_dir = export_run(client, status, workdir / "model")
            sample = sample_text(model_dir, "ROMEO:", 200, 0.8, seed=0)
            console.print(Panel(sample, title=f"sample from version {status['version']}"))
        client.close()
    finally:
        swarm.stop()
    losses = status["val_loss"]
    return {
        "run_id": run_id,
        "status": status["status"],
        "val_loss_start": losses[0],
        "val_loss_end": losses[-1],
        "val_loss": losses,
        "rounds_completed": status["version"],
        "tokens_total": status["tokens_total"],
        "bytes_up_total": status["bytes_up_total"],
        "bytes_down_total": status["bytes_down_total"],
        "bytes_sync_dp_equivalent": status["bytes_sync_dp_equivalent"],
        "node_kills": kills,
        "node_joins": joins,
        "duration_s": round(time.monotonic() - started, 1),
        "nodes": [
            {
                "id": n["id"],
                "name": n["name"],
                "tokens": n["tokens"],
                "bytes_up": n["bytes_up"],
                "contributions": n["contributions"],
            }
            for n in status["nodes"]
        ],
        "energy": {  # metered per contribution, accounted at the node's grid (docs/energy.md)
            k: status.get("energy", {}).get(k)
            for k in ("policy", "energy_wh", "emissions_g", "g_per_1k_tokens")
        },
        "sample": sample,
        "workdir": str(workdir),
    }
