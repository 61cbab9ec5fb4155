"""hub/reports.py: a run's status is assembled from its rows and the clock alone (no session,
no hub), so its figures are checked here on rows built by hand."""

from __future__ import annotations

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.reports import RunRows, liveness_state, ring_allreduce_bytes, run_status_json
from gridswarm.hub.states import RoundStatus
from gridswarm.protocol import Liveness, NodeStatus

NUMEL = 1000
LIVENESS_S = 30.0
NOW_S = 1000.0


def node(node_id: str, last_seen_at: float, status: NodeStatus = NodeStatus.IDLE) -> m.Node:
    return m.Node(id=node_id, name=f"name-{node_id}", last_seen_at=last_seen_at, status=status)


def contribution(node_id: str, round_number: int, steps: int = 4) -> m.Contribution:
    return m.Contribution(
        node_id=node_id, round=round_number, steps=steps, tokens=100, bytes_up=10, energy_wh=0.5
    )


def closed_round(number: int) -> m.Round:
    row = m.Round(number=number, status=RoundStatus.PENDING, attempt=0)
    row.status = RoundStatus.OPEN  # rows move only along their lifecycle (hub/states.py)
    row.status = RoundStatus.CLOSED
    return row


def rows(**changes) -> RunRows:
    run = m.Run(
        id="r",
        name="run",
        status=RunState.ACTIVE,
        round=1,
        version=1,
        numel=NUMEL,
        tokens_total=300,
        config_json="{}",
    )
    base = {
        "run": run,
        "versions": [m.Version(number=0, tokens_total=0, val_loss=5.0)],
        "contributions": [contribution("a", 0), contribution("b", 0), contribution("a", 1)],
        "rounds": [closed_round(0)],
        "assignment_counts": [(0, "submitted", 2), (0, "missed", 1)],
        "bytes_down": [("a", 70), ("b", None), ("stranger", 5)],
        "nodes": {
            "a": node("a", NOW_S - 1),
            "b": node("b", NOW_S - 100),  # silent
            "c": node("c", NOW_S, NodeStatus.LEFT),
            "stranger": node("stranger", NOW_S),
        },
        "failures": [],
        "workers": ["a", "b", "c"],
    }
    return RunRows(**(base | changes))


def test_each_node_that_worked_is_totalled_with_its_liveness() -> None:
    status = run_status_json(rows(), NOW_S, LIVENESS_S)
    by_id = {n["id"]: n for n in status["nodes"]}
    assert list(by_id) == ["a", "b", "c"]  # given work: listed even without a contribution
    assert (by_id["a"]["tokens"], by_id["a"]["contributions"], by_id["a"]["bytes_down"]) == (
        200,
        2,
        70,
    )
    assert by_id["b"]["bytes_down"] == 0 and by_id["c"]["contributions"] == 0
    assert [by_id[n]["state"] for n in "abc"] == [Liveness.LIVE, Liveness.SILENT, Liveness.GONE]
    assert status["bytes_down_total"] == 75  # every download of the run, a stranger's too
    assert {n["id"] for n in status["live_nodes"]} == {"a", "stranger"}
    assert status["rounds"][0]["assignments"] == {"submitted": 2, "missed": 1}


def test_the_sync_equivalent_counts_each_round_with_its_own_world() -> None:
    status = run_status_json(rows(), NOW_S, LIVENESS_S)
    # round 0 had two contributors, round 1 one (no all-reduce with a world of one)
    assert status["bytes_sync_dp_equivalent"] == int(2 * 4 * ring_allreduce_bytes(NUMEL, 2))
    assert ring_allreduce_bytes(NUMEL, 1) == 0.0
    assert ring_allreduce_bytes(NUMEL, 4) == 2 * 3 / 4 * 4 * NUMEL


def test_a_failure_lists_its_node_with_the_last_reason() -> None:
    failures = [
        m.RunFailure(node_id="d", reason="out of memory"),
        m.RunFailure(node_id="d", reason="dataset missing"),
    ]
    nodes = rows().nodes | {"d": node("d", NOW_S)}
    status = run_status_json(rows(failures=failures, nodes=nodes), NOW_S, LIVENESS_S)
    d = next(n for n in status["nodes"] if n["id"] == "d")
    assert (d["failures"], d["last_failure"]) == (2, "dataset missing")


def test_liveness_is_gone_only_for_a_node_that_left() -> None:
    assert liveness_state(NodeStatus.LEFT, 0.0, LIVENESS_S) == Liveness.GONE
    assert liveness_state(NodeStatus.TRAINING, LIVENESS_S, LIVENESS_S) == Liveness.LIVE
    assert liveness_state(NodeStatus.IDLE, LIVENESS_S + 0.1, LIVENESS_S) == Liveness.SILENT
