"""The `gridswarm` command line: hub, node, run, sample, demo.

An error a user can act on ends the command with one line on stderr saying what went wrong and
what to do, and a non-zero exit (`explain`); `--debug` (anywhere on the line, or GRIDSWARM_DEBUG=1)
shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gridswarm.config import ConfigError, load_run_config
from gridswarm.hub.epochs import EpochChain
from gridswarm.hub.limits import (
    DEFAULT_MAX_DATASET_MB,
    DEFAULT_MAX_DATASET_MB_PER_IDENTITY,
    DEFAULT_MAX_NEW_NODES,
    DEFAULT_REGISTER_PER_NET_HOUR,
    MAX_REPLICA_COUNT,
)
from gridswarm.ledger.cli import (
    EscrowOpt,
    EthKeyOpt,
    RpcOpt,
    TokenOpt,
    ledger_app,
    node_balance,
    node_claim,
    run_fund,
    run_refund,
)

if TYPE_CHECKING:
    from gridswarm.hub.epochs import EpochChain
    from gridswarm.node.client import HubClient
    from gridswarm.protocol import RunCreateResponse

app = typer.Typer(
    help="Train language models on a swarm of machines, where energy is clean.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
run_app = typer.Typer(help="Create, inspect and export training runs.", no_args_is_help=True)
app.add_typer(run_app, name="run")
data_app = typer.Typer(help="Prepare and check tokenised datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(ledger_app, name="ledger")  # show, verify, post-epoch (gridswarm/ledger/cli.py)
run_app.command("fund")(run_fund)
run_app.command("refund")(run_refund)
# `gridswarm node [OPTIONS]` runs a node; `gridswarm node balance|claim` are its ledger commands
node_app = typer.Typer()
app.add_typer(node_app, name="node")
node_app.command("balance")(node_balance)
node_app.command("claim")(node_claim)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one line each, whatever the width

DEFAULT_HOME = Path(os.environ.get("GRIDSWARM_HOME", Path.home() / ".gridswarm"))
DEFAULT_HUB = "http://127.0.0.1:8470"
HubOpt = Annotated[
    str | None,
    typer.Option(
        "--hub",
        envvar="GRIDSWARM_HUB",
        help=f"hub URL, or the URLs of its replicas URL1,URL2,… (default {DEFAULT_HUB})",
    ),
]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="more detail")]
QuietOpt = Annotated[int, typer.Option("--quiet", "-q", count=True, help="less detail")]
CLI_RETRY_S = 5.0  # how long a sponsor command retries an unreachable hub


def _error(message: str) -> None:
    err_console.print(Text.assemble(("error: ", "red"), message))


def _fail(message: str) -> None:
    _error(message)
    raise typer.Exit(2)


def _hub_url(hub: str | None) -> str:
    """The --hub URL; the default is said aloud, so nobody wonders where a node went."""
    if hub is None:
        err_console.print(f"no --hub given: using {DEFAULT_HUB} (set --hub or GRIDSWARM_HUB)")
        return DEFAULT_HUB
    return hub


def _client(hub: str | None, home: Path):
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient

    key_path = home / "sponsor.key"
    identity, created = Identity.ensure(key_path)
    if created:
        err_console.print(
            f"created your sponsor key at {key_path} (keep it: it is how the hub knows your runs)"
        )
    return HubClient(_hub_url(hub), identity, retry_for_s=CLI_RETRY_S)


def _reader(hub: str | None):
    """A client for public reads (run status, report, export): a throwaway key, so reading
    never creates a sponsor key on disk."""
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient

    return HubClient(_hub_url(hub), Identity.generate(), retry_for_s=CLI_RETRY_S)


def _log_level(verbose: int, quiet: int) -> int:
    """INFO by default; each -v one level more detail, each -q one level less."""
    return min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.ERROR)


def explain(exc: BaseException) -> str | None:
    """The one line a user sees for `exc`, or None for an error that is a bug (traceback)."""
    import httpx

    from gridswarm.home import HomeInUse
    from gridswarm.node.client import HubRequestError, HubTLSError, HubUnreachable, HubURLError

    if isinstance(exc, HubUnreachable):
        return (
            f"cannot reach the hub at {exc.url} ({exc.cause}): is `gridswarm hub` running there? "
            "(set --hub or GRIDSWARM_HUB)"
        )
    if isinstance(exc, httpx.TransportError):
        return f"cannot reach the hub: {exc} (set --hub or GRIDSWARM_HUB)"
    if isinstance(exc, HubRequestError):
        hint = {
            404: " (`gridswarm run status` lists the hub's runs)",
            403: " (signed with the key under --home)",
        }.get(exc.status, "")
        return f"the hub refused ({exc.status}): {exc.detail}{hint}"
    if isinstance(exc, HubURLError | HubTLSError | HomeInUse | ConfigError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.strerror or 'not found'}: {exc.filename or exc}"
    return None


def _epoch_chain(
    every_s: float, rpc: str | None, token: str | None, escrow: str | None, eth_key: Path | None
) -> EpochChain:
    """`gridswarm hub --epoch-every-s`'s chain settings, checked (one line on a bad one)."""
    from gridswarm.hub.epochs import EpochChain  # only for a hub that posts epochs
    from gridswarm.ledger.cli import load_eth_account

    if not (rpc and token and escrow and eth_key):
        _fail("--epoch-every-s needs --rpc, --token, --escrow and --eth-key")
    load_eth_account(eth_key)  # a missing or malformed key file: one line, before serving
    try:
        return EpochChain(rpc, token, escrow, eth_key, every_s)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def hub(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL: sqlite:///hub.db or postgresql://…")] = (
        "sqlite:///gridswarm-hub.db"
    ),
    blobs: Annotated[
        str,
        typer.Option(
            help="blob store: a folder, or s3://bucket/prefix (endpoint and credentials from the "
            "standard AWS_* environment variables)"
        ),
    ] = "gridswarm-blobs",
    host: str = "127.0.0.1",
    port: int = 8470,
    liveness_s: Annotated[
        float,
        typer.Option(
            help="a node silent this long is lost (longer while heartbeats are paced: 3 "
            "heartbeat intervals)"
        ),
    ] = 20.0,
    heartbeat_budget_per_s: Annotated[
        float,
        typer.Option(
            min=0,
            max=1e6,
            help="heartbeats a second the whole swarm may send: nodes are told an interval "
            "of live nodes / budget (3 to 60 s); 0: every 3 s",
        ),
    ] = 100.0,
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
    data_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="a folder whose files and prepared datasets a run's data.dataset may name on "
            "the hub's disk (repeatable; default: none, runs name bundled or manifest: datasets)"
        ),
    ] = None,
    max_active_runs: Annotated[
        int, typer.Option(min=1, help="open hub: active runs per identity")
    ] = 8,
    max_dataset_mb: Annotated[
        int,
        typer.Option(min=0, help="MiB of datasets sponsors may push, all together (0: none)"),
    ] = DEFAULT_MAX_DATASET_MB,
    max_dataset_mb_per_identity: Annotated[
        int, typer.Option(min=0, help="MiB of datasets one sponsor key may push")
    ] = DEFAULT_MAX_DATASET_MB_PER_IDENTITY,
    max_runs_per_hour: Annotated[
        int, typer.Option(min=1, help="open hub: runs created per identity per hour")
    ] = 20,
    requests_per_s: Annotated[
        float, typer.Option(min=0.01, help="signed requests per second per key (burst: 4x)")
    ] = 50.0,
    node_invites: Annotated[
        Path | None,
        typer.Option(
            help="file of node public keys (hex, one a line) that may register; default: any "
            "node, within --register-per-net-hour and --max-new-nodes"
        ),
    ] = None,
    register_per_net_hour: Annotated[
        int,
        typer.Option(
            min=0,
            help="open hub: new node identities per client network (IPv4 /24, IPv6 /64) per "
            "hour; 0: no bound",
        ),
    ] = DEFAULT_REGISTER_PER_NET_HOUR,
    max_new_nodes: Annotated[
        int,
        typer.Option(
            min=0, help="open hub: live node identities that have not worked yet; 0: no cap"
        ),
    ] = DEFAULT_MAX_NEW_NODES,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            help="behind a reverse proxy: its addresses (comma-separated), whose "
            "X-Forwarded-For then names the client; default: X-Forwarded-For is ignored"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve HTTPS with this certificate chain (PEM)")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="the certificate's private key (PEM)")
    ] = None,
    presign: Annotated[
        bool,
        typer.Option(
            help="with --blobs s3://…: send nodes to short-lived presigned object-store URLs for "
            "versions, deltas and dataset shards (--no-presign: the hub serves them itself)"
        ),
    ] = True,
    blob_cache_gib: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=1 << 20,
            help="with --blobs s3://…: the most the hub's local cache of dataset shards "
            "(in --home) may hold, in GiB; least recently used blobs go first",
        ),
    ] = 20.0,
    metrics: Annotated[
        bool,
        typer.Option(
            help="serve GET /metrics (Prometheus text: aggregate request, refusal, round and "
            "queue figures; unsigned, like the other public reads); --no-metrics: 404"
        ),
    ] = True,
    workers: Annotated[
        int,
        typer.Option(
            help="replica processes sharing the port and the database (PostgreSQL only; "
            "or run hubs on several machines behind a load balancer)"
        ),
    ] = 1,
    replica_count: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_REPLICA_COUNT,
            help="hubs on separate machines sharing this database, this one included (give "
            "each the same number): they split --requests-per-s between them, each evenly "
            "among its --workers",
        ),
    ] = 1,
    epoch_every_s: Annotated[
        float | None,
        typer.Option(
            help="post the next reward epoch on chain this often when it grants something new "
            "(with --rpc, --token, --escrow and --eth-key; default: the operator posts with "
            "`gridswarm ledger post-epoch`)"
        ),
    ] = None,
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
    eth_key: EthKeyOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
) -> None:
    """Run a hub (migrates the database to the newest schema first).

    It logs each round's open and close (contributors, loss) and each change of a run's state;
    -v/-q for more or less."""
    from gridswarm.hub.energy import load_hub_signals
    from gridswarm.hub.limits import load_public_keys, load_sponsors
    from gridswarm.hub.registration import RegistrationPolicy
    from gridswarm.hub.server import check_rate_share, check_workers, serve
    from gridswarm.hub.service import HubSettings

    logging.basicConfig(
        level=_log_level(verbose, quiet), format="%(asctime)s %(name)s %(message)s", force=True
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations: only when they fail

    allowed = None
    if sponsors is not None:
        try:
            allowed = load_sponsors(sponsors)
        except (OSError, ValueError) as exc:
            _fail(str(exc))
        console.print(f"sponsors: {len(allowed)} keys may create and fund runs")
    invited = None
    if node_invites is not None:
        try:
            invited = load_public_keys(node_invites, "node")
        except (OSError, ValueError) as exc:
            _fail(str(exc))
        console.print(f"node invites: {len(invited)} keys may register")
    else:
        per_net = register_per_net_hour or "no bound"
        cap = max_new_nodes or "no cap"
        console.print(f"open to nodes: new identities {per_net}/network/hour, {cap} live new")

    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            _fail(f"{path}: no such file")
    try:
        check_workers(db, workers)
    except ValueError as exc:
        _fail(str(exc))
    scheme = "https" if tls_cert else "http"
    replicas = f"  replicas={workers}" if workers > 1 else ""
    console.print(f"gridswarm hub on {scheme}://{host}:{port}  db={db}  blobs={blobs}{replicas}")
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
        heartbeat_budget_per_s=heartbeat_budget_per_s,
        signals=by_region,
        sponsors=allowed,
        data_roots=tuple(data_root or ()),
        max_active_runs_per_identity=max_active_runs,
        max_runs_per_hour_per_identity=max_runs_per_hour,
        max_dataset_bytes=max_dataset_mb << 20,
        max_dataset_bytes_per_identity=max_dataset_mb_per_identity << 20,
        requests_per_s=requests_per_s,
        request_burst=4 * requests_per_s,
        replica_count=replica_count,
        workers=workers,
        presign_downloads=presign,
        blob_cache_bytes=int(blob_cache_gib * (1 << 30)),
        registration=RegistrationPolicy(
            invites=invited,
            per_network_per_hour=register_per_net_hour,
            max_new_nodes=max_new_nodes,
        ),
    )
    if max_run_memory_mb is not None:
        settings = dataclasses.replace(settings, max_run_memory_mb=max_run_memory_mb)
    if epoch_every_s is not None:
        settings = dataclasses.replace(
            settings, epochs=_epoch_chain(epoch_every_s, rpc, token, escrow, eth_key)
        )
        console.print(f"reward epochs: posted to {escrow} every {epoch_every_s:g} s when due")
    try:
        check_rate_share(settings)
    except ValueError as exc:
        _fail(str(exc))
    if (processes := replica_count * workers) > 1:
        console.print(
            f"rate limit: {requests_per_s:g} requests/s per key across {processes} hub processes "
            f"({requests_per_s / processes:g}/s, burst {4 * requests_per_s / processes:g} each)"
        )
    tls = (tls_cert, tls_key) if tls_cert else None
    serve(
        db,
        blobs,
        host,
        port,
        settings,
        home,
        tls,
        workers=workers,
        forwarded_allow_ips=forwarded_allow_ips,
        metrics=metrics,
    )


