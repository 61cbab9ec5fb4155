"""Energy in the live hub: who trains how much this round, and what each contribution emitted.

Pure functions over plain data (what nodes reported, the run's settings, a clock value); the hub
service reads the database, calls these and stores the answers. The scheduling itself is
`energy.policy.plan_round`, the same code the simulator runs; this module adapts live facts to it:

- `node_state`: a node's last `EnergyReport` (and the hub's own signal for its region) ->
  `NodeEnergyState`, with speed and power scaled to the round's duty cycle (compute / wall time).
- `decide_work`: the run's energy policy over the live nodes -> this node's `WorkDecision`: a
  share of a full round (inner steps = share x what its speed allows), the window its steps must
  fit in (its availability forecast), or wait.
- `account`: a contribution's energy and intensity (hub signal first, else the node's, else a
  default) -> emissions and the local-surplus share.
- `run_report_json` / `format_run_report`: per node and per run totals with the agnostic
  counterfactual, for `GET /v1/runs/{id}/report` and `gridswarm run report`.

The only functions that touch the outside world are at the bottom: `load_hub_signals` reads the
hub's `--signals` TOML, `signal_intensity` asks a provider (a file lookup, or HTTP with a cache).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gridswarm.config import EnergyConfig, RunConfig
from gridswarm.energy.accounting import (
    ContributionEnergy,
    EnergyTotals,
    NodeProfile,
    agnostic_counterfactual_g,
    emissions_g,
    run_report,
)
from gridswarm.energy.policy import (
    HUB_POLICIES,
    LOCAL_PV_INTENSITY_G_PER_KWH,
    NodeEnergyState,
    RoundEnergyPlan,
    plan_round,
    step_values,
)
from gridswarm.energy.signals import SignalError, SignalProvider, signal_from_config

DEFAULT_POWER_W = 10.0  # draw assumed for a node that has reported none (two busy CPU cores)
QUORUM_SHARE = 1e-3  # a node added only to reach the quorum does the minimum (min_inner_steps)
HUB, NODE, DEFAULT = "hub", "node", "default"  # where a contribution's intensity came from


# --------------------------------------------------------------------------------------------------
# what the hub knows about a live node


@dataclass(frozen=True)
class LiveNode:
    """A live node as the hub sees it when it plans: speed on this run, and what it reported."""

    node_id: str
    tokens_per_s: float
    region: str | None = None
    report: Mapping[str, Any] | None = None  # its last EnergyReport as a dict
    hub_forecast: Sequence[tuple[float, float]] | None = None  # the hub's signal for its region


def parse_report(energy_json: str | None) -> dict | None:
    """The stored report of a node (None when it never sent one or it is unreadable)."""
    if not energy_json:
        return None
    try:
        report = json.loads(energy_json)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def check_energy(cfg: RunConfig) -> None:
    """Refuse energy settings a run cannot honour (raises ValueError naming the field)."""
    if HUB_POLICIES.get(cfg.energy.policy).needs_token_target and cfg.budget.tokens is None:
        raise ValueError(
            f"energy.policy = {cfg.energy.policy!r} needs a token target: set budget.tokens "
            "(the policy spreads that many tokens over energy.deadline_s)"
        )


def run_targets(
    cfg: RunConfig, created_at_s: float, tokens_total: int
) -> tuple[float | None, float | None]:
    """(tokens still to train, unix deadline) of a run; None where the run sets none."""
    remaining = None if cfg.budget.tokens is None else max(cfg.budget.tokens - tokens_total, 0)
    deadline = None if cfg.energy.deadline_s is None else created_at_s + cfg.energy.deadline_s
    return remaining, deadline


def round_timing(cfg: RunConfig, fastest_tokens_per_s: float) -> tuple[float, float]:
    """(compute_s, wall_s) of one round: the fastest node trains `inner_steps` in compute_s; a
    round also spends `energy.round_overhead_s` on sync; never longer than the round deadline."""
    compute_s = cfg.train.inner_steps * cfg.tokens_per_step / max(fastest_tokens_per_s, 1e-9)
    compute_s = min(compute_s, cfg.round.deadline_s)
    wall_s = min(compute_s + cfg.energy.round_overhead_s, cfg.round.deadline_s)
    return compute_s, max(wall_s, compute_s, 1e-3)


def node_state(
    node: LiveNode,
    now_s: float,
    *,
    default_intensity_g_per_kwh: float,
    duty: float = 1.0,
    available: bool | None = None,
) -> NodeEnergyState:
    """`NodeEnergyState` for `plan_round`. Speed and power are scaled by `duty` = compute / wall
    time of a round, so that share 1 of a round of wall time is exactly the work the step planner
    gives at full speed. The hub's own forecast wins over the node's."""
    r = node.report or {}
    intensity = list(node.hub_forecast or ()) or [tuple(p) for p in r.get("intensity_forecast", ())]
    if not intensity:
        now_g = r.get("intensity_g_per_kwh")
        intensity = [(now_s, float(default_intensity_g_per_kwh if now_g is None else now_g))]
    surplus = r.get("surplus_forecast_w")
    availability = r.get("availability_forecast")
    return NodeEnergyState(
        node_id=node.node_id,
        region=node.region or r.get("region") or "",
        tokens_per_s=max(node.tokens_per_s, 1e-9) * duty,
        power_w=float(r.get("power_w") or DEFAULT_POWER_W) * duty,
        available=bool(r.get("available", True)) if available is None else available,
        intensity_forecast=[(float(t), float(g)) for t, g in intensity],
        surplus_forecast_w=[(float(t), float(w)) for t, w in surplus] if surplus else None,
        availability_forecast=[(float(t), bool(a)) for t, a in availability]
        if availability
        else None,
        battery_available_wh=float(r.get("battery_available_wh") or 0.0),
    )


def window_s(availability: Sequence[tuple[float, bool]] | None, now_s: float) -> float | None:
    """Seconds from `now_s` until the node's availability forecast first turns false (it is
    asking, so it is available now); None when the forecast never does."""
    for t, ok in sorted(availability or (), key=lambda p: p[0]):
        if t > now_s and not ok:
            return t - now_s
    return None


# --------------------------------------------------------------------------------------------------
# the decision for one node asking for work


@dataclass(frozen=True)
class WorkDecision:
    """How much of a full round one node should train now."""

    share: float  # in [0, 1] of what its speed allows in a round; 0 = wait
    window_s: float | None  # its steps must fit in this many seconds (None: no limit)
    retry_after_s: float  # when share is 0: ask again after this long
    reason: str
    plan: RoundEnergyPlan | None = None  # the round plan it came from (None for agnostic)


def _cost_now(state: NodeEnergyState, now_s: float) -> float:
    """g/token if the node ran now, from grid intensity only (ranking nodes for the quorum)."""
    g = float(step_values(state.intensity_forecast, np.array([now_s]))[0])
    return state.power_w * g / state.tokens_per_s


def decide_work(
    energy: EnergyConfig,
    node_id: str,
    nodes: Sequence[LiveNode],
    now_s: float,
    *,
    tokens_remaining: float | None,
    deadline_at_s: float | None,
    compute_s: float,
    wall_s: float,
    quorum: int = 1,
) -> WorkDecision:
    """This node's work share under the run's energy policy.

    `agnostic` gives everyone share 1 (today's behaviour). The green policies ask
    `plan_round` for the whole round (every live node, the requester counted as available since it
    asks), then make sure at least `quorum` available nodes get work so the round can close. A
    deferral is a wait of at most 5 s before asking again; the plan is recomputed on every request,
    and as the deadline nears it runs every node, so a deferred run cannot stall past it.
    """
    me = next((n for n in nodes if n.node_id == node_id), None)
    if me is None:
        raise ValueError(f"node {node_id} is not among the live nodes")
    my_window = window_s((me.report or {}).get("availability_forecast"), now_s)
    if (
        not HUB_POLICIES.get(energy.policy).needs_token_target
        or tokens_remaining is None
        or deadline_at_s is None
    ):
        return WorkDecision(1.0, my_window, 0.0, f"{energy.policy}: full share")
    duty = compute_s / wall_s
    states = [
        node_state(
            n,
            now_s,
            default_intensity_g_per_kwh=energy.default_intensity_g_per_kwh,
            duty=duty,
            available=True if n.node_id == node_id else None,
        )
        for n in nodes
    ]
    plan = plan_round(
        energy.policy,
        now_s,
        states,
        tokens_remaining,
        deadline_at_s,
        wall_s,
        margin=energy.margin,
        reserve_rounds=energy.reserve_rounds,
    )
    shares = dict(plan.shares)
    if not plan.defer:
        available = sorted(
            (s for s in states if s.available), key=lambda s: (_cost_now(s, now_s), s.node_id)
        )
        missing = min(quorum, len(available)) - sum(shares.get(s.node_id, 0) > 0 for s in available)
        for s in available:
            if missing <= 0:
                break
            if shares.get(s.node_id, 0) <= 0:
                shares[s.node_id] = QUORUM_SHARE
                missing -= 1
    share = float(shares.get(node_id, 0.0))
    if share > 0:
        return WorkDecision(min(share, 1.0), my_window, 0.0, plan.reason, plan)
    if plan.defer and plan.defer_until_s is not None:
        retry = min(max(plan.defer_until_s - now_s, 0.5), 5.0)
    else:
        retry = min(max(wall_s / 2, 0.5), 5.0)
    return WorkDecision(0.0, my_window, retry, f"{energy.policy}: {plan.reason}", plan)


# --------------------------------------------------------------------------------------------------
# accounting of one contribution


@dataclass(frozen=True)
class ContributionCarbon:
    """What the hub stores with a contribution (columns of `contributions`)."""

    intensity_g_per_kwh: float | None
    intensity_source: str | None  # hub | node | default
    emissions_g: float | None
    local_surplus_share: float | None

    def columns(self) -> dict[str, Any]:
        return {
            "intensity_g_per_kwh": self.intensity_g_per_kwh,
            "intensity_source": self.intensity_source,
            "emissions_g": self.emissions_g,
            "local_surplus_share": self.local_surplus_share,
        }


def account(
    energy_wh: float | None,
    node_intensity_g_per_kwh: float | None,
    local_surplus_share: float | None,
    hub_intensity_g_per_kwh: float | None,
    default_intensity_g_per_kwh: float,
) -> ContributionCarbon:
    """Emissions of one contribution: grid part at the hub's intensity for the node's region and
    time when it has a signal, else the node's own, else the default; local part at PV lifecycle
    intensity. Unmetered contributions (no energy_wh) get no emissions."""
    if hub_intensity_g_per_kwh is not None:
        intensity, source = hub_intensity_g_per_kwh, HUB
    elif node_intensity_g_per_kwh is not None:
        intensity, source = node_intensity_g_per_kwh, NODE
    else:
        intensity, source = default_intensity_g_per_kwh, DEFAULT
    share = min(max(local_surplus_share or 0.0, 0.0), 1.0)
    if energy_wh is None:
        return ContributionCarbon(intensity, source, None, share)
    return ContributionCarbon(
        intensity, source, emissions_g(energy_wh, intensity, energy_wh * share), share
    )


# --------------------------------------------------------------------------------------------------
# the run report


@dataclass(frozen=True)
class ContributionRow:
    """The stored facts of one contribution that the report needs."""

    node_id: str
    region: str | None
    round: int
    created_at: float
    train_time_s: float
    tokens: int
    energy_wh: float | None
    intensity_g_per_kwh: float | None
    intensity_source: str | None
    local_surplus_share: float | None
    energy_method: str | None = None

    @classmethod
    def of(cls, c: Any) -> ContributionRow:
        """From a stored contribution (any object with the `contributions` columns)."""
        return cls(
            c.node_id,
            c.region,
            c.round,
            c.created_at,
            c.train_time_s,
            c.tokens,
            c.energy_wh,
            c.intensity_g_per_kwh,
            c.intensity_source,
            c.local_surplus_share,
            c.energy_method,
        )


@dataclass(frozen=True)
class Participant:
    """A node that could have worked on the run (for the agnostic counterfactual)."""

    node_id: str
    name: str | None = None
    region: str | None = None
    tokens_per_s: float = 0.0  # probe estimate, used when it made no contribution
    power_w: float | None = None  # reported draw
    intensity_g_per_kwh: float | None = None  # last reported intensity


def contribution_records(
    rows: Sequence[ContributionRow], default_intensity_g_per_kwh: float
) -> list[ContributionEnergy]:
    """Accounting records of the metered contributions (unmetered ones have no energy)."""
    records = []
    for r in rows:
        if r.energy_wh is None:
            continue
        intensity = (
            r.intensity_g_per_kwh
            if r.intensity_g_per_kwh is not None
            else default_intensity_g_per_kwh
        )
        records.append(
            ContributionEnergy(
                node_id=r.node_id,
                region=r.region or "",
                round_index=r.round,
                start_s=r.created_at - r.train_time_s,
                duration_s=r.train_time_s,
                tokens=float(r.tokens),
                energy_wh=r.energy_wh,
                intensity_g_per_kwh=intensity,
                local_energy_wh=r.energy_wh * min(max(r.local_surplus_share or 0.0, 0.0), 1.0),
                method=r.energy_method or "unknown",
            )
        )
    return records


def _totals_json(t: EnergyTotals) -> dict:
    return {
        "contributions": t.contributions,
        "tokens": t.tokens,
        "energy_kwh": t.energy_kwh,
        "emissions_kg": t.emissions_kg,
        "local_energy_kwh": t.local_energy_kwh,
        "g_per_1k_tokens": t.g_per_1k_tokens,
        "local_surplus_share": t.local_surplus_share,
        "intensity_g_per_kwh": t.intensity_g_per_kwh,
    }


def counterfactual_g(
    records: Sequence[ContributionEnergy],
    participants: Sequence[Participant],
    start_s: float,
    hub_intensity_at: Callable[[str, float], float | None],
    default_intensity_g_per_kwh: float,
) -> float | None:
    """Emissions had every participant run flat out from `start_s` until the same tokens were
    done (the `agnostic` baseline). Speed and power come from a node's own contributions, else
    its probe and report; intensity from the hub's signal for its region, else the intensities
    its contributions recorded (step-wise in time), else its report, else the default; a node's
    mean local-surplus share lowers its effective intensity as it did in the run."""
    by_node: dict[str, list[ContributionEnergy]] = {}
    for r in records:
        by_node.setdefault(r.node_id, []).append(r)
    people = {p.node_id: p for p in participants}
    for node_id in by_node:
        people.setdefault(node_id, Participant(node_id))
    profiles, series, local_share, regions = [], {}, {}, {}
    for node_id, p in sorted(people.items()):
        mine = sorted(by_node.get(node_id, []), key=lambda r: r.start_s)
        busy_s = sum(r.duration_s for r in mine)
        if mine and busy_s > 0:
            tokens_per_s = sum(r.tokens for r in mine) / busy_s
            power_w = sum(r.energy_wh for r in mine) * 3600.0 / busy_s
            energy = sum(r.energy_wh for r in mine)
            local_share[node_id] = sum(r.local_energy_wh for r in mine) / energy if energy else 0.0
            series[node_id] = [(r.start_s, r.intensity_g_per_kwh) for r in mine]
            regions[node_id] = mine[-1].region
        else:
            tokens_per_s, power_w = p.tokens_per_s, p.power_w or DEFAULT_POWER_W
            local_share[node_id] = 0.0
            g = p.intensity_g_per_kwh
            series[node_id] = [(start_s, default_intensity_g_per_kwh if g is None else g)]
            regions[node_id] = p.region or ""
        if tokens_per_s > 0 and power_w > 0:
            profiles.append(NodeProfile(node_id, regions[node_id], tokens_per_s, power_w))
    tokens = sum(r.tokens for r in records)
    if not profiles or tokens <= 0:
        return None

    def intensity_at(node_id: str, t_s: float) -> float:
        g = hub_intensity_at(regions[node_id], t_s)
        if g is None:
            g = float(step_values(series[node_id], np.array([t_s]))[0])
        s = local_share[node_id]
        return (1 - s) * g + s * LOCAL_PV_INTENSITY_G_PER_KWH

    return agnostic_counterfactual_g(profiles, tokens, start_s, intensity_at)


def run_report_json(
    run_id: str,
    policy: str,
    rows: Sequence[ContributionRow],
    participants: Sequence[Participant],
    start_s: float,
    hub_intensity_at: Callable[[str, float], float | None],
    default_intensity_g_per_kwh: float,
) -> dict:
    """Per node, per region and run totals (tokens, kWh, kgCO2e, g per 1k tokens, local share)
    and the agnostic counterfactual. Totals are sums over the stored contributions."""
    records = contribution_records(rows, default_intensity_g_per_kwh)
    report = run_report(records)
    cf_g = counterfactual_g(
        records, participants, start_s, hub_intensity_at, default_intensity_g_per_kwh
    )
    names = {p.node_id: p.name for p in participants}
    sources: dict[str, int] = {}
    methods: dict[str, set[str]] = {}
    for r in rows:
        if r.energy_wh is not None:
            source = r.intensity_source or DEFAULT
            sources[source] = sources.get(source, 0) + 1
            methods.setdefault(r.node_id, set()).add(r.energy_method or "unknown")
    regions = {r.node_id: r.region for r in records}
    agnostic_kg = None if cf_g is None else cf_g / 1000.0
    reduction = None
    if agnostic_kg:
        reduction = 1.0 - report.total.emissions_kg / agnostic_kg
    return {
        "run_id": run_id,
        "policy": policy,
        "contributions": len(rows),
        "unmetered": sum(r.energy_wh is None for r in rows),
        "intensity_sources": dict(sorted(sources.items())),
        "default_intensity_g_per_kwh": default_intensity_g_per_kwh,
        "total": _totals_json(report.total),
        "nodes": [
            {
                "id": node_id,
                "name": names.get(node_id),
                "region": regions.get(node_id),
                "method": "+".join(sorted(methods.get(node_id, ()))),
                **_totals_json(t),
            }
            for node_id, t in report.per_node.items()
        ],
        "regions": {k: _totals_json(v) for k, v in report.per_region.items()},
        "agnostic_emissions_kg": agnostic_kg,
        "reduction_vs_agnostic": reduction,
    }


def format_run_report(report: Mapping[str, Any], privacy: Mapping[str, Any] | None = None) -> str:
    """The plain-text report of `gridswarm run report`: a row per node and the run's total
    (3 significant digits, so a small run does not read 0.000), the agnostic counterfactual,
    where the intensities came from and, when the run has them, its privacy figures."""
    head = (
        f"{'node':<16}{'region':<7}{'tokens':>11}{'kWh':>10}{'kgCO2e':>10}"
        f"{'gCO2e/1k tok':>13}{'local':>7}"
    )
    lines = [f"run {report['run_id']} — energy policy {report['policy']}", head, "-" * len(head)]

    def row(name: str, region: str, t: Mapping[str, Any]) -> str:
        return (
            f"{name[:15]:<16}{region[:6]:<7}{t['tokens']:>11,.0f}{t['energy_kwh']:>10.3g}"
            f"{t['emissions_kg']:>10.3g}{t['g_per_1k_tokens']:>13.3g}"
            f"{t['local_surplus_share']:>7.0%}"
        )

    lines += [row(n["name"] or n["id"], n["region"] or "", n) for n in report["nodes"]]
    lines += ["-" * len(head), row("run", "", report["total"])]
    agnostic = report.get("agnostic_emissions_kg")
    if agnostic is not None:
        reduction = report.get("reduction_vs_agnostic")
        vs = ""
        if reduction is not None:
            vs = f" (this run: {abs(reduction):.1%} {'less' if reduction >= 0 else 'more'})"
        model = " (every node flat out from the start)"
        if report.get("policy") == "agnostic":
            model += "; this run is itself agnostic, so the gap is joins, leaves and throttling"
        lines.append(f"agnostic counterfactual: {agnostic:.3g} kgCO2e{vs}{model}")
    lines.append(
        "intensity source: "
        + describe_sources(
            report.get("intensity_sources", {}), report.get("default_intensity_g_per_kwh")
        )
    )
    if report.get("unmetered"):
        lines.append(f"unmetered contributions (no energy reported): {report['unmetered']}")
    if privacy:
        lines.append("privacy: " + format_privacy(privacy))
    return "\n".join(lines)


SOURCE_MEANING = {
    HUB: "the hub's own signal for the node's region",
    NODE: "the node's own signal",
}


def describe_sources(sources: Mapping[str, int], default_g: float | None) -> str:
    """Where the grid intensity of the run's contributions came from, in words: e.g. "30
    contributions at the default 475 g/kWh (neither hub nor node had a signal)"."""
    parts = []
    for source, count in sources.items():
        what = f"{count} contribution{'s' if count != 1 else ''}"
        if source == DEFAULT:
            at = f"the default {default_g:g} g/kWh" if default_g is not None else "the default"
            parts.append(f"{what} at {at} (neither hub nor node had a signal)")
        else:
            parts.append(f"{what} from {SOURCE_MEANING.get(source, source)}")
    return "; ".join(parts) or "none (no metered contributions)"


def format_privacy(privacy: Mapping[str, Any]) -> str:
    """epsilon / delta / budget of a run's `privacy` status, whatever of them it has."""
    parts = []
    for key in ("epsilon", "delta", "epsilon_budget", "budget"):
        value = privacy.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4g}")
        elif value is not None and not isinstance(value, dict | list):
            parts.append(f"{key} {value}")
    return ", ".join(parts) or json.dumps(privacy, sort_keys=True, default=str)[:200]


