"""The `gridswarm` command line: hub, node, run, sample, demo."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gridswarm.config import ConfigError, load_run_config
from gridswarm.ledger.cli import ledger_app, node_balance, node_claim, run_fund

app = typer.Typer(
    help="Train language models on a swarm of machines, where energy is clean.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
run_app = typer.Typer(help="Create, inspect and export training runs.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(ledger_app, name="ledger")  # show, verify, post-epoch (gridswarm/ledger/cli.py)
run_app.command("fund")(run_fund)
# `gridswarm node [OPTIONS]` runs a node; `gridswarm node balance|claim` are its ledger commands
node_app = typer.Typer()
app.add_typer(node_app, name="node")
node_app.command("balance")(node_balance)
node_app.command("claim")(node_claim)
console = Console()

DEFAULT_HOME = Path(os.environ.get("GRIDSWARM_HOME", Path.home() / ".gridswarm"))
HubOpt = Annotated[str, typer.Option("--hub", envvar="GRIDSWARM_HUB", help="hub URL")]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _client(hub: str, home: Path):
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient

    return HubClient(hub, Identity.load_or_create(home / "sponsor.key"), retry_for_s=10.0)


@app.command()
def hub(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL: sqlite:///hub.db or postgresql://…")] = (
        "sqlite:///gridswarm-hub.db"
    ),
    blobs: Annotated[Path, typer.Option(help="folder of the blob store")] = Path("gridswarm-blobs"),
    host: str = "127.0.0.1",
    port: int = 8470,
    liveness_s: Annotated[float, typer.Option(help="a node silent this long is lost")] = 20.0,
    signals: Annotated[
        Path | None, typer.Option(help="TOML: region -> carbon signal, for accounting/planning")
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(help="folder of the hub's ledger key hub.key (default: beside --blobs)"),
    ] = None,
    max_run_memory_mb: Annotated[
        float | None,
        typer.Option(min=1, help="refuse runs estimated to need more (MiB per run; 4096)"),
    ] = None,
    sponsors: Annotated[
        Path | None,
        typer.Option(help="file of sponsor public keys (hex, one a line); default: open hub"),
    ] = None,
    max_active_runs: Annotated[
        int, typer.Option(min=1, help="open hub: active runs per identity")
    ] = 8,
    max_runs_per_hour: Annotated[
        int, typer.Option(min=1, help="open hub: runs created per identity per hour")
    ] = 20,
    requests_per_s: Annotated[
        float, typer.Option(min=0.01, help="signed requests per second per key (burst: 4x)")
    ] = 50.0,
) -> None:
    """Run a hub (migrates the database to the newest schema first)."""
    from gridswarm.hub.energy import load_hub_signals
    from gridswarm.hub.limits import load_sponsors
    from gridswarm.hub.server import serve
    from gridswarm.hub.service import HubSettings

    allowed = None
    if sponsors is not None:
        try:
            allowed = load_sponsors(sponsors)
        except (OSError, ValueError) as exc:
            _fail(str(exc))
        console.print(f"sponsors: {len(allowed)} keys may create and fund runs")

    console.print(f"gridswarm hub on http://{host}:{port}  db={db}  blobs={blobs}")
    by_region = {}
    if signals is not None:
        try:
            by_region = load_hub_signals(signals)
        except ValueError as exc:
            _fail(str(exc))
        described = ", ".join(f"{r}: {p.describe()}" for r, p in by_region.items())
        console.print(f"carbon signals: {described}")
    settings = HubSettings(
        liveness_s=liveness_s,
        signals=by_region,
        sponsors=allowed,
        max_active_runs_per_identity=max_active_runs,
        max_runs_per_hour_per_identity=max_runs_per_hour,
        requests_per_s=requests_per_s,
        request_burst=4 * requests_per_s,
    )
    if max_run_memory_mb is not None:
        settings = dataclasses.replace(settings, max_run_memory_mb=max_run_memory_mb)
    serve(db, blobs, host, port, settings, home)


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    hub_url: HubOpt = "http://127.0.0.1:8470",
    home: Annotated[Path, typer.Option(help="identity key and model cache")] = DEFAULT_HOME
    / "node",
    run: Annotated[str | None, typer.Option(help="run id (default: newest active run)")] = None,
    data: Annotated[Path | None, typer.Option(help="local text for federated runs")] = None,
    max_threads: Annotated[int, typer.Option(help="torch threads to use")] = 1,
    region: Annotated[str | None, typer.Option(help="grid region, e.g. DE or CISO")] = None,
    name: Annotated[str | None, typer.Option(help="a display name")] = None,
    throttle: Annotated[float, typer.Option(min=0, max=0.95, help="idle fraction (slower)")] = 0.0,
    max_rounds: Annotated[
        int | None, typer.Option(help="stop after this many contributions")
    ] = None,
    energy: Annotated[
        Path | None, typer.Option(help="energy TOML: region, signal, PV/battery, policy")
    ] = None,
) -> None:
    """Join a hub as a node and contribute training until stopped (Ctrl-C leaves cleanly)."""
    if ctx.invoked_subcommand is not None:  # `gridswarm node balance|claim …`
        return
    from gridswarm.node.agent import NodeAgent, NodeOptions

    if energy is not None:
        from gridswarm.node.energy import load_node_energy

        try:
            load_node_energy(energy, region)  # fail here, naming the field, not in the agent
        except ValueError as exc:
            _fail(str(exc))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s node %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    agent = NodeAgent(
        NodeOptions(
            hub_url=hub_url,
            home=home,
            run_id=run,
            data=data,
            max_threads=max_threads,
            region=region,
            name=name,
            throttle=throttle,
            max_rounds=max_rounds,
            energy=energy,
        )
    )
    agent.install_signal_handlers()
    console.print(f"node {agent.node_id} joining {hub_url}")
    stats = agent.run()
    console.print(
        f"node {agent.node_id} left: {stats.contributions} contributions, "
        f"{stats.tokens} tokens, {stats.bytes_up} bytes up"
    )


@run_app.command("create")
def run_create(
    config: Annotated[Path, typer.Argument(help="run.toml")],
    hub_url: HubOpt = "http://127.0.0.1:8470",
    home: Path = DEFAULT_HOME,
) -> None:
    """Start a run from a run.toml (validated here first: errors name the field)."""
    from gridswarm.node.client import HubRequestError

    try:
        cfg = load_run_config(config)
    except (ConfigError, OSError) as exc:
        _fail(str(exc))
    try:
        created = _client(hub_url, home).create_run(cfg.model_dump(mode="json"))
    except HubRequestError as exc:
        _fail(exc.detail)
    console.print(f"run [bold]{created.run_id}[/bold] created: {created.numel:,} parameters")
    print(created.run_id)


@run_app.command("status")
def run_status(
    run_id: Annotated[str | None, typer.Argument()] = None,
    hub_url: HubOpt = "http://127.0.0.1:8470",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: Path = DEFAULT_HOME,
) -> None:
    """Show all runs, or one run's rounds, losses and nodes."""
    client = _client(hub_url, home)
    if run_id is None:
        table = Table("run", "name", "status", "round", "version", "tokens")
        for r in client.runs():
            table.add_row(
                r["id"],
                r["name"],
                r["status"],
                str(r["round"]),
                str(r["version"]),
                f"{r['tokens_total']:,}",
            )
        console.print(table)
        return
    status = client.run_status(run_id)
    if as_json:
        print(json.dumps(status, indent=2))
        return
    from gridswarm.report import status_table

    console.print(status_table(status))


