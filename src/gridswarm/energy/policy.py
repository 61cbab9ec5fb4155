"""When may a node run, and which nodes should run how much? Pure decision logic.

Node side: `NodePolicy` is a conjunction of rules (intensity below X, local surplus plus battery
above a floor covers the draw, price below Y, inside time windows), parsed from the node's TOML
`[energy.policy]` table by `parse_node_policy`. `NodePolicy.evaluate(NodeConditions)` says whether
the node may run now, and why not.

Hub side: `plan_round(policy_name, now_s, nodes, tokens_remaining, deadline_s, round_duration_s)`
returns a `RoundEnergyPlan`: a work share in [0, 1] of the round per node, or a deferral.

- `agnostic`: every available node runs the whole round (the baseline).
- `greedy-green`: only the current round is considered; the nodes with the lowest emissions per
  token now run, just enough to keep the pace the deadline needs (plus a margin).
- `forecast`: all remaining rounds up to the deadline are planned at once from the forecasts.
  Each (node, future round) pair is a block of tokens with a cost in gCO2e per token (power × grid
  share × intensity / throughput); the cheapest blocks are taken until the token target is met —
  the optimum of this fractional knapsack. This round's blocks become the shares; when none is in
  this round, the round is deferred to the first round that has one. Future capacity is discounted
  by a margin so the deadline survives forecast error and churn; it is re-planned every round.

No I/O and no clock reads: time comes in as `now_s`.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gridswarm.plugins import Registry
from gridswarm.protocol import describe_errors

LOCAL_PV_INTENSITY_G_PER_KWH = 41.0  # IPCC AR5 lifecycle median, rooftop PV (same basis as traces)

# --------------------------------------------------------------------------------------------------
# node side


@dataclass(frozen=True)
class NodeConditions:
    """What a node knows about itself at `now_s` (all optional signals may be unknown: None)."""

    now_s: float
    draw_w: float  # power the training would draw
    intensity_g_per_kwh: float | None = None
    price_per_kwh: float | None = None
    surplus_w: float | None = None  # PV − household load, before the compute draw
    battery_soc_wh: float = 0.0
    battery_capacity_wh: float = 0.0
    battery_max_power_w: float = 0.0


@dataclass(frozen=True)
class NodeDecision:
    allowed: bool
    reasons: tuple[str, ...]  # one line per rule that refused (empty when allowed)


class NodeRule(ABC):
    field: str

    @abstractmethod
    def refuses(self, c: NodeConditions) -> str | None:
        """None when the rule allows running, else why not."""

    @abstractmethod
    def allows_many(self, c: NodeConditions) -> np.ndarray:
        """The same rule over conditions whose fields are arrays (one entry per node or time):
        True where `refuses` would return None. The simulator asks this for thousands at once."""


@dataclass(frozen=True)
class IntensityBelow(NodeRule):
    max_g_per_kwh: float
    field: str = "max_intensity_g_per_kwh"

    def refuses(self, c: NodeConditions) -> str | None:
        if c.intensity_g_per_kwh is None:
            return "no carbon-intensity signal"
        if c.intensity_g_per_kwh >= self.max_g_per_kwh:
            return f"intensity {c.intensity_g_per_kwh:.0f} >= {self.max_g_per_kwh:.0f} g/kWh"
        return None

    def allows_many(self, c: NodeConditions) -> np.ndarray:
        if c.intensity_g_per_kwh is None:
            return np.zeros(np.shape(c.now_s), dtype=bool)
        return np.asarray(c.intensity_g_per_kwh) < self.max_g_per_kwh


@dataclass(frozen=True)
class PriceBelow(NodeRule):
    max_price_per_kwh: float
    field: str = "max_price_per_kwh"

    def refuses(self, c: NodeConditions) -> str | None:
        if c.price_per_kwh is None:
            return "no price signal"
        if c.price_per_kwh >= self.max_price_per_kwh:
            return f"price {c.price_per_kwh:.3f} >= {self.max_price_per_kwh:.3f} per kWh"
        return None

    def allows_many(self, c: NodeConditions) -> np.ndarray:
        if c.price_per_kwh is None:
            return np.zeros(np.shape(c.now_s), dtype=bool)
        return np.broadcast_to(
            np.asarray(c.price_per_kwh) < self.max_price_per_kwh, np.shape(c.now_s)
        )


@dataclass(frozen=True)
class SurplusCovers(NodeRule):
    """PV surplus plus what the battery can give above `battery_floor_frac` for `horizon_s`
    covers at least `min_cover` of the draw."""

    battery_floor_frac: float = 0.2
    min_cover: float = 1.0
    horizon_s: float = 900.0
    field: str = "require_surplus"

    def battery_w(self, c: NodeConditions) -> float:
        usable_wh = np.maximum(
            c.battery_soc_wh - self.battery_floor_frac * c.battery_capacity_wh, 0.0
        )
        return np.minimum(c.battery_max_power_w, usable_wh * 3600.0 / self.horizon_s)

    def refuses(self, c: NodeConditions) -> str | None:
        if c.surplus_w is None:
            return "no local generation data"
        local_w = max(c.surplus_w, 0.0) + self.battery_w(c)
        if local_w < self.min_cover * c.draw_w:
            return f"local supply {local_w:.0f} W < {self.min_cover:.0%} of draw {c.draw_w:.0f} W"
        return None

    def allows_many(self, c: NodeConditions) -> np.ndarray:
        if c.surplus_w is None:
            return np.zeros(np.shape(c.now_s), dtype=bool)
        local_w = np.maximum(c.surplus_w, 0.0) + self.battery_w(c)
        return np.broadcast_to(local_w >= self.min_cover * np.asarray(c.draw_w), np.shape(c.now_s))


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Window:
    """Daily window [start_min, end_min) in local minutes on the given weekdays (0 = Monday);
    end < start wraps past midnight (the part after midnight belongs to the start day)."""

    start_min: int
    end_min: int
    days: frozenset[int] = frozenset(range(7))

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start_min <= self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        if minute >= self.start_min:
            return day in self.days
        return (day - 1) % 7 in self.days and minute < self.end_min


@dataclass(frozen=True)
class TimeWindows(NodeRule):
    windows: tuple[Window, ...]
    tz: tzinfo = UTC
    field: str = "windows"

    def refuses(self, c: NodeConditions) -> str | None:
        local = datetime.fromtimestamp(c.now_s, self.tz)
        if any(w.contains(local) for w in self.windows):
            return None
        return f"outside time windows ({local:%a %H:%M} {self.tz})"

    def allows_many(self, c: NodeConditions) -> np.ndarray:
        times, inverse = np.unique(np.asarray(c.now_s, dtype=float), return_inverse=True)
        inside = np.array(
            [
                any(w.contains(local) for w in self.windows)
                for local in (datetime.fromtimestamp(t, self.tz) for t in times.tolist())
            ],
            dtype=bool,
        )
        return inside[inverse].reshape(np.shape(c.now_s))


@dataclass(frozen=True)
class NodePolicy:
    """All rules must allow. No rules: always allowed."""

    rules: tuple[NodeRule, ...] = ()

    def evaluate(self, c: NodeConditions) -> NodeDecision:
        reasons = tuple(r for r in (rule.refuses(c) for rule in self.rules) if r is not None)
        return NodeDecision(not reasons, reasons)

    def allows(self, c: NodeConditions) -> bool:
        return self.evaluate(c).allowed

    def allows_many(self, c: NodeConditions) -> np.ndarray:
        """`allows` over array conditions (see `NodeRule.allows_many`)."""
        ok = np.ones(np.shape(c.now_s), dtype=bool)
        for rule in self.rules:
            ok &= rule.allows_many(c)
        return ok


WindowText = Annotated[str, Field(min_length=1, max_length=64)]


class NodePolicyTable(BaseModel):
    """`[energy.policy]`: the fields, bounded and finite; `parse_node_policy` adds the rules
    between them and builds the policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    max_intensity_g_per_kwh: Annotated[float, Field(ge=0, le=1e5)] | None = None
    max_price_per_kwh: Annotated[float, Field(ge=0, le=1e6)] | None = None
    require_surplus: bool = False
    battery_floor_frac: Annotated[float, Field(ge=0, le=1)] | None = None
    min_surplus_cover: Annotated[float, Field(ge=0, le=1)] | None = None
    windows: WindowText | Annotated[list[WindowText], Field(min_length=1, max_length=64)] | None = (
        None
    )
    timezone: Annotated[str, Field(max_length=64)] | None = None