def energy_status(
    cfg: RunConfig,
    created_at_s: float,
    finished_at_s: float | None,
    rows: Sequence[ContributionRow],
    reports: Mapping[str, Mapping[str, Any]],
) -> dict:
    """The `energy` part of run_status: policy, deadline, totals, each node's last report."""
    records = contribution_records(rows, cfg.energy.default_intensity_g_per_kwh)
    total = run_report(records).total
    _, deadline = run_targets(cfg, created_at_s, 0)
    return {
        "policy": cfg.energy.policy,
        "tokens_target": cfg.budget.tokens,
        "deadline_at": deadline,
        "deadline_met": None
        if deadline is None or finished_at_s is None
        else finished_at_s <= deadline,
        "energy_wh": total.energy_kwh * 1000.0,
        "emissions_g": total.emissions_kg * 1000.0,
        "g_per_1k_tokens": total.g_per_1k_tokens,
        "local_surplus_share": total.local_surplus_share,
        "nodes": {
            node_id: {
                k: r.get(k)
                for k in (
                    "region",
                    "available",
                    "reasons",
                    "intensity_g_per_kwh",
                    "surplus_w",
                    "power_w",
                    "run_id",
                    "received_at",
                )
            }
            for node_id, r in sorted(reports.items())
        },
    }