@run_app.command("export")
def run_export(
    run_id: str,
    out: Annotated[Path, typer.Argument(help="folder to write the model to")],
    hub_url: HubOpt = "http://127.0.0.1:8470",
    home: Path = DEFAULT_HOME,
) -> None:
    """Write the run's newest model as safetensors + config (Hugging Face layout for hf models)."""
    from gridswarm.export import export_run

    client = _client(hub_url, home)
    status = client.run_status(run_id)
    path = export_run(client, status, out)
    console.print(f"exported version {status['version']} of run {run_id} to {path}")


@run_app.command("report")
def run_report(
    run_id: str,
    hub_url: HubOpt = "http://127.0.0.1:8470",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: Path = DEFAULT_HOME,
) -> None:
    """Energy and carbon of a run: per node and in total tokens, kWh, kgCO2e, gCO2e per 1k
    tokens, local-surplus share, and the carbon-agnostic counterfactual."""
    from gridswarm.hub.energy import format_run_report
    from gridswarm.node.client import HubRequestError

    client = _client(hub_url, home)
    try:
        report = client.run_report(run_id)
        privacy = client.run_status(run_id).get("privacy")
    except HubRequestError as exc:
        _fail(exc.detail)
    if as_json:
        print(json.dumps({**report, "privacy": privacy} if privacy else report, indent=2))
        return
    print(format_run_report(report, privacy if isinstance(privacy, dict) else None))


@app.command()
def sample(
    model_dir: Annotated[Path, typer.Argument(help="folder written by `run export`")],
    prompt: str = "ROMEO:",
    tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
) -> None:
    """Generate text from an exported model."""
    from gridswarm.export import sample_text

    print(sample_text(model_dir, prompt, tokens, temperature, seed))


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="node processes at the start")] = 4,
    rounds: Annotated[int, typer.Option(help="outer rounds to train")] = 20,
    summary: Annotated[Path | None, typer.Option(help="write the summary JSON here")] = None,
    workdir: Annotated[Path | None, typer.Option(help="keep hub db/blobs here")] = None,
    port: int = 0,
    chaos: Annotated[bool, typer.Option(help="kill a node mid-round and add one later")] = True,
) -> None:
    """Embedded hub + local nodes of different speeds train a small GPT on tiny Shakespeare."""
    from gridswarm.demo import DemoOptions, run_demo

    result = run_demo(
        DemoOptions(nodes=nodes, rounds=rounds, workdir=workdir, port=port, chaos=chaos), console
    )
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result, indent=2))
        console.print(f"summary written to {summary}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
