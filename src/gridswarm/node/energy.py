"""A node's energy side in a live run: its meter, its grid signal, its PV/battery site and policy.

`gridswarm node --energy node-energy.toml` reads an `[energy]` table (examples/energy/):

    [energy]
    region = "DE"
    signal = {kind = "constant", intensity_g_per_kwh = 120}   # any energy/signals.py kind
    [energy.pv]         # optional: constant | pvlib (clear sky) | measured (PVDAQ) | citylearn
    [energy.household]  # optional: constant | citylearn
    [energy.battery]    # optional: capacity_wh, max_power_w, ...
    [energy.policy]     # optional: energy/policy.py rules (intensity, surplus, price, windows)

`NodeEnergy` is what the agent holds. Before asking for work it calls `gate`: the policy decides
from (signal, site, clock) whether the node may run now; when that changes, or the last report is
older than `report_every_s`, the node tells the hub (`EnergyReport`: available now or not and
why, its draw, and its intensity / surplus / availability forecasts on one time grid). Each
assignment's training is wrapped in `measure`, which yields the `EnergyUse` the contribution
carries: energy_wh, power_w, method, region, the grid intensity over the interval and the share
met by local surplus. The clock is injectable, so tests can move time.
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from gridswarm.energy.home import (
    ClearSkyPV,
    ConstantPower,
    Home,
    PowerSeries,
    SeriesPower,
    Site,
)
from gridswarm.energy.meter import EnergyMeter, EnergyReading, ModelSource
from gridswarm.energy.policy import (
    NodeConditions,
    NodeDecision,
    NodePolicy,
    SurplusCovers,
    parse_node_policy,
    step_values,
)
from gridswarm.energy.series import UniformSeries
from gridswarm.energy.signals import (
    SignalError,
    SignalProvider,
    parse_time_value,
    signal_from_config,
)
from gridswarm.energy.solar import (
    Battery,
    PVArray,
    citylearn_start_s,
    measured_pv_series,
    read_citylearn_building,
)
from gridswarm.protocol import MAX_FORECAST_POINTS, EnergyReport, Name, describe_errors

log = logging.getLogger("gridswarm.node")

REPORT_POINTS = MAX_FORECAST_POINTS // 2  # forecast points per report (well inside the limit)
DRAW_EWMA = 0.5  # weight of the newest measured power in the draw estimate

# --------------------------------------------------------------------------------------------------
# the file's tables, validated by pydantic like RunConfig: every number bounded and finite


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


def _kind(table: Any) -> str | None:
    return table.get("kind") if isinstance(table, dict) else getattr(table, "kind", None)


def _one_of(*tables: type[_Table]) -> Any:
    """A union of tables told apart by their `kind`, with one error naming the kinds allowed."""
    kinds = [t.model_fields["kind"].annotation.__args__[0] for t in tables]
    message = f"kind must be one of {', '.join(kinds)}"
    members = tuple(Annotated[t, Tag(k)] for t, k in zip(tables, kinds, strict=True))
    return Annotated[
        Union[members],  # noqa: UP007 (a tuple of members)
        Discriminator(_kind, custom_error_type="kind", custom_error_message=message),
    ]


Watts = Annotated[float, Field(ge=0, le=1e9)]
Kwp = Annotated[float, Field(gt=0, le=1e6)]
TimeValue = float | datetime | Annotated[str, Field(max_length=64)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096)]


class ConstantPowerTable(_Table):
    kind: Literal["constant"]
    power_w: Watts


class PvlibTable(_Table):
    kind: Literal["pvlib"]
    kwp: Kwp
    tilt_deg: Annotated[float, Field(ge=0, le=90)]
    azimuth_deg: Annotated[float, Field(ge=0, le=360)]
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    altitude_m: Annotated[float, Field(ge=-500, le=9000)] = 0.0


class _Replayable(_Table):
    """A recorded series played from `replay_at` on (`trace_from`: where in the record)."""

    path: FilePath
    replay_at: TimeValue | None = None
    trace_from: TimeValue | None = None

    def replayed(self, series: UniformSeries, where: str) -> UniformSeries:
        if self.replay_at is None:
            return series
        at = parse_time_value(self.replay_at, f"{where}.replay_at")
        origin = None
        if self.trace_from is not None:
            origin = parse_time_value(self.trace_from, f"{where}.trace_from")
        return series.replayed_at(at, origin)


class MeasuredPvTable(_Replayable):
    kind: Literal["measured"]
    kwp: Kwp
    source_kwp: Kwp = 3.86
    year: Annotated[int, Field(ge=1970, le=2100)] | None = None


class CityLearnTable(_Replayable):
    kind: Literal["citylearn"]
    kwp: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    anchor_year: Annotated[int, Field(ge=1970, le=2100)] = 2021


PvTable = _one_of(ConstantPowerTable, PvlibTable, MeasuredPvTable, CityLearnTable)
HouseholdTable = _one_of(ConstantPowerTable, CityLearnTable)


class BatteryTable(_Table):
    capacity_wh: Annotated[float, Field(gt=0, le=1e9)]
    max_power_w: Annotated[float, Field(gt=0, le=1e9)]
    round_trip_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.9
    soc_floor_frac: Annotated[float, Field(ge=0, lt=1)] = 0.1
    initial_soc_frac: Annotated[float, Field(ge=0, le=1)] = 0.5


class EnergyTable(_Table):
    """`[energy]`. `signal` and `policy` are checked by their own parsers (a signal kind may be a
    plugin with fields of its own)."""

    region: Name | None = None
    signal: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    pv: PvTable | None = None
    household: HouseholdTable | None = None
    battery: BatteryTable | None = None
    draw_w: Annotated[float, Field(gt=0, le=1e6)] | None = None  # before the first measurement
    w_per_core: Annotated[float, Field(gt=0, le=1e4)] | None = None  # meter model override
    forecast_horizon_s: Annotated[float, Field(ge=1, le=30 * 86400)] = 86400.0
    forecast_step_s: Annotated[float, Field(ge=0.1, le=86400)] = 900.0
    report_every_s: Annotated[float, Field(ge=0.1, le=86400)] = 60.0
    check_every_s: Annotated[float, Field(ge=0.05, le=3600)] = 1.0


class NodeEnergyFile(BaseModel):
    """The `--energy` file: an `[energy]` table (other tables are left to their readers)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    energy: EnergyTable


