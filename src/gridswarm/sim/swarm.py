"""Simulation of a swarm running one training run under a hub energy policy, on a virtual clock.

The hub's own pure code decides: each round it costs every node (`energy.policy.plan_costs`, the
array form of the `plan_round` the live hub runs), nodes apply their own `NodePolicy` before each
chunk of work (`allows_many`, the array form of `allows`), and homes step PV, household load and
battery with `step_sites` (the array form of `step_site`). Everything is held as arrays over the
nodes, so 10,000 nodes × a simulated week take minutes, not hours.

Time: rounds of `round_duration_s` of training plus `round_overhead_s` of sync (download, upload,
aggregation; no training). The hub plans on the round's wall time and scales each node's speed and
power by the duty cycle (training / wall time), exactly as the live hub does
(`hub.energy.node_state`), so a share of 1 is the work a node does in one round.

Rounds are the hub's: each node's share becomes whole inner steps by the hub's own rule
(`scheduler.inner_steps_many`, the array form of `plan_inner_steps`: the fastest node does
`inner_steps`, nobody fewer than `min_inner_steps`, nothing past the round's deadline), and the
hub's round engine (`hub/engine.py` `step`, ticked when the last upload is in and at the
deadline) closes the round when all are in, or at the deadline with a quorum, or re-plans it
without one (accepted uploads keep their place), and opens the next one. The loop below only
simulates the nodes' work between the engine's events. Nodes work in
chunks cut at `step_s` bin edges; a node its own policy pauses sits out that chunk, and a node
not done when the round closes has spent the energy for nothing (`missed`). Not modelled: nodes
that go silent (liveness), the node's own energy window shrinking its steps, screening and audits.

Forecasts: the hub sees each region's recorded intensity with a seeded relative error that grows
with the square root of lead time (`forecast_error` of the node's `TraceSignal`, sd at 24 h), one
draw per class of alike nodes (as nodes of a region share the hub's signal); local surplus and
availability forecasts are the recorded series and the node's own rules over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from gridswarm.energy.accounting import ContributionEnergy, RunEnergyReport, run_report
from gridswarm.energy.home import Home
from gridswarm.energy.policy import (
    LOCAL_PV_INTENSITY_G_PER_KWH,
    NodeConditions,
    NodePolicy,
    RoundEnergyPlan,
    SwarmCosts,
    cheapest_first,
    emission_rate_g_per_h,
    local_supply_w,
    plan_costs,
    planning_slots,
    slot_emissions_g,
    slot_times,
    step_index,
)
from gridswarm.energy.series import UniformSeries
from gridswarm.energy.signals import SignalProvider
from gridswarm.energy.solar import step_sites
from gridswarm.hub import engine
from gridswarm.hub.engine import Published, RoundSnapshot, RunSnapshot, Screened, Step, Tick
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.rounds import AssignmentState, Decision, RoundRules, Screening
from gridswarm.hub.scheduler import inner_steps_many
from gridswarm.hub.states import AssignmentStatus, RoundStatus


@dataclass
class SimNode:
    node_id: str
    region: str
    tokens_per_s: float
    power_w: float
    signal: SignalProvider
    policy: NodePolicy = field(default_factory=NodePolicy)
    home: Home | None = None


@dataclass(frozen=True)
class SimConfig:
    start_s: float
    deadline_s: float  # absolute unix seconds
    tokens_target: float
    round_duration_s: float = 1800.0  # training time of a full round
    round_overhead_s: float = 60.0  # download, upload, aggregate: no training work
    inner_steps: int = 500  # the fastest node's inner steps in a full round (`train.inner_steps`)
    min_inner_steps: int = 5  # `train.min_inner_steps`: nobody is given fewer
    round_deadline_s: float | None = None  # `round.deadline_s`; None: 2 × round_duration_s
    quorum: int = 1  # `round.quorum`: contributions a round needs to close
    step_s: float = 900.0  # node chunk length, forecast step and timeline bin
    forecast_horizon_s: float = 48 * 3600.0
    margin: float = 0.1
    reserve_rounds: int = 1
    max_overrun_s: float = 7 * 86400.0  # stop this long after the deadline if still unfinished
    forecast_seed: int = 0

    @property
    def wall_s(self) -> float:
        return self.round_duration_s + self.round_overhead_s

    @property
    def duty(self) -> float:
        return self.round_duration_s / self.wall_s

    @property
    def deadline_per_round_s(self) -> float:
        return self.round_deadline_s or 2.0 * self.round_duration_s

    def rules(self, n_nodes: int) -> RoundRules:
        """The hub's round rules for this swarm (the round engine, `engine.step`, applies them)."""
        return RoundRules(
            quorum=self.quorum,
            min_nodes=1,
            max_nodes=n_nodes,
            deadline_s=self.deadline_per_round_s,
            liveness_s=float("inf"),  # simulated nodes never go silent
        )


