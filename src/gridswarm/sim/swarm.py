"""Discrete-event simulation (SimPy) of a swarm running one training run under a hub energy policy.

The virtual clock is `start_s + env.now` in unix seconds. The same pure code as the live system
decides everything: `plan_round` (hub), `NodePolicy.evaluate` (node), `step_site` (PV, household,
battery) and the accounting records. Each round the hub builds a `NodeEnergyState` per node from
the node's signal forecast and local-generation series, plans, then either defers or hands each node
its share; nodes work in chunks of at most `step_s`, re-checking their own policy before each chunk
(pausing when it refuses), meter energy at their power, and settle each chunk with their home's PV
and battery. A round closes when every assigned node is done, plus a fixed sync overhead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from gridswarm.energy.accounting import ContributionEnergy, RunEnergyReport, run_report
from gridswarm.energy.policy import (
    LOCAL_PV_INTENSITY_G_PER_KWH,
    NodeConditions,
    NodeEnergyState,
    NodePolicy,
    plan_round,
)
from gridswarm.energy.series import UniformSeries
from gridswarm.energy.signals import SignalProvider
from gridswarm.energy.solar import Battery, step_site


@dataclass
class Home:
    """A node's household: PV, load and battery, advanced lazily through time (W series)."""

    pv: UniformSeries | None
    household: UniformSeries | None
    battery: Battery | None = None
    t_s: float = 0.0
    soc_wh: float = 0.0
    piece_s: float = 900.0

    def surplus_w(self, t_s: float) -> float:
        pv = self.pv.at(t_s) if self.pv else 0.0
        load = self.household.at(t_s) if self.household else 0.0
        return pv - load

    def surplus_series_w(self, times_s: np.ndarray) -> np.ndarray:
        pv = self.pv.sample(times_s) if self.pv else np.zeros(len(times_s))
        load = self.household.sample(times_s) if self.household else np.zeros(len(times_s))
        return pv - load

    def run(self, until_s: float, compute_w: float) -> tuple[float, float]:
        """Advance to `until_s` with a constant compute draw; returns (compute Wh, local Wh)."""
        compute_wh = local_wh = 0.0
        while self.t_s < until_s - 1e-9:
            dt = min(self.piece_s, until_s - self.t_s)
            pv = self.pv.at(self.t_s) if self.pv else 0.0
            load = self.household.at(self.t_s) if self.household else 0.0
            step = step_site(self.battery, self.soc_wh, pv, load, compute_w, dt)
            self.soc_wh = step.soc_wh
            compute_wh += compute_w * dt / 3600.0
            local_wh += step.compute_local_w * dt / 3600.0
            self.t_s += dt
        return compute_wh, local_wh

    def battery_available_wh(self, floor_frac: float | None = None) -> float:
        if self.battery is None:
            return 0.0
        floor = self.battery.soc_floor_frac if floor_frac is None else floor_frac
        return max(self.soc_wh - floor * self.battery.capacity_wh, 0.0) * (
            self.battery.one_way_efficiency
        )


@dataclass
class SimNode:
    node_id: str
    region: str
    tokens_per_s: float
    power_w: float
    signal: SignalProvider
    policy: NodePolicy = field(default_factory=NodePolicy)
    home: Home | None = None

    def conditions(self, t_s: float) -> NodeConditions:
        h = self.home
        return NodeConditions(
            now_s=t_s,
            draw_w=self.power_w,
            intensity_g_per_kwh=self.signal.current(t_s).intensity_g_per_kwh,
            price_per_kwh=self.signal.current(t_s).price_per_kwh,
            surplus_w=h.surplus_w(t_s) if h else None,
            battery_soc_wh=h.soc_wh if h and h.battery else 0.0,
            battery_capacity_wh=h.battery.capacity_wh if h and h.battery else 0.0,
            battery_max_power_w=h.battery.max_power_w if h and h.battery else 0.0,
        )