def power_series(
    table: ConstantPowerTable | PvlibTable | MeasuredPvTable | CityLearnTable,
    where: str,
    base_dir: Path,
) -> PowerSeries:
    """A PV or household series from its validated table (`where` names it in errors)."""
    if isinstance(table, ConstantPowerTable):
        return ConstantPower(table.power_w)
    if isinstance(table, PvlibTable):
        try:
            return ClearSkyPV(PVArray(**table.model_dump(exclude={"kind"})))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    path = Path(table.path)
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise ValueError(f"{where}.path: file not found: {path}")
    if isinstance(table, MeasuredPvTable):
        series = measured_pv_series(
            path, kwp=table.kwp, source_kwp=table.source_kwp, year=table.year
        )
        return SeriesPower(table.replayed(series, where))
    load, pv = read_citylearn_building(
        path, start_s=citylearn_start_s(table.anchor_year), kwp=table.kwp
    )
    return SeriesPower(table.replayed(load if where.endswith("household") else pv, where))


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class NodeEnergySettings:
    """A node's `[energy]` table, parsed and validated."""

    region: str | None
    signal: SignalProvider | None = None
    policy: NodePolicy = field(default_factory=NodePolicy)
    home: Home | None = None  # PV, household load, battery (energy/home.py)
    draw_w: float | None = None  # the training's draw before the first measurement
    w_per_core: float | None = None  # meter model override (W per busy core)
    forecast_horizon_s: float = 86400.0
    forecast_step_s: float = 900.0
    report_every_s: float = 60.0
    check_every_s: float = 1.0  # how often a paused node looks again


