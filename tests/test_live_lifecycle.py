"""A live run no node can train: the only node lacks the dataset, reports why, the run shows
`stalled` with the reason, and the sponsor's `gridswarm run stop` ends it with the ledger intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.train.data import read_text
from tests.conftest import tiny_run, wait_for
from tests.test_cli_errors import cli

pytestmark = pytest.mark.slow


def test_run_without_data_on_any_node_stalls_and_stops_cleanly(make_swarm, tmp_path: Path):
    swarm = make_swarm()
    swarm.start_hub()
    dataset = tmp_path / "corpus.txt"
    dataset.write_text(read_text("tinyshakespeare")[:200_000])
    sponsor = HubClient(swarm.url, Identity.load_or_create(tmp_path / "home" / "sponsor.key"))
    run_id = sponsor.create_run(tiny_run(data={"dataset": str(dataset)})).run_id
    dataset.unlink()  # the hub read it; the node will not find it
    node = swarm.start_node("lonely", run_id)

    status = wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "stalled" and s, 120, "a stall"
    )
    assert "corpus.txt" in status["status_reason"] and "node failures" in status["status_reason"]
    (row,) = status["nodes"]
    assert row["id"] == node and row["failures"] >= 3 and row["contributions"] == 0
    assert "FileNotFoundError" in row["last_failure"] and row["state"] == "live"
    shown = cli(tmp_path, "run", "status", run_id, "--hub", swarm.url)
    assert shown.returncode == 0 and "stalled" in shown.stdout and "corpus.txt" in shown.stdout
    assert "0×" not in shown.stdout and "no contribution yet" in shown.stdout

    stopped = cli(tmp_path, "run", "stop", run_id, "--reason", "no data", "--hub", swarm.url)
    assert stopped.returncode == 0, stopped.stderr
    assert f"run {run_id}: stalled → stopped" in stopped.stdout
    assert sponsor.run_status(run_id)["status"] == "stopped"
    swarm.nodes[node].wait(timeout=30)  # told at its next request: the run it was given ended
    assert swarm.nodes[node].returncode == 0
    log = (swarm.workdir / "lonely.log").read_text()
    assert "cannot train" in log and "is stalled" in log and "Traceback" not in log
    hub_log = (swarm.workdir / "hub.log").read_text()
    assert f"run {run_id} round 0 open" in hub_log and "active -> stalled" in hub_log

    verified = cli(tmp_path, "ledger", "verify", "--hub", swarm.url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    kinds = [
        e["payload"]["to"]
        for e in sponsor.request(
            "GET", "/v1/ledger", params={"kind": "lifecycle"}, signed=False
        ).json()
    ]
    assert kinds == ["stalled", "stopped"]