@dataclass(frozen=True)
class SimConfig:
    start_s: float
    deadline_s: float  # absolute unix seconds
    tokens_target: float
    round_duration_s: float = 1800.0
    round_overhead_s: float = 60.0  # download, upload, aggregate: no training work
    step_s: float = 900.0  # node chunk length and timeline bin
    forecast_horizon_s: float = 48 * 3600.0
    margin: float = 0.1
    max_overrun_s: float = 7 * 86400.0  # stop this long after the deadline if still unfinished


@dataclass
class SimResult:
    policy: str
    records: list[ContributionEnergy]
    tokens_done: float
    finished_s: float | None
    deadline_s: float
    rounds: int
    deferrals: int
    timeline_s: np.ndarray  # bin starts
    tokens_per_bin: np.ndarray
    emissions_g_per_bin: np.ndarray
    energy_wh_per_bin: np.ndarray

    @property
    def deadline_met(self) -> bool:
        return self.finished_s is not None and bool(self.finished_s <= self.deadline_s + 1e-6)

    def report(self, agnostic_emissions_g: float | None = None) -> RunEnergyReport:
        return run_report(self.records, agnostic_emissions_g)


def _node_state(node: SimNode, now_s: float, cfg: SimConfig) -> NodeEnergyState:
    horizon = cfg.forecast_horizon_s
    intensity = node.signal.intensity_forecast(now_s, horizon)
    surplus = availability = None
    battery_wh = 0.0
    if node.home is not None:
        times = np.arange(now_s, now_s + horizon, cfg.step_s)
        surplus = list(zip(times.tolist(), node.home.surplus_series_w(times).tolist(), strict=True))
        battery_wh = node.home.battery_available_wh()
    if node.policy.rules:
        # the node tells the hub when its own policy will let it run (from its forecasts)
        surplus_at = dict(surplus) if surplus else {}
        availability = []
        for t, g in intensity:
            c = node.conditions(t)
            c = NodeConditions(
                now_s=t,
                draw_w=c.draw_w,
                intensity_g_per_kwh=g,
                price_per_kwh=c.price_per_kwh,
                surplus_w=surplus_at.get(t, c.surplus_w),
                battery_soc_wh=c.battery_soc_wh,
                battery_capacity_wh=c.battery_capacity_wh,
                battery_max_power_w=c.battery_max_power_w,
            )
            availability.append((t, node.policy.allows(c)))
    return NodeEnergyState(
        node_id=node.node_id,
        region=node.region,
        tokens_per_s=node.tokens_per_s,
        power_w=node.power_w,
        available=node.policy.allows(node.conditions(now_s)),
        intensity_forecast=intensity,
        surplus_forecast_w=surplus,
        availability_forecast=availability,
        battery_available_wh=battery_wh,
        local_intensity_g_per_kwh=LOCAL_PV_INTENSITY_G_PER_KWH,
    )