@dataclass
class SimResult:
    policy: str
    records: list[ContributionEnergy]  # one per node that worked: its totals over the run
    contributions: int  # (node, round) pairs with work
    tokens_done: float
    finished_s: float | None
    deadline_s: float
    rounds: int
    deferrals: int
    replans: int  # rounds re-planned at their deadline without a quorum (`Decision.REPLAN`)
    missed: int  # assignments not finished when their round closed: energy spent, no tokens
    timeline_s: np.ndarray  # bin starts
    tokens_per_bin: np.ndarray
    emissions_g_per_bin: np.ndarray
    energy_wh_per_bin: np.ndarray
    plans: list[RoundEnergyPlan] = field(default_factory=list, repr=False)  # when kept

    @property
    def deadline_met(self) -> bool:
        return self.finished_s is not None and bool(self.finished_s <= self.deadline_s + 1e-6)

    def report(self, agnostic_emissions_g: float | None = None) -> RunEnergyReport:
        return run_report(self.records, agnostic_emissions_g)


def _sample(signal: SignalProvider, times: np.ndarray) -> np.ndarray:
    series = getattr(signal, "series", None)
    if isinstance(series, UniformSeries):
        return series.sample(times)
    return np.array([signal.current(t).intensity_g_per_kwh for t in times.tolist()])