@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    hub_url: HubOpt = None,
    home: Annotated[
        Path,
        typer.Option(
            help="identity key and model cache; one node process per home: give each node on "
            "a machine its own"
        ),
    ] = DEFAULT_HOME / "node",
    run: Annotated[str | None, typer.Option(help="run id (default: newest active run)")] = None,
    data: Annotated[Path | None, typer.Option(help="local text for federated runs")] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="a folder whose files a run's data.dataset may name on this machine "
            "(repeatable; default: none, runs must name bundled or manifest: datasets)"
        ),
    ] = None,
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
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda[:i] | mps (bf16 autocast on CUDA)")
    ] = "cpu",
    connect_timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="give up when the hub is unreachable this long (s; default: never)"
        ),
    ] = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
) -> None:
    """Join a hub as a node and contribute training until stopped (Ctrl-C leaves cleanly).

    It logs each assignment (round, H, tokens, seconds, bytes, loss) and each refusal."""
    if ctx.invoked_subcommand is not None:  # `gridswarm node balance|claim …`
        return
    from gridswarm.node.agent import NodeAgent, NodeOptions
    from gridswarm.node.client import check_hub_urls

    hub_url = check_hub_urls(_hub_url(hub_url))  # one URL, or replicas': URL1,URL2,…
    if energy is not None:
        from gridswarm.node.energy import load_node_energy

        try:
            load_node_energy(energy, region)  # fail here, naming the field, not in the agent
        except ValueError as exc:
            _fail(str(exc))

    from gridswarm.train.device import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        _fail(str(exc))
    logging.basicConfig(
        level=_log_level(verbose, quiet), format="%(asctime)s node %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    agent = NodeAgent(
        NodeOptions(
            hub_url=hub_url,
            home=home,
            run_id=run,
            data=data,
            data_roots=tuple(data_root or ()),
            max_threads=max_threads,
            region=region,
            name=name,
            throttle=throttle,
            max_rounds=max_rounds,
            energy=energy,
            device=device,
            connect_timeout_s=connect_timeout,
        )
    )
    agent.install_signal_handlers()
    console.print(f"node {agent.node_id} joining {hub_url}")
    stats = agent.run()
    console.print(
        f"node {agent.node_id} left: {stats.contributions} contributions, "
        f"{stats.tokens} tokens, {stats.bytes_up} bytes up"
    )
    # the node has left the hub; skip the interpreter's teardown of torch and thousands of
    # modules, which takes seconds on a busy machine, so SIGTERM ends the process promptly
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@run_app.command("create")
def run_create(
    config: Annotated[Path, typer.Argument(help="run.toml")],
    hub_url: HubOpt = None,
    home: Annotated[Path, typer.Option(help="folder of your sponsor key")] = DEFAULT_HOME,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="start from the model in this folder (Hugging Face config.json + "
            "*.safetensors, or a `run export` folder) instead of random weights",
        ),
    ] = None,
) -> None:
    """Start a run from a run.toml (validated here first: errors name the field)."""
    if init_from is not None:
        created = _create_from(config, init_from, _client(hub_url, home))
    else:
        try:
            cfg = load_run_config(config)
        except (ConfigError, OSError) as exc:
            _fail(str(exc))
        created = _client(hub_url, home).create_run(cfg.model_dump(mode="json"))
    console.print(f"run [bold]{created.run_id}[/bold] created: {created.numel:,} parameters")
    print(created.run_id)