def parse_window(text: str) -> Window:
    """'22:00-06:00', 'mon-fri 09:00-17:00' or 'sat,sun 00:00-24:00'."""
    m = re.fullmatch(r"\s*(?:([a-z,\-]+)\s+)?(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not m:
        raise ValueError(
            f"energy.policy.windows: cannot parse {text!r}; "
            "expected 'HH:MM-HH:MM' with optional days, e.g. 'mon-fri 09:00-17:00'"
        )
    day_spec, h0, m0, h1, m1 = m.groups()
    start, end = int(h0) * 60 + int(m0), int(h1) * 60 + int(m1)
    if start > 24 * 60 or end > 24 * 60 or int(m0) > 59 or int(m1) > 59:
        raise ValueError(f"energy.policy.windows: time out of range in {text!r}")
    days: set[int] = set()
    for part in (day_spec or "mon-sun").split(","):
        ends = part.split("-")
        if not all(e in DAYS for e in ends) or len(ends) > 2:
            raise ValueError(f"energy.policy.windows: unknown day(s) {part!r} in {text!r}")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return Window(start, end, frozenset(days))


def parse_node_policy(cfg: Mapping[str, Any] | None) -> NodePolicy:
    """Build a NodePolicy from the `[energy.policy]` table, e.g.
    `{max_intensity_g_per_kwh = 250, require_surplus = true, battery_floor_frac = 0.3,
      max_price_per_kwh = 0.30, windows = ["22:00-07:00", "sat,sun 00:00-24:00"],
      timezone = "Europe/Berlin"}`. Raises ValueError naming the offending field."""
    if cfg is None:
        return NodePolicy()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"energy.policy: expected a table, got {type(cfg).__name__}")
    try:
        table = NodePolicyTable.model_validate(dict(cfg))
    except ValidationError as exc:
        errors = [{**e, "loc": ("energy", "policy", *e["loc"])} for e in exc.errors()]
        raise ValueError(describe_errors(errors)) from exc
    rules: list[NodeRule] = []
    if table.max_intensity_g_per_kwh is not None:
        rules.append(IntensityBelow(table.max_intensity_g_per_kwh))
    for dependent in ("battery_floor_frac", "min_surplus_cover"):
        if getattr(table, dependent) is not None and not table.require_surplus:
            raise ValueError(f"energy.policy.{dependent}: only meaningful with require_surplus")
    if table.require_surplus:
        floor = table.battery_floor_frac if table.battery_floor_frac is not None else 0.2
        cover = table.min_surplus_cover if table.min_surplus_cover is not None else 1.0
        rules.append(SurplusCovers(battery_floor_frac=floor, min_cover=cover))
    if table.max_price_per_kwh is not None:
        rules.append(PriceBelow(table.max_price_per_kwh))
    tz: tzinfo = UTC
    if table.timezone is not None:
        if table.windows is None:
            raise ValueError("energy.policy.timezone: only meaningful with windows")
        try:
            tz = ZoneInfo(table.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"energy.policy.timezone: unknown zone {table.timezone!r}") from exc
    if table.windows is not None:
        windows = [table.windows] if isinstance(table.windows, str) else table.windows
        rules.append(TimeWindows(tuple(parse_window(w) for w in windows), tz))
    return NodePolicy(tuple(rules))