class _Swarm:
    """The nodes as arrays, their recorded series on the bin grid, and the homes' state."""

    def __init__(self, nodes: Sequence[SimNode], cfg: SimConfig) -> None:
        if not nodes:
            raise ValueError("simulate needs at least one node")
        self.cfg = cfg
        self.ids = [n.node_id for n in nodes]
        self.regions = [n.region for n in nodes]
        self.n = len(nodes)
        self.tokens_per_s = np.array([n.tokens_per_s for n in nodes], dtype=float)
        self.power_w = np.array([n.power_w for n in nodes], dtype=float)
        if (self.tokens_per_s <= 0).any() or (self.power_w <= 0).any():
            raise ValueError("every node needs tokens_per_s > 0 and power_w > 0")
        end_s = cfg.deadline_s + cfg.max_overrun_s + cfg.forecast_horizon_s + 2 * cfg.wall_s
        self.n_bins = int(np.ceil((end_s - cfg.start_s) / cfg.step_s)) + 1
        bin_starts = cfg.start_s + np.arange(self.n_bins) * cfg.step_s
        # recorded grid intensity per distinct signal series, node -> row
        rows: dict[int, int] = {}
        grids = []
        self.grid_row = np.zeros(self.n, dtype=int)
        for i, n in enumerate(nodes):
            key = id(getattr(n.signal, "series", n.signal))
            if key not in rows:
                rows[key] = len(grids)
                grids.append(_sample(n.signal, bin_starts))
            self.grid_row[i] = rows[key]
        self.grid_g = np.array(grids)
        self.forecast_error = np.array(
            [getattr(n.signal, "forecast_error", 0.0) for n in nodes], dtype=float
        )
        prices = [n.signal.current(cfg.start_s).price_per_kwh for n in nodes]
        self.price = None if None in prices else np.array(prices, dtype=float)
        classes: dict[tuple, int] = {}
        keys = [
            (
                int(self.grid_row[i]),
                n.power_w,
                self.forecast_error[i],
                id(n.home.pv) if n.home else 0,
                id(n.home.household) if n.home else 0,
            )
            for i, n in enumerate(nodes)
        ]
        self.class_of = np.array([classes.setdefault(key, len(classes)) for key in keys])
        self.class_rep = np.unique(self.class_of, return_index=True)[1]
        # homes: surplus and battery per node (no home: no surplus, no battery)
        self.has_home = np.array([n.home is not None for n in nodes])
        pv = np.zeros((self.n, self.n_bins))
        load = np.zeros((self.n, self.n_bins))
        cache: dict[int, np.ndarray] = {}
        for i, n in enumerate(nodes):
            for series, out in ((n.home and n.home.pv, pv), (n.home and n.home.household, load)):
                if series:
                    if id(series) not in cache:
                        cache[id(series)] = np.maximum(series.power_w(bin_starts), 0.0)
                    out[i] = cache[id(series)]
        self.pv_w, self.load_w = pv, load
        batteries = [n.home.battery if n.home else None for n in nodes]
        self.capacity_wh = np.array([b.capacity_wh if b else 0.0 for b in batteries])
        self.battery_max_w = np.array([b.max_power_w if b else 0.0 for b in batteries])
        self.eta = np.array([b.one_way_efficiency if b else 1.0 for b in batteries])
        self.floor_wh = np.array([b.floor_wh if b else 0.0 for b in batteries])
        self.soc_wh = self.capacity_wh * np.array(
            [n.home.initial_soc_frac if n.home else 0.0 for n in nodes]
        )
        # node policies, grouped so that each distinct policy is evaluated once over arrays
        groups: dict[int, tuple[NodePolicy, list[int]]] = {}
        for i, n in enumerate(nodes):
            if n.policy.rules:
                groups.setdefault(id(n.policy), (n.policy, []))[1].append(i)
        self.policies = [(p, np.array(ix)) for p, ix in groups.values()]

    def bin_of(self, t_s: float) -> int:
        return min(int((t_s - self.cfg.start_s + 1e-6) // self.cfg.step_s), self.n_bins - 1)

    def surplus_w(self, b: int | np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """PV − household load (0 for nodes without a home) in bins `b`."""
        return self.pv_w[rows, b] - self.load_w[rows, b]

    def conditions(
        self, ix: np.ndarray, t_s: np.ndarray, intensity: np.ndarray, surplus: np.ndarray
    ) -> NodeConditions:
        """Conditions of nodes `ix` (arrays broadcast to `t_s`); no home: surplus NaN (unknown)."""
        return NodeConditions(
            now_s=t_s,
            draw_w=self.power_w[ix],
            intensity_g_per_kwh=intensity,
            price_per_kwh=None if self.price is None else self.price[ix],
            surplus_w=np.where(self.has_home[ix], surplus, np.nan),
            battery_soc_wh=self.soc_wh[ix],
            battery_capacity_wh=self.capacity_wh[ix],
            battery_max_power_w=self.battery_max_w[ix],
        )

    def allowed_now(self, t_s: float) -> np.ndarray:
        """Which nodes their own policy lets run at `t_s` (recorded conditions)."""
        ok = np.ones(self.n, dtype=bool)
        b = self.bin_of(t_s)
        for policy, ix in self.policies:
            c = self.conditions(
                ix,
                np.full(len(ix), t_s),
                self.grid_g[self.grid_row[ix], b],
                self.surplus_w(b, ix),
            )
            ok[ix] = policy.allows_many(c)
        return ok

    def work_chunk(self, worked_s: np.ndarray, chunk_s: float, b: int) -> np.ndarray:
        """Step every home through a chunk of bin `b`: `worked_s` at its node's compute draw,
        the rest of the chunk idle. Returns the compute energy met locally (Wh)."""
        compute_w = np.where(worked_s > 0, self.power_w, 0.0)
        local_w = self.advance_homes(worked_s, b, compute_w)
        self.advance_homes(chunk_s - worked_s, b, np.zeros(self.n))
        return local_w * worked_s / 3600.0

    def advance_homes(self, dt_s: float | np.ndarray, b: int, compute_w: np.ndarray) -> np.ndarray:
        """Step every home `dt_s` in bin `b` with its node's compute draw; returns local W."""
        self.soc_wh, local_w = step_sites(
            self.capacity_wh,
            self.battery_max_w,
            self.eta,
            self.floor_wh,
            self.soc_wh,
            self.pv_w[:, b],
            self.load_w[:, b],
            compute_w,
            np.broadcast_to(dt_s, (self.n,)),
        )
        return local_w

    def idle(self, t0_s: float, t1_s: float) -> None:
        """Advance the homes with no compute from `t0_s` to `t1_s` (bin by bin)."""
        zero = np.zeros(self.n)
        for a, b in self.pieces(t0_s, t1_s):
            if self.has_home.any():
                self.advance_homes(b - a, self.bin_of(a), zero)

    def pieces(self, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """[t0, t1) cut at bin edges."""
        out, a = [], t0_s
        while a < t1_s - 1e-6:
            edge = self.cfg.start_s + (self.bin_of(a) + 1) * self.cfg.step_s
            out.append((a, min(edge, t1_s)))
            a = out[-1][1]
        return out

    # ----------------------------------------------------------------------------------------------
    # what the hub sees when it plans

    def costs(self, policy_name: str, now_s: float, deadline_s: float) -> SwarmCosts:
        """Every node costed the way `plan_round` costs a `NodeEnergyState` built by the live
        hub's `node_state` (speed and power × duty over the round's wall time).

        Nodes alike (same grid, draw, home series, forecast error: a *class*) share one forecast,
        as nodes of one region share the hub's signal, so rounds ahead are costed once per class;
        the coming round adds each node's own battery."""
        cfg = self.cfg
        wall, duty = cfg.wall_s, cfg.duty
        slots = planning_slots(policy_name, now_s, deadline_s, wall, cfg.reserve_rounds)
        starts = now_s + np.arange(slots) * wall
        b0 = self.bin_of(now_s)
        k = max(round(cfg.forecast_horizon_s / cfg.step_s), 1)
        point_s = cfg.start_s + (b0 + np.arange(k)) * cfg.step_s
        point_s[0] = now_s
        lead_days = (point_s - now_s) / 86400.0
        sample_ix = step_index(point_s, slot_times(starts, wall).ravel()).reshape(slots, -1)
        cols = k if slots > 1 and self.policies else int(sample_ix.max()) + 1
        bins = np.minimum(b0 + np.arange(cols), self.n_bins - 1)
        rep = self.class_rep  # one node per class
        rng = np.random.default_rng([cfg.forecast_seed, int(now_s // cfg.step_s)])
        noise = rng.standard_normal((len(rep), cols)) * np.sqrt(lead_days[:cols])
        forecast_g = self.grid_g[self.grid_row[rep][:, None], bins[None, :]]
        forecast_g = np.maximum(forecast_g * (1.0 + noise * self.forecast_error[rep, None]), 0.0)
        surplus = self.surplus_w(bins[None, :], rep[:, None])
        power = self.power_w[rep] * duty
        local_g = np.full(len(rep), LOCAL_PV_INTENSITY_G_PER_KWH)
        # g/h at each forecast point (PV surplus, no battery), averaged over each slot's samples
        rate = emission_rate_g_per_h(
            power[:, None], forecast_g, local_supply_w(power[:, None], surplus), local_g[:, None]
        )
        total = rate[:, sample_ix[:, 0]]
        for j in range(1, sample_ix.shape[1]):
            total += rate[:, sample_ix[:, j]]
        emissions = (total / sample_ix.shape[1] * (wall / 3600.0))[self.class_of]
        # the coming round also counts what each node's battery can give
        battery_wh = np.maximum(self.soc_wh - self.floor_wh, 0.0) * self.eta
        emissions[:, 0] = slot_emissions_g(
            self.power_w * duty,
            wall,
            forecast_g[self.class_of][:, sample_ix[:1]],
            surplus[self.class_of][:, sample_ix[:1]],
            battery_wh,
            local_g[self.class_of],
        )[:, 0]
        available = self.allowed_now(now_s)
        slot_ok = np.ones((self.n, slots), dtype=bool)
        slot_ok[:, 0] = available
        if slots > 1:  # the node tells the hub when its own rules will let it run
            start_ix = step_index(point_s, starts)[1:]
            for policy, ix in self.policies:
                c = self.conditions(
                    ix[:, None],
                    np.broadcast_to(point_s[:cols], (len(ix), cols)),
                    forecast_g[self.class_of[ix]],
                    surplus[self.class_of[ix]],
                )
                slot_ok[ix, 1:] = policy.allows_many(c)[:, start_ix]
        return SwarmCosts(
            node_ids=self.ids,
            round_tokens=self.tokens_per_s * duty * wall,
            available=available,
            round_energy_wh=self.power_w * duty * wall / 3600.0,
            slot_emissions_g=emissions,
            slot_available=slot_ok,
        )


def simulate(
    policy_name: str, nodes: Sequence[SimNode], cfg: SimConfig, *, keep_plans: bool = False
) -> SimResult:
    """Run one training run to its token target (or `max_overrun_s` past the deadline)."""
    if cfg.tokens_target <= 0 or cfg.deadline_s <= cfg.start_s:
        raise ValueError("tokens_target must be > 0 and deadline_s after start_s")
    swarm = _Swarm(nodes, cfg)
    n_bins = swarm.n_bins
    tps = swarm.tokens_per_s
    rules = cfg.rules(swarm.n)
    # the run's batch: the fastest node's full round is `inner_steps` steps of it
    tokens_per_step = float(tps.max()) * cfg.round_duration_s / cfg.inner_steps
    reserve_s = 0.1 * rules.deadline_s + 1.0  # as the live hub keeps in hand
    tokens_bin, emis_bin, energy_bin = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    worked_s, energy_wh, local_wh = np.zeros(swarm.n), np.zeros(swarm.n), np.zeros(swarm.n)
    grid_wh, grid_g, tokens_node = np.zeros(swarm.n), np.zeros(swarm.n), np.zeros(swarm.n)
    first_s = np.full(swarm.n, np.nan)
    rounds_worked = np.zeros(swarm.n, dtype=int)
    # the open round's accepted uploads: tokens count once the round closes
    held = np.zeros(swarm.n, dtype=bool)
    pending_bin, pending_node = np.zeros(n_bins), np.zeros(swarm.n)
    plans: list[RoundEnergyPlan] = []
    tokens = 0.0
    rounds = deferrals = replans = missed = 0
    # the round as the hub's round engine sees it (hub/engine.py): it decides every close,
    # re-plan and next round; the loop below only simulates the nodes' work in between
    rnd = RoundSnapshot(
        run=RunSnapshot(RunState.ACTIVE, version=0, tokens_total=0),
        number=0,
        base_version=0,
        status=RoundStatus.PENDING,
        attempt=0,
        deadline_at=None,
    )
    finished: float | None = None
    stop_s = cfg.deadline_s + cfg.max_overrun_s
    now = cfg.start_s
    while tokens < cfg.tokens_target - 1.0 and now < stop_s:
        costs = swarm.costs(policy_name, now, cfg.deadline_s)
        plan = plan_costs(
            policy_name,
            now,
            costs,
            cfg.tokens_target - tokens,
            cfg.deadline_s,
            cfg.wall_s,
            margin=cfg.margin,
            reserve_rounds=cfg.reserve_rounds,
        )
        if keep_plans:
            plans.append(plan)
        share = np.fromiter(plan.shares.values(), dtype=float, count=swarm.n)
        deadline_at = now + rules.deadline_s
        steps = inner_steps_many(
            tps,
            tps.max(),
            tokens_per_step,
            cfg.inner_steps,
            cfg.min_inner_steps,
            deadline_at - now,
            reserve_s,
            share,
        )
        steps[held] = 0  # uploads accepted before a re-plan hold their place
        if plan.defer or not (steps > 0).any():
            deferrals += 1
            until = plan.defer_until_s if plan.defer_until_s else now + cfg.step_s
            later = now + max(until - now, cfg.step_s / 4)
            swarm.idle(now, later)
            now = later
            continue
        assigned = steps > 0
        left = steps * tokens_per_step / tps  # training seconds each node owes this round
        done_at = np.full(swarm.n, np.inf)  # when each node's upload is in
        chunks: list[tuple[int, np.ndarray]] = []  # (bin, seconds each node trained in it)
        for a, b in swarm.pieces(now, deadline_at):
            owing = left > 1e-6
            if not owing.any():
                break
            k = swarm.bin_of(a)
            working = owing & swarm.allowed_now(a)
            w = np.where(working, np.minimum(left, b - a), 0.0)
            local = swarm.work_chunk(w, b - a, k) if swarm.has_home.any() else np.zeros(swarm.n)
            e_wh = swarm.power_w * w / 3600.0
            g_kwh = swarm.grid_g[swarm.grid_row, k]
            chunk_g = ((e_wh - local) * g_kwh + local * LOCAL_PV_INTENSITY_G_PER_KWH) / 1000.0
            chunks.append((k, w))
            emis_bin[k] += float(chunk_g.sum())
            energy_bin[k] += float(e_wh.sum())
            first_s = np.where(np.isnan(first_s) & working, a, first_s)
            worked_s += w
            energy_wh += e_wh
            local_wh += local
            grid_wh += e_wh - local
            grid_g += (e_wh - local) * g_kwh
            left -= w
            done_at = np.where(owing & (left <= 1e-6), a + w, done_at)
        rnd = replace(rnd, status=RoundStatus.OPEN, deadline_at=deadline_at)  # nodes started
        out, close_s = _decide(rnd, assigned, held, done_at, rules, swarm.ids)
        decision = out.decision
        counted = assigned & (done_at <= close_s)  # accepted: a late node's work is lost
        missed += int((assigned & ~counted).sum())
        for k, w in chunks:
            pending_bin[k] += float(tps[counted] @ w[counted])
        pending_node += np.where(counted, steps * tokens_per_step, 0.0)
        held |= counted
        if decision is Decision.REPLAN:  # accepted uploads keep their place; the rest re-planned
            replans += 1
            rnd = out.snapshot
            now = close_s
            continue
        tokens_bin += pending_bin
        tokens_node += pending_node
        tokens += float(pending_node.sum())
        # the new version is "published": the engine closes the round and opens the next (the
        # run's end is the simulator's token target, checked below on its float tokens)
        published = engine.step(
            out.snapshot, rules, Published(rnd.base_version + 1, int(tokens)), close_s
        )
        (opened,) = [e for e in published.effects if isinstance(e, engine.OpenNextRound)]
        rnd = RoundSnapshot(
            run=published.snapshot.run,
            number=opened.number,
            base_version=opened.base_version,
            status=RoundStatus.PENDING,
            attempt=0,
            deadline_at=None,
        )
        rounds_worked += held
        pending_bin[:], pending_node[:], held[:] = 0.0, 0.0, False
        rounds += 1
        round_end = close_s + cfg.round_overhead_s
        swarm.idle(close_s, round_end)
        now = round_end
        if tokens >= cfg.tokens_target - 1.0:
            finished = now
    records = [
        ContributionEnergy(
            node_id=swarm.ids[i],
            region=swarm.regions[i],
            round_index=int(rounds_worked[i]),
            start_s=float(first_s[i]),
            duration_s=float(worked_s[i]),
            tokens=float(tokens_node[i]),
            energy_wh=float(energy_wh[i]),
            intensity_g_per_kwh=float(grid_g[i] / grid_wh[i]) if grid_wh[i] > 0 else 0.0,
            local_energy_wh=float(min(local_wh[i], energy_wh[i])),
            method="model",
        )
        for i in np.nonzero(worked_s > 0)[0]
    ]
    used = int(np.max(np.nonzero(energy_bin)[0]) + 1) if energy_bin.any() else 1
    return SimResult(
        policy=policy_name,
        records=records,
        contributions=int(rounds_worked.sum()),
        tokens_done=tokens,
        finished_s=finished,
        deadline_s=cfg.deadline_s,
        rounds=rounds,
        deferrals=deferrals,
        replans=replans,
        missed=missed,
        timeline_s=cfg.start_s + np.arange(used) * cfg.step_s,
        tokens_per_bin=tokens_bin[:used],
        emissions_g_per_bin=emis_bin[:used],
        energy_wh_per_bin=energy_bin[:used],
        plans=plans,
    )


def _decide(
    rnd: RoundSnapshot,
    assigned: np.ndarray,
    held: np.ndarray,
    done_at: np.ndarray,
    rules: RoundRules,
    ids: Sequence[str],
) -> tuple[Step, float]:
    """When the hub's round engine (`engine.step`) closes or re-plans this round, and its step.

    The round's state only changes when an upload arrives, so the engine is ticked when the
    last one is in and, failing that, at the deadline; a round due to close is screened
    (nothing is rejected: the simulator models no audits) and the step that answers CLOSE is
    returned for the caller to publish. `held`: uploads accepted in an earlier attempt."""
    rows = np.nonzero(assigned | held)[0]
    deadline_at = rnd.deadline_at
    assert deadline_at is not None, "an open round has a deadline"
    last_in = float(np.where(held, -np.inf, done_at)[rows].max())
    for t in (last_in, deadline_at) if last_in <= deadline_at else (deadline_at,):
        submitted = held | (done_at <= t)
        snap = replace(
            rnd,
            assignments=tuple(
                AssignmentState(
                    ids[i],
                    AssignmentStatus.SUBMITTED if submitted[i] else AssignmentStatus.ASSIGNED,
                    t,
                )
                for i in rows.tolist()
            ),
            accepted=int(submitted[rows].sum()),
        )
        out = engine.step(snap, rules, Tick(), t)
        if out.decision is Decision.CLOSE:
            out = engine.step(out.snapshot, rules, Screened(Screening(out.snapshot.accepted, 0)), t)
        if out.decision is not Decision.WAIT:
            return out, t
    raise AssertionError("a round at its deadline is always closed or re-planned")


@dataclass(frozen=True)
class Oracle:
    """The perfect-foresight floor for a run's tokens and deadline (see `oracle`)."""

    emissions_g: float
    energy_wh: float
    tokens: float
    feasible: bool  # the swarm can train the target at all before the deadline
    method: str  # "knapsack" (exact optimum) or "lp" (bound: batteries relaxed)


def oracle(nodes: Sequence[SimNode], cfg: SimConfig) -> Oracle:
    """Least emissions any schedule could reach, knowing the future exactly: which node trains
    in which `step_s` bin before the deadline (space and time), at the same duty cycle as the
    rounds (so the sync overhead is paid alike), ignoring node rules (which only remove choices).

    Without batteries a (node, bin) block's cost per token is fixed (recorded intensity, PV
    surplus met directly), so the problem is a fractional knapsack (an LP with one constraint)
    and taking the cheapest blocks first is its exact optimum. With batteries, an LP (HiGHS)
    where each home may also spend, at any time and without power limit, a battery budget of its
    starting charge plus all its PV surplus (after losses): a relaxation of what a battery can
    do, so the answer is a floor no schedule can beat, not necessarily a reachable one."""
    swarm = _Swarm(nodes, cfg)
    n_bins = int((cfg.deadline_s - cfg.start_s) // cfg.step_s)
    run_s = cfg.step_s * cfg.duty  # training seconds per bin at the rounds' duty cycle
    power = swarm.power_w[:, None]
    surplus = swarm.surplus_w(np.arange(n_bins))
    direct_w = local_supply_w(power, surplus)
    grid = swarm.grid_g[swarm.grid_row][:, :n_bins]
    rate = emission_rate_g_per_h(power, grid, direct_w, LOCAL_PV_INTENSITY_G_PER_KWH)
    cap = np.broadcast_to(swarm.tokens_per_s[:, None] * run_s, rate.shape)
    block_g = rate * run_s / 3600.0
    energy_wh = np.broadcast_to(power * run_s / 3600.0, rate.shape)
    tokens = min(cfg.tokens_target, float(cap.sum()))
    feasible = bool(cap.sum() >= cfg.tokens_target)
    homes = np.nonzero(swarm.capacity_wh > 0)[0]
    if len(homes) == 0:
        share = cheapest_first(block_g / cap, cap, tokens) / cap
        return Oracle(
            float((share * block_g).sum()),
            float((share * energy_wh).sum()),
            tokens,
            feasible,
            "knapsack",
        )
    share, emissions = _battery_lp(swarm, homes, block_g, cap, energy_wh, direct_w, grid, tokens)
    return Oracle(emissions, float((share * energy_wh).sum()), tokens, feasible, "lp")


def _battery_lp(swarm, homes, block_g, cap, energy_wh, direct_w, grid, tokens):
    """min Σ block_g·x + Σ (local − grid g/Wh)·y  s.t.  Σ cap·x = tokens, y ≤ grid part of the
    block × x, Σ_b y ≤ battery budget per home; 0 ≤ x ≤ 1, y ≥ 0 (x: share of a (node, bin)
    block; y: battery Wh spent there)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, csr_matrix, hstack, vstack

    n, b = block_g.shape
    run_s = swarm.cfg.step_s * swarm.cfg.duty
    nx, ny = n * b, len(homes) * b
    grid_wh = energy_wh[homes] - direct_w[homes] * run_s / 3600.0  # per full block
    cost_y = (LOCAL_PV_INTENSITY_G_PER_KWH - grid[homes]) / 1000.0  # g per battery Wh
    budget = (np.maximum(swarm.soc_wh - swarm.floor_wh, 0.0) * swarm.eta)[homes] + swarm.eta[
        homes
    ] * np.maximum(swarm.surplus_w(np.arange(b), homes[:, None]), 0.0).sum(axis=1) * (
        swarm.cfg.step_s / 3600.0
    )
    y_ix = np.arange(ny)
    x_of_y = (homes[:, None] * b + np.arange(b)[None, :]).ravel()
    link = hstack(
        [
            coo_matrix((-grid_wh.ravel(), (y_ix, x_of_y)), shape=(ny, nx)),
            coo_matrix((np.ones(ny), (y_ix, y_ix)), shape=(ny, ny)),
        ]
    )
    per_home = hstack(
        [
            csr_matrix((len(homes), nx)),
            coo_matrix((np.ones(ny), (y_ix // b, y_ix)), shape=(len(homes), ny)),
        ]
    )
    res = linprog(
        np.concatenate([block_g.ravel(), cost_y.ravel()]),
        A_ub=vstack([link, per_home]).tocsr(),
        b_ub=np.concatenate([np.zeros(ny), budget]),
        A_eq=csr_matrix(np.concatenate([cap.ravel(), np.zeros(ny)])[None, :]),
        b_eq=[tokens],
        bounds=[(0.0, 1.0)] * nx + [(0.0, None)] * ny,
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"oracle LP failed: {res.message}")
    return res.x[:nx].reshape(n, b), float(res.fun)