def _create_from(config: Path, folder: Path, client: HubClient) -> RunCreateResponse:
    """`run create --init-from`: the run's model and weights from `folder`, checked here
    (initfrom.py), the weights pushed (`POST /v1/weights`), then the run created naming them."""
    from gridswarm.config import parse_run_config
    from gridswarm.initfrom import InitFromError, prepare_init, push_weights

    try:
        init = prepare_init(config, folder, client.blob)
    except (InitFromError, ConfigError, OSError) as exc:
        _fail(str(exc))
    for line in init.checked:
        err_console.print(f"checked: {line}")
    pushed = push_weights(client, init.blob())
    err_console.print(f"pushed {pushed.numel:,} weights ({pushed.bytes:,} bytes): {pushed.weights}")
    settings = {**init.config, "model": {**init.config["model"], "init_weights": pushed.weights}}
    try:
        cfg = parse_run_config(settings)
    except ConfigError as exc:
        _fail(str(exc))
    return client.create_run(cfg.model_dump(mode="json"))


@run_app.command("status")
def run_status(
    run_id: Annotated[str | None, typer.Argument()] = None,
    hub_url: HubOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show all runs, or one run's rounds, losses and nodes."""
    client = _reader(hub_url)
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
    hub_url: HubOpt = None,
) -> None:
    """Write the run's newest model and tokenizer in Hugging Face layout (AutoModelForCausalLM
    and AutoTokenizer load the folder)."""
    from gridswarm.export import export_run
    from gridswarm.train.dataset import DatasetError

    client = _reader(hub_url)
    status = client.run_status(run_id)
    try:
        path = export_run(client, status, out)
    except DatasetError as exc:  # the run's tokenizer could not be read or verified
        _fail(str(exc))
    console.print(f"exported version {status['version']} of run {run_id} to {path}")