# --------------------------------------------------------------------------------------------------
# edges: the hub's own signals


def load_hub_signals(path: str | Path) -> dict[str, SignalProvider]:
    """`gridswarm hub --signals PATH`: a TOML table per region, each a signal config, e.g.
    `[DE] kind = "trace"  path = "de.csv.gz"` or `[FR] kind = "constant"
    intensity_g_per_kwh = 56`. Relative paths are read from the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"signals file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"signals file {path}: not valid TOML: {exc}") from exc
    if not data:
        raise ValueError(f"signals file {path}: no region tables")
    signals = {}
    for region, cfg in data.items():
        if not isinstance(cfg, Mapping):
            raise ValueError(f"signals file {path}: [{region}] must be a table with kind = ...")
        try:
            signals[region] = signal_from_config(cfg, region=region, base_dir=path.parent)
        except ValueError as exc:
            raise ValueError(f"signals file {path}, region {region}: {exc}") from exc
    return signals


def signal_intensity(provider: SignalProvider | None, t0_s: float, t1_s: float) -> float | None:
    """Time-weighted mean intensity of a provider over [t0_s, t1_s]; None without a provider or
    when it fails (the caller falls back to the node's own figure)."""
    if provider is None:
        return None
    try:
        if t1_s - t0_s < 1.0:
            return provider.current(t1_s).intensity_g_per_kwh
        points = provider.forecast(t0_s, t1_s - t0_s)
    except (SignalError, ValueError):
        return None
    if not points:
        return None
    edges = [p.t_s for p in points[1:]] + [t1_s]
    total = sum(p.intensity_g_per_kwh * (e - p.t_s) for p, e in zip(points, edges, strict=True))
    span = t1_s - points[0].t_s
    return total / span if span > 0 and math.isfinite(total) else points[0].intensity_g_per_kwh


def signal_forecast(
    provider: SignalProvider | None, now_s: float, horizon_s: float
) -> list[tuple[float, float]] | None:
    """The hub's intensity forecast for a region, or None (no provider, or it failed)."""
    if provider is None:
        return None
    try:
        return provider.intensity_forecast(now_s, horizon_s) or None
    except (SignalError, ValueError):
        return None
