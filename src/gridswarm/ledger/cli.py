"""Ledger commands of the `gridswarm` CLI: `ledger show/verify/post-epoch`, `run fund`,
`node balance/claim` (registered in gridswarm/cli.py).

Each works against a running hub over HTTP (`--hub URL`; writes are signed with the caller's own
key) or, for the hub's operator, directly on the hub's database (`--db URL`). EVM settlement
options name a JSON-RPC endpoint and the run's token and escrow contracts; keys for EVM accounts
live in files holding one hex private key (created on first use where that makes sense).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
DEFAULT_HOME = Path(os.environ.get("GRIDSWARM_HOME", Path.home() / ".gridswarm"))
HubOpt = Annotated[
    str | None, typer.Option("--hub", envvar="GRIDSWARM_HUB", help="hub URL (HTTP API)")
]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="the hub's database URL (operator access instead)")
]
RpcOpt = Annotated[str | None, typer.Option("--rpc", help="EVM JSON-RPC URL (e.g. anvil)")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="RewardToken contract address")]
EscrowOpt = Annotated[str | None, typer.Option("--escrow", help="RunEscrow contract address")]
EthKeyOpt = Annotated[
    Path | None, typer.Option("--eth-key", help="file holding the EVM account's hex private key")
]

ledger_app = typer.Typer(
    help="The hub's signed, hash-chained ledger: show, verify, settle on chain.",
    no_args_is_help=True,
)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _client(hub: str, key_path: Path) -> Any:
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient

    return HubClient(hub, Identity.load_or_create(key_path), retry_for_s=10.0)


def _call(client: Any, method: str, path: str, body: Any = None, params: dict | None = None):
    from gridswarm.node.client import HubRequestError

    data = b"" if body is None else json.dumps(body).encode()
    try:
        return client.request(method, path, data, params=params, signed=body is not None).json()
    except HubRequestError as exc:
        fail(exc.detail, 1)


def _ledger(db: str, hub_key: Path | None = None) -> Any:
    from gridswarm.hub.server import make_engine
    from gridswarm.identity import Identity
    from gridswarm.ledger.log import Ledger

    hub = Identity.load_or_create(hub_key) if hub_key is not None else None
    return Ledger(make_engine(db), hub)


def _where(hub: str | None, db: str | None) -> None:
    if (hub is None) == (db is None):
        fail("give exactly one of --hub URL (HTTP) or --db URL (the hub's database)")


def load_eth_account(path: Path, create: bool = False) -> Any:
    """The EVM account whose hex private key is in `path` (created, mode 0600, if asked)."""
    from eth_account import Account

    path = Path(path)
    if not path.exists():
        if not create:
            fail(f"{path}: no such key file")
        account = Account.create()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(account.key.hex())
        return account
    try:
        return Account.from_key(path.read_text().strip())
    except ValueError as exc:
        fail(f"{path}: not a hex EVM private key ({exc})")


def _settlement(rpc: str | None, token: str | None, escrow: str | None) -> Any:
    from gridswarm.ledger.evm import EvmSettlement

    if not (rpc and token and escrow):
        fail("EVM settlement needs --rpc, --token and --escrow")
    return EvmSettlement.connect(rpc, token, escrow)


# ---------------------------------------------------------------------------------- ledger


@ledger_app.command("show")
def ledger_show(
    hub: HubOpt = None,
    db: DbOpt = None,
    start: Annotated[int, typer.Option(help="first seq")] = 0,
    limit: Annotated[int, typer.Option(help="at most this many entries")] = 50,
    kind: Annotated[str | None, typer.Option(help="only entries of this kind")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List ledger entries (seq, kind, author, payload)."""
    _where(hub, db)
    if limit < 1:
        fail(f"--limit must be >= 1, got {limit}")
    if hub is not None:
        from gridswarm.node.client import HubClient

        client = HubClient(hub, None, retry_for_s=10.0)  # type: ignore[arg-type]
        params = {"start_seq": start, "limit": limit} | ({"kind": kind} if kind else {})
        rows = _call(client, "GET", "/v1/ledger", params=params)
    else:
        from gridswarm.ledger.ops import ledger_show as show

        rows = show(_ledger(db), start_seq=start, limit=limit, kind=kind)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("seq", "kind", "author", "payload")
    for r in rows:
        payload = json.dumps(r["payload"], sort_keys=True)
        table.add_row(str(r["seq"]), r["kind"], r["author"][:16], payload[:160])
    console.print(table)


