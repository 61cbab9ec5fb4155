"""What the hub shows about a run: its status (`GET /v1/runs/{id}`, what `gridswarm status` and
a dashboard read) and its energy and carbon report (`GET /v1/runs/{id}/report`).

Reports decide nothing and write nothing. Each is one read of the run's rows in one session
(`read_run_rows` in hub/store/reports.py; the report's in `HubService.run_report`), then pure
assembly from those rows and the clock (`run_status_json`, `report_participants`), so a report
never holds the hub's lock or a run's row lock, and its figures can be tested on rows built by
hand. The energy, trust and privacy sections come from their own modules (`hub/energy.py`,
`HubTrust.status`, `HubPrivacy.run_status`); `HubService.run_status` and `run_report` put them
together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy.orm import Session

from gridswarm.hub import energy as hub_energy
from gridswarm.hub import models as m
from gridswarm.hub.scheduler import speed_from_probe
from gridswarm.hub.store import reports as store
from gridswarm.hub.store.reports import RunRows  # what a status is assembled from
from gridswarm.protocol import Liveness, NodeStatus


def liveness_state(status: NodeStatus, silent_s: float, liveness_s: float) -> Liveness:
    """How a run's status shows a node: gone (it said it left), live (heard from within
    `liveness_s`) or silent (not heard from since; it may come back)."""
    if status == NodeStatus.LEFT:
        return Liveness.GONE
    return Liveness.LIVE if silent_s <= liveness_s else Liveness.SILENT


def ring_allreduce_bytes(numel: int, world: int) -> float:
    """Bytes one worker sends in a ring all-reduce of `numel` fp32 values among `world` workers:
    what synchronous data parallelism would have moved for the same steps (the run's
    `bytes_sync_dp_equivalent`, and `bench/communication.py`'s DDP side)."""
    return 0.0 if world < 2 else 2 * (world - 1) / world * 4 * numel


def list_runs(s: Session) -> list[dict]:
    """Every run, oldest first, as `GET /v1/runs` lists them."""
    return [
        {
            "id": r.id,
            "name": r.name,
            "status": r.status,
            "round": r.round,
            "version": r.version,
            "tokens_total": r.tokens_total,
        }
        for r in store.runs_by_age(s)
    ]


def _node_entry(node_id: str, name: str | None) -> dict:
    """A node's totals in one run's status, before any are added."""
    return {
        "id": node_id,
        "name": name,
        "tokens": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "contributions": 0,
        "energy_wh": 0.0,
        "failures": 0,
        "last_failure": None,
    }


def _node_totals(rows: RunRows, now_s: float, liveness_s: float) -> list[dict]:
    """Per node that worked on, was given work in, or failed in the run: its tokens, bytes,
    contributions, energy, failures and liveness; by node id."""
    nodes: dict[str, dict] = {}

    def entry(node_id: str) -> dict:
        return nodes.setdefault(node_id, _node_entry(node_id, rows.nodes[node_id].name))

    for c in rows.contributions:
        totals = entry(c.node_id)
        totals["tokens"] += c.tokens
        totals["bytes_up"] += c.bytes_up
        totals["contributions"] += 1
        totals["energy_wh"] += c.energy_wh or 0.0
    for node_id in rows.workers:  # nodes that were given work but never contributed
        entry(node_id)
    for node_id, total in rows.bytes_down:
        if node_id in nodes:
            nodes[node_id]["bytes_down"] = int(total or 0)
    for f in rows.failures:
        totals = entry(f.node_id)
        totals["failures"] += 1
        totals["last_failure"] = f.reason
    for node_id, totals in nodes.items():
        row = rows.nodes[node_id]
        totals["state"] = liveness_state(row.status, now_s - row.last_seen_at, liveness_s)
    return sorted(nodes.values(), key=lambda n: n["id"])


def run_status_json(rows: RunRows, now_s: float, liveness_s: float) -> dict:
    """A run's status from its rows: progress, the loss curve, each round's outcome, bytes
    moved against the synchronous data-parallel equivalent, and its nodes. The energy, trust
    and privacy sections are added by the caller."""
    run = rows.run
    world: dict[int, int] = {}  # contributions per round: the all-reduce's world
    for c in rows.contributions:
        world[c.round] = world.get(c.round, 0) + 1
    sync_dp = sum(
        c.steps * ring_allreduce_bytes(run.numel, world[c.round]) for c in rows.contributions
    )
    outcome: dict[int, dict[str, int]] = {}
    for round_number, status, count in rows.assignment_counts:
        outcome.setdefault(round_number, {})[status] = count
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "status_reason": run.status_reason,
        "liveness_s": liveness_s,
        "round": run.round,
        "version": run.version,
        "numel": run.numel,
        "tokens_total": run.tokens_total,
        "config": json.loads(run.config_json or "null"),
        "val_loss": [v.val_loss for v in rows.versions],
        "curve": [
            {"version": v.number, "tokens": v.tokens_total, "val_loss": v.val_loss}
            for v in rows.versions
        ],
        "rounds": [
            {
                "number": r.number,
                "status": r.status,
                "attempts": r.attempt + 1,
                "close_reason": r.close_reason,
                "assignments": outcome.get(r.number, {}),
                "opened_at": r.opened_at,
                "closed_at": r.closed_at,
            }
            for r in rows.rounds
        ],
        "bytes_up_total": sum(c.bytes_up for c in rows.contributions),
        "bytes_down_total": int(sum(total or 0 for _, total in rows.bytes_down)),
        "bytes_sync_dp_equivalent": int(sync_dp),
        "nodes": _node_totals(rows, now_s, liveness_s),
        "live_nodes": [
            {"id": n.id, "name": n.name, "status": n.status}
            for n in rows.nodes.values()
            if n.status != NodeStatus.LEFT and now_s - n.last_seen_at <= liveness_s
        ],
    }


def energy_reports(
    run_id: str, contributions: Sequence[m.Contribution], nodes: Sequence[m.Node]
) -> dict[str, dict]:
    """The last energy report of each node that contributed to `run_id` or reports working on
    it, by node id (reports are stored on the node's row, `hub/energy.py` `parse_report`)."""
    contributors = {c.node_id for c in contributions}
    reports = {}
    for n in nodes:
        report = hub_energy.parse_report(n.energy_json)
        if report and (n.id in contributors or report.get("run_id") == run_id):
            reports[n.id] = report
    return reports


def report_participants(
    run: m.Run, contributions: Sequence[m.Contribution], nodes: Sequence[m.Node]
) -> list[hub_energy.Participant]:
    """The nodes a run's energy report covers (contributors, and nodes whose last report names
    the run), each with its region, speed on the run's model, power and grid intensity."""
    contributors = {c.node_id for c in contributions}
    participants = []
    for n in nodes:
        report = hub_energy.parse_report(n.energy_json) or {}
        if n.id in contributors or report.get("run_id") == run.id:
            participants.append(
                hub_energy.Participant(
                    n.id,
                    n.name,
                    n.region or report.get("region"),
                    speed_from_probe(n.probe_rate, run.numel),
                    report.get("power_w"),
                    report.get("intensity_g_per_kwh"),
                )
            )
    return participants