def parse_node_energy(
    data: Mapping[str, Any], *, base_dir: str | Path = ".", region: str | None = None
) -> NodeEnergySettings:
    """Settings from a parsed TOML document with an `[energy]` table. `region` (from
    `--region`) is the default when the table has none. Raises ValueError naming the field."""
    if not isinstance(data.get("energy"), Mapping):
        raise ValueError("energy: the file needs an [energy] table")
    try:
        cfg = NodeEnergyFile.model_validate(data).energy
    except ValidationError as exc:
        raise ValueError(describe_errors(exc.errors())) from exc
    base = Path(base_dir)
    own_region = cfg.region if cfg.region is not None else region
    signal = None
    if cfg.signal is not None:
        signal = signal_from_config(cfg.signal, region=own_region, base_dir=base)
    battery = None
    if cfg.battery is not None:
        b = cfg.battery
        battery = Battery(b.capacity_wh, b.max_power_w, b.round_trip_efficiency, b.soc_floor_frac)
    return NodeEnergySettings(
        region=own_region,
        signal=signal,
        policy=parse_node_policy(cfg.policy),
        home=Home(
            pv=power_series(cfg.pv, "energy.pv", base) if cfg.pv else None,
            household=(
                power_series(cfg.household, "energy.household", base) if cfg.household else None
            ),
            battery=battery,
            initial_soc_frac=cfg.battery.initial_soc_frac if cfg.battery else 0.5,
        )
        if cfg.pv or cfg.household or cfg.battery
        else None,
        draw_w=cfg.draw_w,
        w_per_core=cfg.w_per_core,
        forecast_horizon_s=cfg.forecast_horizon_s,
        forecast_step_s=cfg.forecast_step_s,
        report_every_s=cfg.report_every_s,
        check_every_s=cfg.check_every_s,
    )


def load_node_energy(path: str | Path, region: str | None = None) -> NodeEnergySettings:
    """Read `gridswarm node --energy PATH`; relative paths inside are read from its folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"energy file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"energy file {path}: not valid TOML: {exc}") from exc
    try:
        return parse_node_energy(data, base_dir=path.parent, region=region)
    except ValueError as exc:
        raise ValueError(f"energy file {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# the runtime


@dataclass(frozen=True)
class EnergyUse:
    """Energy of one assignment's training, as the contribution claims it."""

    reading: EnergyReading
    region: str | None
    intensity_g_per_kwh: float | None  # the node's signal over the interval (mean of the ends)
    local_surplus_share: float | None  # share met by its own PV/battery (None: no site)

    def meta(self) -> dict[str, Any]:
        """The ContributionMeta fields this fills."""
        return {
            "energy_wh": self.reading.energy_wh,
            "power_w": self.reading.power_w,
            "energy_method": self.reading.method,
            "region": self.region,
            "intensity_g_per_kwh": self.intensity_g_per_kwh,
            "local_surplus_share": self.local_surplus_share,
        }


def combine_energy(first: EnergyUse, second: EnergyUse) -> EnergyUse:
    """One claim for work measured in two parts (Streaming DiLoCo's steps trained ahead, then
    the rest): energies add, power is the mean over both durations, intensity and local share
    are energy-weighted."""
    a, b = first.reading, second.reading
    energy_wh = a.energy_wh + b.energy_wh
    duration_s = a.duration_s + b.duration_s
    parts = dict(a.parts_wh)
    for method, wh in b.parts_wh.items():
        parts[method] = parts.get(method, 0.0) + wh

    def weighted(x: float | None, y: float | None) -> float | None:
        if x is None or y is None:
            return y if x is None else x
        if energy_wh <= 0:
            return (x + y) / 2
        return (x * a.energy_wh + y * b.energy_wh) / energy_wh

    reading = EnergyReading(
        energy_wh=energy_wh,
        power_w=energy_wh * 3600.0 / duration_s if duration_s > 0 else b.power_w,
        duration_s=duration_s,
        method=b.method,
        assumptions=b.assumptions,
        parts_wh=parts,
    )
    return EnergyUse(
        reading,
        second.region,
        weighted(first.intensity_g_per_kwh, second.intensity_g_per_kwh),
        weighted(first.local_surplus_share, second.local_surplus_share),
    )


def scale_energy(use: EnergyUse, fraction: float) -> EnergyUse:
    """The share `fraction` (0..1] of measured work: energy and duration scale, power does not
    (a claim covering only part of the steps measured)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    r = use.reading
    reading = EnergyReading(
        energy_wh=r.energy_wh * fraction,
        power_w=r.power_w,
        duration_s=r.duration_s * fraction,
        method=r.method,
        assumptions=r.assumptions,
        parts_wh={k: v * fraction for k, v in r.parts_wh.items()},
    )
    return EnergyUse(reading, use.region, use.intensity_g_per_kwh, use.local_surplus_share)


class MeasureBox:
    """Filled with the EnergyUse when a `measure()` block ends."""

    use: EnergyUse | None = None


def nominal_draw_w(meter: EnergyMeter, threads: int) -> float:
    """The training's draw before anything was measured: W/core × threads for the model meter;
    a 100 W placeholder for counters (RAPL/NVML), replaced by the first measurement."""
    model = next((s for s in meter.sources if isinstance(s, ModelSource)), None)
    return model.w_per_core * max(threads, 1) if model else 100.0


def forecast_grid(now_s: float, horizon_s: float, step_s: float) -> np.ndarray:
    """The report's time grid: from now, every step_s, at most REPORT_POINTS points."""
    step = max(step_s, horizon_s / REPORT_POINTS)
    return now_s + np.arange(0.0, horizon_s, step)