# --------------------------------------------------------------------------------------------------
# hub side


@dataclass(frozen=True)
class NodeEnergyState:
    """What the hub knows about a node when it plans a round."""

    node_id: str
    region: str
    tokens_per_s: float
    power_w: float
    available: bool = True
    intensity_forecast: Sequence[tuple[float, float]] = ()  # (unix_s, g/kWh), step-wise
    surplus_forecast_w: Sequence[tuple[float, float]] | None = None  # (unix_s, PV − household W)
    availability_forecast: Sequence[tuple[float, bool]] | None = None  # None: available ahead
    battery_available_wh: float = 0.0  # above the node's floor, usable this round
    local_intensity_g_per_kwh: float = LOCAL_PV_INTENSITY_G_PER_KWH


@dataclass(frozen=True)
class RoundEnergyPlan:
    """The hub's energy decision for one round."""

    policy: str
    shares: dict[str, float]  # node_id -> share of the round in [0, 1]; 0 = sits this one out
    defer: bool = False
    defer_until_s: float | None = None
    expected_tokens: float = 0.0
    expected_energy_wh: float = 0.0
    expected_emissions_g: float = 0.0
    deadline_at_risk: bool = False
    reason: str = ""
    planned_tokens_by_round: tuple[float, ...] = field(default=(), repr=False)  # forecast only
    planned_emissions_g: float | None = None  # forecast only: emissions of the whole plan