def _change_state(run_id: str, event: str, reason: str, hub_url: str | None, home: Path) -> None:
    entry = _client(hub_url, home).change_run_state(run_id, event, reason)
    released = entry["released_assignments"]
    line = f"run {run_id}: {entry['from']} → {entry['to']} ({released} assignments released)"
    if "unspent_escrow_units" in entry:
        line += f"; unspent escrow {entry['unspent_escrow_units']:,} units stays yours"
    console.print(line)


ReasonOpt = Annotated[str, typer.Option(help="why (goes on the ledger)")]
SponsorHome = Annotated[Path, typer.Option(help="folder of your sponsor key")]


@run_app.command("stop")
def run_stop(
    run_id: str, reason: ReasonOpt = "", hub_url: HubOpt = None, home: SponsorHome = DEFAULT_HOME
) -> None:
    """End a run for good (sponsor only): outstanding work is released, nodes are told, the
    ledger records why, and the unspent escrow stays the sponsor's."""
    _change_state(run_id, "stop", reason, hub_url, home)


@run_app.command("pause")
def run_pause(
    run_id: str, reason: ReasonOpt = "", hub_url: HubOpt = None, home: SponsorHome = DEFAULT_HOME
) -> None:
    """Hold a run (sponsor only): no new work; every round, version and contribution is kept."""
    _change_state(run_id, "pause", reason, hub_url, home)