@ledger_app.command("verify")
def ledger_verify(
    hub: HubOpt = None,
    db: DbOpt = None,
    hub_key: Annotated[
        str | None, typer.Option(help="expected hub public key (hex); default: genesis names it")
    ] = None,
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-check the whole chain; exit 1 naming the first altered, removed or reordered entry.

    With --rpc/--token/--escrow (and --db), also against the checkpoint roots anchored on chain.
    """
    _where(hub, db)
    if hub is not None:
        from gridswarm.node.client import HubClient

        client = HubClient(hub, None, retry_for_s=10.0)  # type: ignore[arg-type]
        report = _call(client, "GET", "/v1/ledger/verify")
    else:
        from gridswarm.ledger.ops import ledger_verify as verify

        settlement = _settlement(rpc, token, escrow) if rpc else None
        pinned = bytes.fromhex(hub_key) if hub_key else None
        report = verify(_ledger(db), hub_public_key=pinned, settlement=settlement).to_dict()
    if as_json:
        print(json.dumps(report, indent=2))
    if report["ok"]:
        console.print(
            f"[green]ledger ok[/green]: {report['checked']} entries, "
            f"{report['checkpoints']} checkpoints, head {report['head_seq']}"
        )
        return
    console.print(
        f"[red]ledger broken at entry {report['first_bad_seq']}[/red]: {report['reason']} "
        f"({report['checked']} entries checked before it)"
    )
    raise typer.Exit(1)


@ledger_app.command("post-epoch")
def ledger_post_epoch(
    db: Annotated[str, typer.Option("--db", help="the hub's database URL")],
    hub_key: Annotated[Path, typer.Option(help="the hub's ledger key (hub.key)")],
    eth_key: Annotated[Path, typer.Option(help="the hub's EVM account key file")],
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
    anchor: Annotated[bool, typer.Option(help="also anchor new checkpoint roots")] = True,
) -> None:
    """Hub operator: post the next epoch's reward Merkle root to the run escrow on chain."""
    from gridswarm.ledger.chain import LedgerError
    from gridswarm.ledger.evm import SettlementError
    from gridswarm.ledger.ops import anchor_checkpoints, payout_addresses, post_epoch

    ledger = _ledger(db, hub_key)
    settlement = _settlement(rpc, token, escrow)
    account = load_eth_account(eth_key)
    addresses = payout_addresses(ledger)
    try:
        entry = post_epoch(ledger, settlement, account, addresses)
        anchored = anchor_checkpoints(ledger, settlement, account) if anchor else []
    except (LedgerError, SettlementError) as exc:
        fail(str(exc), 1)
    p = entry.payload
    console.print(
        f"epoch {p['epoch']} posted: root {p['root'][:18]}…, {p['total_units']} units to "
        f"{len(p['cumulative_units'])} address(es), gas {p['gas_used']}; "
        f"{len(anchored)} checkpoint(s) anchored"
    )
    missing = sorted(set(ledger.balances().earned) - set(addresses))
    if missing:
        console.print(f"[yellow]no payout address yet[/yellow] for {', '.join(missing)}")


# ---------------------------------------------------------------------------------- run fund


def run_fund(
    run_id: Annotated[str, typer.Argument(help="the run to fund")],
    amount: Annotated[int, typer.Argument(help="amount in the reward token's smallest units")],
    hub: Annotated[str, typer.Option("--hub", envvar="GRIDSWARM_HUB")] = "http://127.0.0.1:8470",
    home: Annotated[Path, typer.Option(help="folder of sponsor.key")] = DEFAULT_HOME,
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
    eth_key: EthKeyOpt = None,
) -> None:
    """Sponsor: fund a run's escrow (on chain first with --rpc …), recorded on the ledger."""
    from gridswarm.identity import Identity
    from gridswarm.ledger.ops import fund_claim

    if amount <= 0:
        fail(f"AMOUNT must be a positive integer, got {amount}")
    tx_hash = None
    if rpc is not None:
        from gridswarm.ledger.evm import SettlementError

        if eth_key is None:
            fail("funding on chain needs --eth-key (the sponsor's EVM account)")
        try:
            tx_hash = (
                _settlement(rpc, token, escrow).fund(load_eth_account(eth_key), amount).tx_hash
            )
        except SettlementError as exc:
            fail(str(exc), 1)
    sponsor = Identity.load_or_create(home / "sponsor.key")
    nonce = f"{time.time_ns()}"
    claim = fund_claim(sponsor, amount, tx_hash=tx_hash, run_id=run_id, nonce=nonce)
    out = _call(
        _client(hub, home / "sponsor.key"), "POST", f"/v1/runs/{run_id}/fund", claim.to_dict()
    )
    console.print(
        f"run {run_id} funded with {amount} units (ledger entry {out['entry']['seq']}); "
        f"escrow now {out['escrow_units']} units"
    )


def run_refund(
    run_id: Annotated[str, typer.Argument(help="the stopped or finished run")],
    eth_key: EthKeyOpt = None,
    hub: Annotated[str, typer.Option("--hub", envvar="GRIDSWARM_HUB")] = "http://127.0.0.1:8470",
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
) -> None:
    """Sponsor: take back the escrow no epoch allocated, once the run is stopped or finished
    (closes the run's escrow contract, then refunds the unallocated units to the sponsor)."""
    from gridswarm.hub.lifecycle import FINAL
    from gridswarm.ledger.evm import SettlementError
    from gridswarm.node.client import HubClient

    if eth_key is None:
        fail("a refund needs --eth-key (the sponsor's EVM account that funded the escrow)")
    status = _call(HubClient(hub, None, retry_for_s=10.0), "GET", f"/v1/runs/{run_id}")  # type: ignore[arg-type]
    if status["status"] not in FINAL:
        fail(f"run {run_id} is {status['status']}: stop it first (`gridswarm run stop {run_id}`)")
    settlement = _settlement(rpc, token, escrow)
    sponsor = load_eth_account(eth_key)
    try:
        if not settlement.state().closed:
            settlement.close(sponsor)
        tx = settlement.refund(sponsor)
    except SettlementError as exc:
        fail(str(exc), 1)
    state = settlement.state()
    console.print(
        f"refunded to {sponsor.address}: {state.refunded_units} units in all (funded "
        f"{state.funded_units}, allocated to nodes {state.allocated_units}): tx {tx.tx_hash}"
    )


# ---------------------------------------------------------------------------------- node


def node_balance(
    hub: Annotated[str, typer.Option("--hub", envvar="GRIDSWARM_HUB")] = "http://127.0.0.1:8470",
    db: DbOpt = None,
    home: Annotated[Path, typer.Option(help="the node's home (node.key)")] = DEFAULT_HOME / "node",
    node_id: Annotated[str | None, typer.Option("--node", help="another node's id")] = None,
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A node's rewards on the ledger (earned, slashed, paid, available) and its reputation."""
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient

    if node_id is None:
        key = home / "node.key"
        if not key.exists():
            fail(f"no node key at {key}: pass --home or --node")
        node_id = Identity.load_or_create(key).node_id
    if db is not None:  # the operator, on the hub's database
        from gridswarm.ledger.ops import node_balance as balance_of
        from gridswarm.ledger.ops import payout_addresses

        ledger = _ledger(db)
        out = balance_of(ledger, node_id).to_dict()
        out["address"] = payout_addresses(ledger).get(node_id)
        out["reputation"] = None
    else:
        client = HubClient(hub, None, retry_for_s=10.0)  # type: ignore[arg-type]
        out = _call(client, "GET", f"/v1/nodes/{node_id}/balance")
    if rpc is not None and out.get("address"):
        settlement = _settlement(rpc, token, escrow)
        out["claimed_onchain_units"] = settlement.claimed_units(out["address"])
        out["token_balance_units"] = settlement.token_balance(out["address"])
    if as_json:
        print(json.dumps(out, indent=2))
        return
    rep = out["reputation"]
    standing = (
        f"reputation {rep['score']:.3f} ({rep['audits_passed']} audits passed, "
        f"{rep['strikes']} strike(s)); "
        if rep
        else ""
    )
    console.print(
        f"node {node_id}: earned {out['earned_units']}, slashed {out['slashed_units']}, "
        f"available {out['available_units']} units; {standing}"
        f"payout address {out.get('address') or '-'}"
    )
    if out.get("token_balance_units") is not None:
        console.print(
            f"on chain: claimed {out['claimed_onchain_units']}, "
            f"token balance {out['token_balance_units']}"
        )


def node_claim(
    eth_key: Annotated[
        Path, typer.Option(help="the node's EVM account key file (created if missing)")
    ],
    hub: Annotated[str, typer.Option("--hub", envvar="GRIDSWARM_HUB")] = "http://127.0.0.1:8470",
    home: Annotated[Path, typer.Option(help="the node's home (node.key)")] = DEFAULT_HOME / "node",
    rpc: RpcOpt = None,
    token: TokenOpt = None,
    escrow: EscrowOpt = None,
) -> None:
    """Claim the node's rewards on chain from the latest epoch root (registers the payout
    address with the hub first if it does not know it yet)."""
    from gridswarm.identity import Identity
    from gridswarm.ledger.evm import SettlementError
    from gridswarm.ledger.merkle import RewardClaim
    from gridswarm.ledger.ops import payout_address_claim

    key = home / "node.key"
    if not key.exists():
        fail(f"no node key at {key}: pass the node's --home")
    node = Identity.load_or_create(key)
    account = load_eth_account(eth_key, create=True)
    client = _client(hub, key)
    known = _call(client, "GET", f"/v1/nodes/{node.node_id}/balance").get("address")
    if known != account.address:
        claim = payout_address_claim(node, account.address, nonce=f"{time.time_ns()}")
        _call(client, "POST", "/v1/nodes/payout-address", claim.to_dict())
        console.print(
            f"payout address {account.address} registered for node {node.node_id}; "
            "rewards become claimable once the hub posts the next epoch"
        )
    from gridswarm.node.client import HubRequestError

    try:
        raw = client.request("GET", f"/v1/ledger/reward-claims/{account.address}", signed=False)
    except HubRequestError as exc:
        if exc.status == 404:
            console.print(f"nothing to claim yet: {exc.detail}")
            return
        fail(exc.detail, 1)
    claim = RewardClaim.from_dict(raw.json())
    settlement = _settlement(rpc, token, escrow)
    before = settlement.claimed_units(account.address)
    try:
        tx = settlement.claim(account, claim)
    except SettlementError as exc:
        fail(str(exc), 1)
    console.print(
        f"claimed {claim.cumulative_units - before} units (epoch {claim.epoch}, cumulative "
        f"{claim.cumulative_units}) to {account.address}: tx {tx.tx_hash}, gas {tx.gas_used}"
    )