MIN_SHARE = 1e-12  # smaller shares are float dust, not work


def step_index(point_times_s: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the step of a forecast (sorted `point_times_s`) in force at each of `times`.
    Before the first point: the first step. Past the last point: diurnal persistence (the step
    24 h, 48 h, ... earlier inside the forecast), or the last step when it spans less than a day."""
    t = np.asarray(point_times_s, dtype=float)
    times = np.asarray(times, dtype=float)
    last = t[-1] + (t[-1] - t[-2] if len(t) > 1 else 0.0)  # end of the last step
    if last - t[0] >= 86400.0:
        beyond = times >= last
        days_back = np.ceil((times[beyond] - last + 1e-9) / 86400.0)
        times = times.copy()
        times[beyond] -= days_back * 86400.0
    return np.clip(np.searchsorted(t, times, side="right") - 1, 0, len(t) - 1)


def step_values(points: Sequence[tuple[float, float]], times: np.ndarray) -> np.ndarray:
    """Step-wise lookup of a forecast at `times` (see `step_index`)."""
    if len(points) == 0:
        raise ValueError("empty forecast")
    t = np.array([p[0] for p in points], dtype=float)
    v = np.array([p[1] for p in points], dtype=float)
    order = np.argsort(t, kind="stable")
    return v[order][step_index(t[order], times)]


SLOT_SAMPLES = 4  # forecast samples per round when costing it


def slot_times(starts: np.ndarray, round_s: float) -> np.ndarray:
    """(slots, SLOT_SAMPLES) sample times inside rounds starting at `starts`."""
    offsets = (np.arange(SLOT_SAMPLES) + 0.5) / SLOT_SAMPLES * round_s
    return np.asarray(starts, dtype=float)[:, None] + offsets[None, :]


def emission_rate_g_per_h(
    power_w: np.ndarray,
    intensity: np.ndarray,
    local_w: np.ndarray,
    local_intensity_g_per_kwh: np.ndarray,
) -> np.ndarray:
    """g/h of a node drawing `power_w`, `local_w` of it met locally, the rest from a grid at
    `intensity` (arrays broadcast)."""
    return ((power_w - local_w) * intensity + local_w * local_intensity_g_per_kwh) / 1000.0


def local_supply_w(power_w: np.ndarray, surplus_w: np.ndarray | None) -> np.ndarray | float:
    """Part of the draw PV surplus can meet (0 when unknown)."""
    if surplus_w is None:
        return 0.0
    return np.minimum(np.maximum(surplus_w, 0.0), power_w)


def slot_emissions_g(
    power_w: np.ndarray,
    round_s: float,
    intensity: np.ndarray,
    surplus_w: np.ndarray | None,
    battery_available_wh: np.ndarray,
    local_intensity_g_per_kwh: np.ndarray,
) -> np.ndarray:
    """Emissions (g) of nodes running a full round in each slot: arrays are per node (N), and
    (N, slots, SLOT_SAMPLES) for the grid intensity and the PV surplus at the sample times
    (None: no surplus). The battery is known only for the coming round (slot 0)."""
    power = np.asarray(power_w, dtype=float)[:, None, None]
    local_w = np.broadcast_to(local_supply_w(power, surplus_w), intensity.shape).copy()
    battery_w = np.minimum(np.asarray(battery_available_wh) * 3600.0 / round_s, power[:, 0, 0])
    local_w[:, 0] = np.minimum(local_w[:, 0] + battery_w[:, None], power[:, 0])
    local_g = np.asarray(local_intensity_g_per_kwh, dtype=float)[:, None, None]
    rate = emission_rate_g_per_h(power, intensity, local_w, local_g)
    return rate.mean(axis=2) * (round_s / 3600.0)


def _slot_costs(
    node: NodeEnergyState, starts: np.ndarray, round_s: float
) -> tuple[float, np.ndarray]:
    """(energy_wh, emissions_g per slot) if `node` ran a full round from each of `starts`."""
    if not node.intensity_forecast:
        raise ValueError(f"node {node.node_id}: intensity_forecast is empty")
    times = slot_times(starts, round_s)
    intensity = step_values(node.intensity_forecast, times.ravel()).reshape(times.shape)
    surplus = None
    if node.surplus_forecast_w:
        surplus = step_values(node.surplus_forecast_w, times.ravel()).reshape(times.shape)[None]
    g = slot_emissions_g(
        np.array([node.power_w]),
        round_s,
        intensity[None],
        surplus,
        np.array([node.battery_available_wh]),
        np.array([node.local_intensity_g_per_kwh]),
    )
    return node.power_w * round_s / 3600.0, g[0]


def _available_mask(node: NodeEnergyState, starts: np.ndarray) -> np.ndarray:
    mask = np.ones(len(starts), dtype=bool)
    if node.availability_forecast:
        pts = [(t, 1.0 if a else 0.0) for t, a in node.availability_forecast]
        mask = step_values(pts, starts) > 0.5
    mask[0] = node.available
    return mask


def _validate(
    policy_name: str,
    nodes: Sequence[NodeEnergyState],
    tokens_remaining: float,
    round_duration_s: float,
) -> None:
    HUB_POLICIES.get(policy_name)  # UnknownPlugin (a ValueError) lists the known ones
    if round_duration_s <= 0:
        raise ValueError(f"round_duration_s must be > 0, got {round_duration_s}")
    if tokens_remaining < 0 or math.isnan(tokens_remaining):
        raise ValueError(f"tokens_remaining must be >= 0, got {tokens_remaining}")
    seen = set()
    for n in nodes:
        if n.node_id in seen:
            raise ValueError(f"duplicate node_id {n.node_id!r}")
        seen.add(n.node_id)
        if n.tokens_per_s <= 0 or n.power_w <= 0:
            raise ValueError(f"node {n.node_id}: tokens_per_s and power_w must be > 0")


def planning_slots(
    policy_name: str, now_s: float, deadline_s: float, round_s: float, reserve_rounds: int = 1
) -> int:
    """How many rounds ahead `plan_costs` needs costed: every round to the deadline (less the
    reserve) for `forecast`, only this one for the others."""
    if not HUB_POLICIES.get(policy_name).looks_ahead:
        return 1
    return max(int((deadline_s - now_s) // round_s) - reserve_rounds, 1)


@dataclass(frozen=True)
class SwarmCosts:
    """What `plan_costs` needs of every node, as arrays over nodes (N) and slots: round k starts
    at now + k × round duration. Built from `NodeEnergyState`s by `swarm_costs`, or directly by
    the simulator for thousands of nodes at once."""

    node_ids: Sequence[str]
    round_tokens: np.ndarray  # (N,) tokens in a full round
    available: np.ndarray  # (N,) bool: may run now
    round_energy_wh: np.ndarray  # (N,) energy of a full round
    slot_emissions_g: np.ndarray  # (N, slots) emissions of a full round in slot k
    slot_available: np.ndarray  # (N, slots) bool; slot 0 equals `available`


def swarm_costs(
    nodes: Sequence[NodeEnergyState], now_s: float, round_s: float, slots: int
) -> SwarmCosts:
    """Cost every node over `slots` rounds from its own forecasts."""
    starts = now_s + np.arange(slots) * round_s
    emissions = np.zeros((len(nodes), slots))
    mask = np.zeros((len(nodes), slots), dtype=bool)
    for i, n in enumerate(nodes):
        mask[i] = _available_mask(n, starts)
        if mask[i].any():
            emissions[i] = _slot_costs(n, starts, round_s)[1]
    return SwarmCosts(
        node_ids=[n.node_id for n in nodes],
        round_tokens=np.array([n.tokens_per_s * round_s for n in nodes], dtype=float),
        available=np.array([n.available for n in nodes], dtype=bool),
        round_energy_wh=np.array([n.power_w * round_s / 3600.0 for n in nodes], dtype=float),
        slot_emissions_g=emissions,
        slot_available=mask,
    )


def plan_round(
    policy_name: str,
    now_s: float,
    nodes: Sequence[NodeEnergyState],
    tokens_remaining: float,
    deadline_s: float,
    round_duration_s: float,
    *,
    margin: float = 0.1,
    reserve_rounds: int = 1,
) -> RoundEnergyPlan:
    """Decide this round's work shares (see the module docstring for the three policies).

    `margin` (0.1) is the spare pace greedy-green keeps and the discount forecast applies to
    future capacity; both plan to finish `reserve_rounds` (1) before the deadline, so a node that
    pauses or drops out leaves time to catch up.
    Inner steps per node = share × tokens_per_s × round_duration_s / tokens_per_step.
    """
    _validate(policy_name, nodes, tokens_remaining, round_duration_s)
    if reserve_rounds < 0:
        raise ValueError(f"reserve_rounds must be >= 0, got {reserve_rounds}")
    slots = planning_slots(policy_name, now_s, deadline_s, round_duration_s, reserve_rounds)
    live = tokens_remaining > 0 and any(n.available for n in nodes)
    costs = swarm_costs(nodes if live else (), now_s, round_duration_s, slots)
    if not live:
        costs = replace(costs, node_ids=[n.node_id for n in nodes])
    return plan_costs(
        policy_name,
        now_s,
        costs,
        tokens_remaining,
        deadline_s,
        round_duration_s,
        margin=margin,
        reserve_rounds=reserve_rounds,
    )


BAND_MIN_BLOCKS = 200_000  # above this, sort only the blocks near the cut (same result, faster)


def cheapest_first(cost: np.ndarray, cap: np.ndarray, tokens: float) -> np.ndarray:
    """Tokens taken from each (node, round) block, arrays (N, rounds), when blocks are taken
    cheapest first (ties: earlier round, then lower node index) until `tokens`: the optimum of
    the fractional knapsack. Blocks with `cap` 0 do not exist.

    For many blocks only those whose cost is near the cut are sorted: every block cheaper than
    the band is taken whole and none dearer, which is exactly what the full sort would do."""
    shape, rounds = cost.shape, cost.shape[1]
    cost, cap = cost.ravel(), cap.ravel()
    take = np.zeros(len(cost))
    band = cap > 0
    if len(cost) > BAND_MIN_BLOCKS:
        stride = len(cost) // 50_000
        sample = np.nonzero(band[::stride])[0] * stride
        order = np.argsort(cost[sample])
        reach = np.cumsum(cap[sample][order]) * stride  # tokens below each sampled cost
        q = int(np.searchsorted(reach, tokens))
        lo = cost[sample][order][q - 500] if q > 500 else -np.inf
        hi = cost[sample][order][q + 500] if q + 500 < len(order) else np.inf
        below = band & (cost < lo)
        candidate = band & (cost <= hi)
        if cap[below].sum() <= tokens <= cap[candidate].sum():
            take[below] = cap[below]
            tokens -= float(cap[below].sum())
            band = candidate & ~below
    ix = np.nonzero(band)[0]  # flat index = node × rounds + round
    order = ix[np.lexsort((ix // rounds, ix % rounds, cost[ix]))]
    before = np.cumsum(cap[order]) - cap[order]
    take[order] = np.clip(tokens - before, 0.0, cap[order])
    return take.reshape(shape)


def plan_costs(
    policy_name: str,
    now_s: float,
    costs: SwarmCosts,
    tokens_remaining: float,
    deadline_s: float,
    round_duration_s: float,
    *,
    margin: float = 0.1,
    reserve_rounds: int = 1,
) -> RoundEnergyPlan:
    """`plan_round` over costed nodes (see `SwarmCosts`); the simulator calls it directly."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    ids = list(costs.node_ids)
    zero = dict.fromkeys(ids, 0.0)
    if tokens_remaining <= 0:
        return RoundEnergyPlan(policy_name, zero, reason="token target reached")
    available = np.asarray(costs.available, dtype=bool)
    if not available.any():
        return RoundEnergyPlan(
            policy_name,
            zero,
            defer=True,
            defer_until_s=now_s + round_duration_s,
            deadline_at_risk=now_s + round_duration_s > deadline_s,
            reason="no node available",
        )
    rounds_to_deadline = int((deadline_s - now_s) // round_duration_s)
    rounds_left = max(rounds_to_deadline - reserve_rounds, 1)
    inputs = PlanInputs(
        now_s=now_s,
        costs=costs,
        tokens_remaining=tokens_remaining,
        round_duration_s=round_duration_s,
        rounds_to_deadline=rounds_to_deadline,
        rounds_left=rounds_left,
        margin=margin,
    )
    decision = HUB_POLICIES.get(policy_name)().decide(inputs)
    shares = np.where(decision.shares > MIN_SHARE, decision.shares, 0.0)
    g_now = costs.slot_emissions_g[:, 0]
    return RoundEnergyPlan(
        policy_name,
        dict(zip(ids, shares.tolist(), strict=True)),
        defer=decision.defer_until_s is not None,
        defer_until_s=decision.defer_until_s,
        expected_tokens=float(shares @ inputs.round_tokens),
        expected_energy_wh=float(shares @ costs.round_energy_wh),
        expected_emissions_g=float(shares[available] @ g_now[available]),
        deadline_at_risk=decision.deadline_at_risk,
        reason=decision.reason,
        planned_tokens_by_round=tuple(float(x) for x in decision.planned_tokens_by_round),
        planned_emissions_g=decision.plan_g,
    )


@dataclass(frozen=True)
class PlanInputs:
    """What a hub energy policy decides from: every node costed (`SwarmCosts`), the tokens still
    to train and the rounds left before the deadline (less the reserve). At least one node is
    available and tokens remain (`plan_costs` answers the other cases itself)."""

    now_s: float
    costs: SwarmCosts
    tokens_remaining: float
    round_duration_s: float
    rounds_to_deadline: int
    rounds_left: int
    margin: float  # spare pace to keep, and the discount on future capacity

    @property
    def available(self) -> np.ndarray:
        return np.asarray(self.costs.available, dtype=bool)

    @property
    def round_tokens(self) -> np.ndarray:
        return np.asarray(self.costs.round_tokens, dtype=float)

    @property
    def everyone(self) -> np.ndarray:
        """Shares with every available node running the whole round."""
        return self.available.astype(float)


@dataclass(frozen=True)
class PolicyDecision:
    """A policy's answer: a share of the round per node (aligned with `costs.node_ids`)."""

    shares: np.ndarray
    reason: str
    deadline_at_risk: bool = False
    planned_tokens_by_round: Sequence[float] = ()
    plan_g: float | None = None  # emissions of the whole plan, when it plans ahead
    defer_until_s: float | None = None  # no work now: the round waits until then


class HubEnergyPolicy(ABC):
    """How the hub spreads a run's tokens over nodes and time. Register one under
    `gridswarm.energy_policies` (see gridswarm.plugins) to use it as `[energy] policy = "name"`."""

    name: ClassVar[str]
    looks_ahead: ClassVar[bool] = False  # costs every round to the deadline, not only this one
    needs_token_target: ClassVar[bool] = True  # spreads `budget.tokens` over `deadline_s`

    @abstractmethod
    def decide(self, p: PlanInputs) -> PolicyDecision:
        """This round's shares from the costed swarm."""


class Agnostic(HubEnergyPolicy):
    """Every available node runs the whole round: the baseline."""

    name = "agnostic"
    needs_token_target = False

    def decide(self, p: PlanInputs) -> PolicyDecision:
        capacity_now = float(p.round_tokens[p.available].sum())
        at_risk = capacity_now * max(p.rounds_to_deadline, 0) < p.tokens_remaining
        return PolicyDecision(p.everyone, "all available nodes, full round", at_risk)


class GreedyGreen(HubEnergyPolicy):
    """The nodes with the lowest emissions per token now, just enough to keep the pace."""

    name = "greedy-green"

    def decide(self, p: PlanInputs) -> PolicyDecision:
        cap, available, ids = p.round_tokens, p.available, list(p.costs.node_ids)
        need = min(p.tokens_remaining, p.tokens_remaining / p.rounds_left * (1 + p.margin))
        if float(cap[available].sum()) * p.rounds_left < p.tokens_remaining:
            return PolicyDecision(p.everyone, "behind pace: all nodes", True)
        g_now = p.costs.slot_emissions_g[:, 0]
        ix = np.nonzero(available)[0]
        id_rank = np.argsort(np.argsort(np.array([ids[i] for i in ix]), kind="stable"))
        order = ix[np.lexsort((id_rank, g_now[ix] / cap[ix]))]
        before = np.cumsum(cap[order]) - cap[order]
        shares = np.zeros(len(ids))
        shares[order] = np.minimum(1.0, np.maximum(need - before, 0.0) / cap[order])
        return PolicyDecision(shares, f"cleanest nodes now for pace over {p.rounds_left} round(s)")


class Forecast(HubEnergyPolicy):
    """Every (node, round) block up to the deadline, cheapest first (a fractional knapsack)."""

    name = "forecast"
    looks_ahead = True

    def decide(self, p: PlanInputs) -> PolicyDecision:
        costs, cap, rounds_left = p.costs, p.round_tokens, p.rounds_left
        slots = costs.slot_emissions_g.shape[1]
        if slots < rounds_left:
            raise ValueError(f"forecast needs {rounds_left} costed slots, got {slots}")
        block_cap = np.where(costs.slot_available[:, :rounds_left], cap[:, None], 0.0)
        block_cap[:, 1:] *= 1.0 - p.margin
        if block_cap.sum() < p.tokens_remaining:
            return PolicyDecision(p.everyone, "forecast capacity short of target: all", True)
        block_cost = costs.slot_emissions_g[:, :rounds_left] / cap[:, None]
        take = cheapest_first(block_cost, block_cap, p.tokens_remaining)
        planned = take.sum(axis=0)
        taken = take > 0
        plan_g = float(block_cost[taken] @ take[taken])
        now_blocks = take[:, 0] > MIN_SHARE * block_cap[:, 0]
        shares = np.where(now_blocks, take[:, 0] / cap, 0.0)
        if not now_blocks.any():
            first = int(np.nonzero(planned > 0)[0][0])
            return PolicyDecision(
                shares,
                f"cleaner energy in {first} round(s): defer",
                planned_tokens_by_round=planned,
                plan_g=plan_g,
                defer_until_s=p.now_s + first * p.round_duration_s,
            )
        return PolicyDecision(
            shares,
            f"cheapest blocks over {rounds_left} round(s) to the deadline",
            planned_tokens_by_round=planned,
            plan_g=plan_g,
        )


# name -> policy class; plugins add theirs through the `gridswarm.energy_policies` entry points
HUB_POLICIES: Registry[type[HubEnergyPolicy]] = Registry(
    "gridswarm.energy_policies", "hub energy policy"
)
for _policy in (Agnostic, GreedyGreen, Forecast):
    HUB_POLICIES.register(_policy.name, _policy, builtin=True)