@run_app.command("resume")
def run_resume(
    run_id: str, reason: ReasonOpt = "", hub_url: HubOpt = None, home: SponsorHome = DEFAULT_HOME
) -> None:
    """Continue a paused or stalled run where it was (sponsor only)."""
    _change_state(run_id, "resume", reason, hub_url, home)


@run_app.command("report")
def run_report(
    run_id: str,
    hub_url: HubOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Energy and carbon of a run: per node and in total tokens, kWh, kgCO2e, gCO2e per 1k
    tokens, local-surplus share, and the carbon-agnostic counterfactual."""
    from gridswarm.hub.energy import format_run_report

    client = _reader(hub_url)
    report = client.run_report(run_id)
    privacy = client.run_status(run_id).get("privacy")
    if as_json:
        print(json.dumps({**report, "privacy": privacy} if privacy else report, indent=2))
        return
    print(format_run_report(report, privacy if isinstance(privacy, dict) else None))


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[list[Path], typer.Argument(help=".txt .jsonl .jsonl.gz .parquet, folders")],
    out: Annotated[Path, typer.Option(help="new folder for shards, manifest and tokenizer")],
    tokenizer: Annotated[
        str, typer.Option(help="bytes, bpe:VOCAB (trained here) or PATH/tokenizer.json")
    ] = "bytes",
    text_field: Annotated[str, typer.Option(help="the text column of jsonl/parquet")] = "text",
    val_fraction: Annotated[float, typer.Option(help="held-out share (the tail)")] = 0.1,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard")] = 1 << 20,
) -> None:
    """Tokenise local files into memory-mapped shards + manifest.json (nothing is downloaded);
    name the result in a run.toml as `data.dataset = "OUT"`."""
    from gridswarm.train.dataset import DatasetError, prepare

    try:
        manifest, digest = prepare(
            sources,
            tokenizer,
            out,
            text_field=text_field,
            val_fraction=val_fraction,
            shard_tokens=shard_tokens,
        )
    except (DatasetError, OSError) as exc:
        _fail(str(exc))
    console.print(
        f"{out}: {manifest.tokens_train:,} train + {manifest.tokens_val:,} held-out tokens in "
        f"{len(manifest.train)} + {len(manifest.val)} {manifest.dtype} shards, vocabulary "
        f"{manifest.vocab_size:,} ({manifest.tokenizer.kind})"
    )
    print(f"manifest:{digest}")


@data_app.command("push")
def data_push(
    folder: Annotated[Path, typer.Argument(help="a prepared dataset folder (`data prepare`)")],
    hub_url: HubOpt = None,
    home: SponsorHome = DEFAULT_HOME,
) -> None:
    """Upload a prepared dataset to a hub, signed with your sponsor key: only the shards the hub
    lacks move (run it again to resume). Prints `manifest:<sha256>`, to name in a run.toml as
    `data.dataset`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn

    from gridswarm.datapush import push_dataset
    from gridswarm.train.dataset import DatasetError, verify_folder

    columns = ("{task.description}", BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("verifying the folder", total=None)
        try:
            source = verify_folder(folder)  # before a key is made or the hub is asked
        except DatasetError as exc:
            progress.stop()
            _fail(str(exc))
        client = _client(hub_url, home)
        progress.update(task, description="offering it to the hub")

        def start(blobs: int, size: int) -> None:
            progress.update(task, description=f"uploading {blobs} blobs", total=size)

        try:
            pushed = push_dataset(client, source, start, lambda size: progress.advance(task, size))
        except (DatasetError, OSError) as exc:
            progress.stop()
            _fail(str(exc))
    kept = pushed.blobs_total - pushed.blobs_sent
    console.print(
        f"{folder}: sent {pushed.blobs_sent} blobs ({pushed.bytes_sent:,} bytes), "
        f"{kept} already on the hub"
    )
    print(pushed.dataset)


@data_app.command("verify")
def data_verify(folder: Annotated[Path, typer.Argument(help="a prepared dataset folder")]) -> None:
    """Check every shard and the tokenizer of a prepared folder against its manifest."""
    from gridswarm.train.dataset import DatasetError, verify_folder

    try:
        source = verify_folder(folder)
    except DatasetError as exc:
        _fail(str(exc))
    console.print(f"{folder}: {len(source.manifest.shards())} shards match the manifest")
    print(f"manifest:{source.manifest_digest}")


@app.command()
def sample(
    model_dir: Annotated[Path, typer.Argument(help="folder written by `run export`")],
    prompt: str = "ROMEO:",
    tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
) -> None:
    """Generate text from an exported model, with the run's tokenizer."""
    from gridswarm.export import RUN_FILE, sample_text

    if not (model_dir / RUN_FILE).is_file():
        _fail(f"no exported model in {model_dir}: write one with `gridswarm run export RUN DIR`")
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


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an error (anywhere on the line)")
    ] = False,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            envvar="GRIDSWARM_CA",
            help="trust this CA (PEM) for the hub's TLS certificate (anywhere on the line)",
        ),
    ] = None,
) -> None:
    """Train language models on a swarm of machines, where energy is clean."""


def _take_ca(args: list[str]) -> list[str]:
    """`--ca PATH` (or `--ca=PATH`) anywhere on the line: every hub client of this process trusts
    that CA (it is passed on as GRIDSWARM_CA); the other arguments are returned."""
    from gridswarm.node.client import CA_ENV

    rest, i = [], 0
    while i < len(args):
        if args[i] == "--ca" and i + 1 < len(args):
            os.environ[CA_ENV] = args[i + 1]
            i += 2
            continue
        if args[i].startswith("--ca="):
            os.environ[CA_ENV] = args[i].removeprefix("--ca=")
        else:
            rest.append(args[i])
        i += 1
    return rest


def main(argv: list[str] | None = None) -> None:
    """The console entry point: run the command; errors end in one line (see `explain`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("GRIDSWARM_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    args = _take_ca(args)
    try:
        app(args, prog_name="gridswarm")
    except KeyboardInterrupt:
        err_console.print("stopped")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        message = explain(exc) or f"{type(exc).__name__}: {exc} (--debug shows the traceback)"
        _error(message)
        sys.exit(1)


if __name__ == "__main__":
    main()
