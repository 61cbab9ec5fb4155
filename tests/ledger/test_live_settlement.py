"""The ledger CLI against a real hub process: fund a run, train, show and verify the ledger
(naming the first tampered entry), then settle on a real anvil chain: the operator posts the epoch
root, nodes claim their rewards with `gridswarm node claim`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from tests.conftest import tiny_run, wait_for
from tests.trust.cheaters import InProcessNode
from typer.testing import CliRunner
from web3 import Web3

from gridswarm.cli import app
from gridswarm.identity import Identity
from gridswarm.ledger.anvil import Anvil, funded_account
from gridswarm.ledger.cli import load_eth_account
from gridswarm.ledger.evm import EvmSettlement
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm

pytestmark = pytest.mark.slow
runner = CliRunner()
# the in-process nodes do not heartbeat while they train one after the other: on a loaded
# machine the default 8 s would call the second one lost before it uploads
LIVENESS_S = 60.0
TRAIN = {"seq_len": 32, "batch_size": 8, "inner_steps": 8, "min_inner_steps": 2}


def cli(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def train_one_round(swarm: Swarm, run_id: str, homes: list[Path]) -> list[InProcessNode]:
    nodes = [InProcessNode(swarm.url, Identity.load_or_create(h / "node.key")) for h in homes]
    jobs = [(n, n.assignment(run_id)) for n in nodes]
    for node, a in jobs:
        assert node.submit(run_id, node.build(a)).accepted
    return nodes


def start(make_swarm, tmp_path: Path) -> tuple[Swarm, Path, HubClient, str]:
    swarm = make_swarm(liveness_s=LIVENESS_S)
    swarm.start_hub()
    assert (swarm.workdir / "hub.key").exists()  # created beside the blobs, then kept
    home = tmp_path / "sponsor"
    sponsor = HubClient(swarm.url, Identity.load_or_create(home / "sponsor.key"))
    cfg = tiny_run(train=TRAIN, round={"deadline_s": 60, "quorum": 2}, budget={"rounds": 1})
    return swarm, home, sponsor, sponsor.create_run(cfg).run_id


def deploy_escrow(tmp_path: Path, anvil: Anvil, w3: Web3):
    """A token and a run escrow on anvil; the hub's and sponsor's EVM key files; the CLI's
    chain options."""
    hub_eth, sponsor_eth = funded_account(w3), funded_account(w3)
    settlement, _ = EvmSettlement.deploy(
        w3, hub_eth, hub_address=hub_eth.address, sponsor_address=sponsor_eth.address
    )
    settlement.mint(hub_eth, sponsor_eth.address, 10**6)
    keys = {}
    for name, account in {"hub": hub_eth, "sponsor": sponsor_eth}.items():
        keys[name] = tmp_path / f"{name}.eth"
        keys[name].write_text(account.key.hex())
    chain = ["--rpc", anvil.url, "--token", settlement.token.address]
    chain += ["--escrow", settlement.escrow.address]
    return settlement, keys, chain


def finished(sponsor: HubClient, run_id: str) -> dict:
    return wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s, 60, "the run"
    )


def test_ledger_cli_show_fund_balance_and_verify_names_tampering(make_swarm, tmp_path: Path):
    swarm, home, sponsor, run_id = start(make_swarm, tmp_path)
    out = cli("run", "fund", run_id, 1200, "--hub", swarm.url, "--home", home)
    assert "funded with 1200 units" in out
    intruder = runner.invoke(
        app, ["run", "fund", run_id, "5", "--hub", swarm.url, "--home", str(tmp_path / "x")]
    )
    assert intruder.exit_code == 1 and "only the sponsor" in intruder.output
    homes = [tmp_path / "a", tmp_path / "b"]
    nodes = train_one_round(swarm, run_id, homes)
    finished(sponsor, run_id)

    shown = json.loads(cli("ledger", "show", "--hub", swarm.url, "--kind", "reward", "--json"))
    (split,) = [r["payload"] for r in shown if r["payload"]["run_id"] == run_id]
    assert sum(split["shares"].values()) + split["carried_units"] == split["pool_units"] == 1200
    balances = [
        json.loads(cli("node", "balance", "--hub", swarm.url, "--home", h, "--json")) for h in homes
    ]
    assert [b["earned_units"] for b in balances] == [split["shares"][n.node_id] for n in nodes]
    by_db = json.loads(cli("node", "balance", "--db", swarm.db_url, "--node", nodes[1].node_id,
                           "--json"))  # fmt: skip
    assert by_db["earned_units"] == balances[1]["earned_units"]
    assert "strike" in cli("node", "balance", "--hub", swarm.url, "--home", homes[0])
    table = cli("ledger", "show", "--db", swarm.db_url, "--limit", 3)
    assert "genesis" in table
    assert "ledger ok" in cli("ledger", "verify", "--hub", swarm.url)
    assert "ledger ok" in cli("ledger", "verify", "--db", swarm.db_url)

    # alter one reward in the hub's database: verify names that entry
    engine = create_engine(swarm.db_url)
    with engine.begin() as c:
        seq, payload = c.execute(
            text("SELECT seq, payload_json FROM ledger_entries WHERE kind = 'reward'")
        ).first()
        forged = payload.replace(f'"{nodes[0].node_id}":', f'"{nodes[0].node_id}":1', 1)
        c.execute(
            text("UPDATE ledger_entries SET payload_json = :p WHERE seq = :s"),
            {"p": forged, "s": seq},
        )
    for where in (["--db", swarm.db_url], ["--hub", swarm.url]):
        bad = runner.invoke(app, ["ledger", "verify", *where])
        assert bad.exit_code == 1
        assert f"broken at entry {seq}" in bad.output and "altered" in bad.output


@pytest.mark.anvil
def test_operator_posts_epoch_and_nodes_claim_on_anvil(
    make_swarm, tmp_path: Path, anvil: Anvil, w3: Web3
):
    swarm, home, sponsor, run_id = start(make_swarm, tmp_path)
    settlement, keys, chain = deploy_escrow(tmp_path, anvil, w3)
    cli("run", "fund", run_id, 3000, "--hub", swarm.url, "--home", home, *chain,
        "--eth-key", keys["sponsor"])  # fmt: skip
    assert settlement.state().funded_units == 3000
    (fund,) = [r for r in json.loads(cli("ledger", "show", "--hub", swarm.url, "--kind",
                                        "fund", "--json"))]  # fmt: skip
    assert fund["payload"]["tx"].startswith("0x") and fund["scope"] == "claim"

    homes = [tmp_path / "a", tmp_path / "b"]
    train_one_round(swarm, run_id, homes)
    finished(sponsor, run_id)
    node_keys = []
    for i, h in enumerate(homes):
        node_keys.append(tmp_path / f"node{i}.eth")
        node_keys[-1].write_text(funded_account(w3).key.hex())  # gas money for its claim
        out = cli("node", "claim", "--hub", swarm.url, "--home", h, "--eth-key", node_keys[-1],
                  *chain)  # fmt: skip
        assert "registered" in out and "nothing to claim yet" in out

    out = cli("ledger", "post-epoch", "--db", swarm.db_url, "--hub-key",
              swarm.workdir / "hub.key", "--eth-key", keys["hub"], *chain)  # fmt: skip
    assert "epoch 0 posted" in out
    for h, key in zip(homes, node_keys, strict=True):
        out = cli("node", "claim", "--hub", swarm.url, "--home", h, "--eth-key", key, *chain)
        assert "claimed" in out
        b = json.loads(cli("node", "balance", "--hub", swarm.url, "--home", h, "--json", *chain))
        assert b["token_balance_units"] == b["earned_units"] > 0
        assert b["claimed_onchain_units"] == b["earned_units"]
        again = runner.invoke(app, ["node", "claim", "--hub", swarm.url, "--home", str(h),
                                    "--eth-key", str(key), *chain])  # fmt: skip
        assert again.exit_code == 1 and "nothing to claim" in again.output
    state = settlement.state()
    assert state.claimed_units == state.allocated_units <= state.funded_units == 3000
    # the anchored checkpoint roots agree with the ledger
    assert "ledger ok" in cli("ledger", "verify", "--db", swarm.db_url, *chain)


@pytest.mark.anvil
def test_sponsor_stops_a_run_and_takes_its_escrow_back_on_anvil(
    make_swarm, tmp_path: Path, anvil: Anvil, w3: Web3
):
    swarm, home, _sponsor, run_id = start(make_swarm, tmp_path)
    settlement, keys, chain = deploy_escrow(tmp_path, anvil, w3)
    key = keys["sponsor"]
    sponsor_address = load_eth_account(key).address
    cli("run", "fund", run_id, 2500, "--hub", swarm.url, "--home", home, *chain, "--eth-key", key)
    refused = runner.invoke(app, ["run", "refund", run_id, "--hub", swarm.url, "--eth-key",
                                  str(key), *chain])  # fmt: skip
    assert refused.exit_code == 2 and "stop it first" in refused.output
    before = settlement.token_balance(sponsor_address)
    cli("run", "stop", run_id, "--hub", swarm.url, "--home", home, "--reason", "changed my mind")
    out = cli("run", "refund", run_id, "--hub", swarm.url, "--eth-key", key, *chain)
    assert "refunded" in out
    state = settlement.state()
    assert state.closed and state.refunded_units == 2500 and state.allocated_units == 0
    assert settlement.token_balance(sponsor_address) == before + 2500
    again = runner.invoke(app, ["run", "refund", run_id, "--hub", swarm.url, "--eth-key",
                                str(key), *chain])  # fmt: skip
    assert again.exit_code == 1 and "nothing to refund" in again.output
    assert "ledger ok" in cli("ledger", "verify", "--hub", swarm.url)


@pytest.mark.anvil
def test_the_hub_posts_epochs_on_its_own_clock_and_nodes_claim_on_anvil(
    make_swarm, tmp_path: Path, anvil: Anvil, w3: Web3
):
    """`gridswarm hub --epoch-every-s`: nobody runs `ledger post-epoch`; the hub posts the epoch
    once there is something to grant (and anchors the checkpoints), and nodes claim it. That
    an epoch with nothing new is not posted: `tests/ledger/test_ops.py`."""
    settlement, keys, chain = deploy_escrow(tmp_path, anvil, w3)
    swarm = make_swarm(liveness_s=LIVENESS_S)
    swarm.hub_extra += ["--epoch-every-s", "10", *chain, "--eth-key", str(keys["hub"])]
    swarm.start_hub()
    home = tmp_path / "sponsor"
    sponsor = HubClient(swarm.url, Identity.load_or_create(home / "sponsor.key"))
    cfg = tiny_run(train=TRAIN, round={"deadline_s": 60, "quorum": 2}, budget={"rounds": 1})
    run_id = sponsor.create_run(cfg).run_id
    cli("run", "fund", run_id, 3000, "--hub", swarm.url, "--home", home, *chain,
        "--eth-key", keys["sponsor"])  # fmt: skip
    homes = [tmp_path / "a", tmp_path / "b"]
    train_one_round(swarm, run_id, homes)
    finished(sponsor, run_id)
    node_keys = []
    for i, h in enumerate(homes):  # each node names its payout address (nothing to claim yet)
        node_keys.append(tmp_path / f"node{i}.eth")
        node_keys[-1].write_text(funded_account(w3).key.hex())
        cli("node", "claim", "--hub", swarm.url, "--home", h, "--eth-key", node_keys[-1], *chain)

    def epochs() -> list[dict]:
        return json.loads(cli("ledger", "show", "--hub", swarm.url, "--kind", "epoch", "--json"))

    (epoch,) = wait_for(lambda: epochs() or None, 60, "the hub's epoch")
    assert epoch["payload"]["epoch"] == 0 and epoch["payload"]["tx"].startswith("0x")
    for h, key in zip(homes, node_keys, strict=True):
        out = cli("node", "claim", "--hub", swarm.url, "--home", h, "--eth-key", key, *chain)
        assert "claimed" in out
    assert settlement.state().claimed_units == settlement.state().allocated_units > 0
    assert "ledger ok" in cli("ledger", "verify", "--db", swarm.db_url, *chain)  # anchored