def simulate(policy_name: str, nodes: Sequence[SimNode], cfg: SimConfig) -> SimResult:
    """Run one training run to its token target (or `max_overrun_s` past the deadline)."""
    if cfg.tokens_target <= 0 or cfg.deadline_s <= cfg.start_s:
        raise ValueError("tokens_target must be > 0 and deadline_s after start_s")
    env = simpy.Environment()
    t0 = cfg.start_s
    for n in nodes:
        if n.home is not None:
            n.home.t_s = t0
            if n.home.battery is not None:
                n.home.soc_wh = n.home.battery.capacity_wh * 0.5
    n_bins = int(np.ceil((cfg.deadline_s + cfg.max_overrun_s - t0) / cfg.step_s)) + 1
    tokens_bin = np.zeros(n_bins)
    emis_bin = np.zeros(n_bins)
    energy_bin = np.zeros(n_bins)
    records: list[ContributionEnergy] = []
    state = {"tokens": 0.0, "finished": None, "rounds": 0, "deferrals": 0}
    stop_s = cfg.deadline_s + cfg.max_overrun_s

    def node_round(node: SimNode, share: float, round_index: int):
        start = t0 + env.now
        round_end = start + cfg.round_duration_s
        work_left = share * cfg.round_duration_s
        worked = energy_wh = local_wh = grid_wh = grid_g = 0.0
        while work_left > 1e-6 and t0 + env.now < round_end - 1e-6:
            now = t0 + env.now
            bin_end = t0 + (np.floor((now - t0) / cfg.step_s) + 1) * cfg.step_s
            dt = min(work_left, bin_end - now, round_end - now)
            if not node.policy.allows(node.conditions(now)):
                yield env.timeout(dt)  # paused by its own policy
                continue
            if node.home is not None:
                node.home.run(now, 0.0)  # idle until now
                e_wh, l_wh = node.home.run(now + dt, node.power_w)
            else:
                e_wh, l_wh = node.power_w * dt / 3600.0, 0.0
            g_per_kwh = node.signal.current(now).intensity_g_per_kwh
            chunk_g = ((e_wh - l_wh) * g_per_kwh + l_wh * LOCAL_PV_INTENSITY_G_PER_KWH) / 1000.0
            b = int((now - t0) // cfg.step_s)
            tokens_bin[b] += node.tokens_per_s * dt
            emis_bin[b] += chunk_g
            energy_bin[b] += e_wh
            worked += dt
            work_left -= dt
            energy_wh += e_wh
            local_wh += l_wh
            grid_wh += e_wh - l_wh
            grid_g += (e_wh - l_wh) * g_per_kwh
            yield env.timeout(dt)
        if worked > 0:
            records.append(
                ContributionEnergy(
                    node_id=node.node_id,
                    region=node.region,
                    round_index=round_index,
                    start_s=start,
                    duration_s=worked,
                    tokens=node.tokens_per_s * worked,
                    energy_wh=energy_wh,
                    intensity_g_per_kwh=(
                        grid_g / grid_wh
                        if grid_wh > 0
                        else node.signal.current(start).intensity_g_per_kwh
                    ),
                    local_energy_wh=min(local_wh, energy_wh),
                    method="model",
                )
            )
        return node.tokens_per_s * worked

    def done() -> bool:  # within a token of the target (float sums)
        return state["tokens"] >= cfg.tokens_target - 1.0

    def hub():
        while not done() and t0 + env.now < stop_s:
            now = t0 + env.now
            states = [_node_state(n, now, cfg) for n in nodes]
            plan = plan_round(
                policy_name,
                now,
                states,
                cfg.tokens_target - state["tokens"],
                cfg.deadline_s,
                cfg.round_duration_s + cfg.round_overhead_s,
                margin=cfg.margin,
            )
            if plan.defer or not any(s > 0 for s in plan.shares.values()):
                state["deferrals"] += 1
                until = plan.defer_until_s if plan.defer_until_s else now + cfg.step_s
                yield env.timeout(max(until - now, cfg.step_s / 4))
                continue
            procs = [
                env.process(node_round(n, plan.shares[n.node_id], state["rounds"]))
                for n in nodes
                if plan.shares.get(n.node_id, 0.0) > 0
            ]
            results = yield simpy.AllOf(env, procs)
            state["tokens"] += sum(results.values())
            state["rounds"] += 1
            yield env.timeout(cfg.round_overhead_s)
            if done():
                state["finished"] = float(t0 + env.now)

    env.process(hub())
    env.run(until=stop_s - t0 + cfg.round_duration_s * 2)
    used = int(np.max(np.nonzero(energy_bin)[0]) + 1) if energy_bin.any() else 1
    return SimResult(
        policy=policy_name,
        records=records,
        tokens_done=state["tokens"],
        finished_s=state["finished"],
        deadline_s=cfg.deadline_s,
        rounds=state["rounds"],
        deferrals=state["deferrals"],
        timeline_s=t0 + np.arange(used) * cfg.step_s,
        tokens_per_bin=tokens_bin[:used],
        emissions_g_per_bin=emis_bin[:used],
        energy_wh_per_bin=energy_bin[:used],
    )