class NodeEnergy:
    """The node's meter, signal, site and policy, with an injectable clock."""

    def __init__(
        self,
        settings: NodeEnergySettings | None = None,
        *,
        region: str | None = None,
        threads: int = 1,
        meter: EnergyMeter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or NodeEnergySettings(region=region)
        self.region = self.settings.region or region
        self.meter = meter or EnergyMeter.detect(w_per_core=self.settings.w_per_core)
        self.clock = clock
        self.draw_w = self.settings.draw_w or nominal_draw_w(self.meter, threads)
        home = self.settings.home
        self.site = Site(home, clock()) if home is not None else None
        self.last_decision: NodeDecision | None = None
        self._reported: tuple[bool, float, str | None] | None = None  # available, at, run

    # ------------------------------------------------------------------ what the node knows

    def describe(self) -> str:
        """Every assumption, for the node's log at start."""
        s = self.settings
        lines = [f"energy meter ({self.meter.method}): {self.meter.describe()}"]
        lines.append(f"region: {self.region or 'unknown'}")
        lines.append(f"signal: {s.signal.describe() if s.signal else 'none'}")
        rules = ", ".join(r.field for r in s.policy.rules) or "none (always runs)"
        lines.append(f"policy rules: {rules}; draw estimate {self.draw_w:.1f} W")
        if self.site:
            lines.append(self.site.home.describe())
        return "\n".join(lines)

    def _signal_now(self, now_s: float) -> tuple[float | None, float | None]:
        if self.settings.signal is None:
            return None, None
        try:
            point = self.settings.signal.current(now_s)
        except (SignalError, ValueError) as exc:
            log.warning("energy signal failed: %s", exc)
            return None, None
        return point.intensity_g_per_kwh, point.price_per_kwh

    def _battery_state(self) -> tuple[float, float, float]:
        b = self.site.home.battery if self.site else None
        if b is None:
            return 0.0, 0.0, 0.0
        return self.site.soc_wh, b.capacity_wh, b.max_power_w

    def conditions(self, now_s: float) -> NodeConditions:
        """What the policy sees at `now_s` (the site is stepped idle up to it)."""
        intensity, price = self._signal_now(now_s)
        surplus = None
        if self.site:
            self.site.advance(now_s, 0.0)
            surplus = float(self.site.home.surplus_w(np.array([now_s]))[0])
        soc, capacity, max_power = self._battery_state()
        return NodeConditions(
            now_s=now_s,
            draw_w=self.draw_w,
            intensity_g_per_kwh=intensity,
            price_per_kwh=price,
            surplus_w=surplus,
            battery_soc_wh=soc,
            battery_capacity_wh=capacity,
            battery_max_power_w=max_power,
        )

    def decide(self, now_s: float | None = None) -> NodeDecision:
        now_s = self.clock() if now_s is None else now_s
        self.last_decision = self.settings.policy.evaluate(self.conditions(now_s))
        return self.last_decision

    def battery_available_wh(self) -> float:
        """Energy the battery can give above the higher of its own and the policy's floor."""
        if not self.site or not self.site.home.battery:
            return 0.0
        b = self.site.home.battery
        floors = [b.soc_floor_frac] + [
            r.battery_floor_frac for r in self.settings.policy.rules if isinstance(r, SurplusCovers)
        ]
        usable = max(self.site.soc_wh - max(floors) * b.capacity_wh, 0.0)
        return usable * b.one_way_efficiency

    def report(self, run_id: str | None, now_s: float | None = None) -> EnergyReport:
        """The node's state and outlook for the hub: forecasts on one grid from now, the policy
        applied at each grid time (its availability forecast)."""
        now_s = self.clock() if now_s is None else now_s
        c = self.conditions(now_s)
        decision = self.settings.policy.evaluate(c)
        s = self.settings
        times = forecast_grid(now_s, s.forecast_horizon_s, s.forecast_step_s)
        intensity = price = None
        if s.signal is not None:
            try:
                points = s.signal.forecast(now_s, s.forecast_horizon_s)
            except (SignalError, ValueError) as exc:
                log.warning("energy forecast failed: %s", exc)
                points = []
            if points:
                intensity = step_values([(p.t_s, p.intensity_g_per_kwh) for p in points], times)
                if all(p.price_per_kwh is not None for p in points):
                    price = step_values([(p.t_s, p.price_per_kwh) for p in points], times)
        surplus = self.site.home.surplus_w(times) if self.site else None
        availability = []
        for i, t in enumerate(times.tolist()):
            at = NodeConditions(
                now_s=t,
                draw_w=c.draw_w,
                intensity_g_per_kwh=None if intensity is None else float(intensity[i]),
                price_per_kwh=None if price is None else float(price[i]),
                surplus_w=None if surplus is None else float(surplus[i]),
                battery_soc_wh=c.battery_soc_wh,
                battery_capacity_wh=c.battery_capacity_wh,
                battery_max_power_w=c.battery_max_power_w,
            )
            availability.append((t, decision.allowed if i == 0 else s.policy.allows(at)))
        return EnergyReport(
            run_id=run_id,
            region=self.region,
            available=decision.allowed,
            reasons=list(decision.reasons),
            at_s=now_s,
            power_w=self.draw_w,
            intensity_g_per_kwh=c.intensity_g_per_kwh,
            price_per_kwh=c.price_per_kwh,
            surplus_w=c.surplus_w,
            battery_available_wh=self.battery_available_wh(),
            intensity_forecast=[]
            if intensity is None
            else list(zip(times.tolist(), intensity.tolist(), strict=True)),
            surplus_forecast_w=None
            if surplus is None
            else list(zip(times.tolist(), surplus.tolist(), strict=True)),
            availability_forecast=availability if s.policy.rules else None,
            signal=(s.signal.describe() if s.signal else "")[:200],
        )

    # ------------------------------------------------------------------ the agent's calls

    def gate(self, run_id: str | None, send: Callable[[EnergyReport], None]) -> NodeDecision:
        """May the node ask for work now? Tells the hub (`send`) when the answer or the run
        changed, or the last report is older than `report_every_s`; a failed send is retried
        next time."""
        now_s = self.clock()
        decision = self.decide(now_s)
        last = self._reported
        if (
            last is None
            or last[0] != decision.allowed
            or last[2] != run_id
            or now_s - last[1] >= self.settings.report_every_s
        ):
            if last is not None and last[0] != decision.allowed:
                why = "; ".join(decision.reasons)
                log.info("energy policy: %s", "resume" if decision.allowed else f"pause ({why})")
            try:
                send(self.report(run_id, now_s))
                self._reported = (decision.allowed, now_s, run_id)
            except Exception as exc:  # the hub may be restarting: try again on the next gate
                log.warning("could not send the energy report: %s", exc)
        return decision

    def poll_wait_s(self, wait_s: float) -> float:
        """Long-poll at most this long: a node with policy rules looks again every 2 s so an
        assignment is not taken after its policy turned."""
        return min(wait_s, 2.0) if self.settings.policy.rules else wait_s

    @property
    def pause_s(self) -> float:
        return self.settings.check_every_s

    @contextmanager
    def measure(self) -> Iterator[MeasureBox]:
        """Meter the block; afterwards `box.use` has the energy, intensity and local share."""
        box = MeasureBox()
        t0 = self.clock()
        if self.site:
            self.site.advance(t0, 0.0)
        g0, _ = self._signal_now(t0)
        with self.meter.measure() as m:
            yield box
        reading = m.reading
        t1 = self.clock()
        g1, _ = self._signal_now(t1)
        known = [g for g in (g0, g1) if g is not None]
        local_share = None
        if self.site:
            energy_wh, local_wh = self.site.advance(t1, reading.power_w)
            local_share = min(local_wh / energy_wh, 1.0) if energy_wh > 0 else 0.0
        if reading.power_w > 0:
            self.draw_w = DRAW_EWMA * reading.power_w + (1 - DRAW_EWMA) * self.draw_w
        box.use = EnergyUse(
            reading,
            self.region,
            sum(known) / len(known) if known else None,
            local_share,
        )
