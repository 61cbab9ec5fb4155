"""A reproducible swarm built from the shared energy data, for the carbon benchmark and demos.

Nodes are spread over the recorded grids (DE, GB, FR 2020 via lets-wait-awhile; CISO, BPAT, AZPS,
MISO, PJM, SOCO 2022 via EIA-930); a third have a home with PV, household load and a battery:
CityLearn 2022 homes (Fontana CA, hence CISO) with their own PV, and homes in AZPS whose PV is the
measured PVDAQ system 50 output (Golden CO, a Mountain-time proxy for Arizona) rescaled to 5 kWp.
All series are replayed onto one simulated calendar keeping season, weekday and local time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gridswarm.energy.home import Home, SeriesPower
from gridswarm.energy.policy import NodePolicy, parse_node_policy
from gridswarm.energy.signals import TraceSignal
from gridswarm.energy.solar import (
    Battery,
    citylearn_start_s,
    measured_pv_series,
    read_citylearn_building,
)
from gridswarm.sim.swarm import SimNode

# tokens/s and W for a ~100M-parameter model; what matters is the spread of J per token
HARDWARE: dict[str, tuple[float, float]] = {
    "a100": (60_000.0, 300.0),
    "rtx4090": (45_000.0, 350.0),
    "rtx3090": (30_000.0, 320.0),
    "t4": (8_000.0, 70.0),
}
LWA = {"DE": "lwa_de_2020_ci.csv.gz", "GB": "lwa_gb_2020_ci.csv.gz", "FR": "lwa_fr_2020_ci.csv.gz"}
EIA = ("CISO", "BPAT", "AZPS", "MISO", "PJM", "SOCO")
PVDAQ50_KWP = 3.86  # fitted on 2013 clear days by solar.validate_pv_model


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class ScenarioSpec:
    start: str = "2022-06-06T00:00:00"  # a Monday
    grid_only: tuple[tuple[str, int], ...] = (
        ("DE", 2),
        ("GB", 2),
        ("FR", 2),
        ("BPAT", 2),
        ("MISO", 2),
        ("PJM", 2),
        ("SOCO", 2),
        ("CISO", 1),
        ("AZPS", 1),
    )
    citylearn_homes: tuple[int, ...] = (1, 2, 3, 5, 6)  # CISO, own PV (4 kWp)
    pvdaq_homes: tuple[int, ...] = (7, 8, 9)  # AZPS, CityLearn load + PVDAQ PV at 5 kWp
    forecast_error: float = 0.1  # relative sd at 24 h lead
    seed: int = 0
    copies: int = 1  # the swarm repeated this many times (each node its own forecast error)
    hardware: str | None = None  # one HARDWARE kind on every node (a control); None: a mix


# a swarm with no near-zero-carbon grid and no PV to shift into (the hard case): the cleanest
# hour of its cleanest grid (GB, June 2020) is still > 100 gCO2e/kWh
NO_CLEAN_GRID = ScenarioSpec(
    grid_only=(("DE", 3), ("GB", 3), ("MISO", 3), ("PJM", 3), ("SOCO", 3), ("AZPS", 3)),
    citylearn_homes=(),
    pvdaq_homes=(),
)


def build_swarm(data_dir: str | Path, spec: ScenarioSpec = ScenarioSpec()) -> list[SimNode]:
    """The benchmark swarm (24 nodes over 9 regions with the default spec, times `spec.copies`)."""
    if spec.hardware is not None and spec.hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {spec.hardware!r}; choose from {sorted(HARDWARE)}")
    data = Path(data_dir)
    ci = data / "carbon_intensity"
    start_s = ts(spec.start)
    weekday_aligned_2020 = ts("2020-06-08T00:00:00")  # the Monday of the same week in 2020
    signals: dict[str, TraceSignal] = {}

    def signal(region: str, k: int) -> TraceSignal:
        key = f"{region}"
        if key not in signals:
            if region in LWA:
                base = TraceSignal.from_csv(
                    ci / LWA[region],
                    region=region,
                    replay_at_s=start_s,
                    trace_from_s=weekday_aligned_2020,
                )
            else:
                base = TraceSignal.from_csv(ci / f"eia930_2022_{region}.csv.gz", region=region)
            signals[key] = base
        base = signals[key]
        # each node gets its own forecast-error draw
        return TraceSignal(
            base.series, region, forecast_error=spec.forecast_error, seed=spec.seed * 1000 + k
        )

    hw_names = list(HARDWARE)
    nodes: list[SimNode] = []

    def add(region: str, home: Home | None = None, policy: NodePolicy | None = None) -> None:
        k = len(nodes)
        tps, power = HARDWARE[spec.hardware or hw_names[k % len(hw_names)]]
        nodes.append(
            SimNode(
                node_id=f"n{k:05d}-{region.lower()}",
                region=region,
                tokens_per_s=tps,
                power_w=power,
                signal=signal(region, k),
                policy=policy or NodePolicy(),
                home=home,
            )
        )

    mg = data / "microgrid" / "citylearn_2022"
    cl_start = citylearn_start_s(2021)
    battery = Battery(capacity_wh=6400.0, max_power_w=5000.0, round_trip_efficiency=0.9)
    citylearn = {
        b: read_citylearn_building(mg / f"Building_{b}.csv.gz", start_s=cl_start, kwp=4.0)
        for b in spec.citylearn_homes
    }
    pvdaq = measured_pv_series(
        data / "solar" / "pvdaq_system50_golden_co_ac_power_15min.csv.gz",
        kwp=5.0,
        source_kwp=PVDAQ50_KWP,
        year=2012,
    ).replayed_at(start_s, ts("2012-06-04T00:00:00"))  # a Monday, same UTC (so local) time
    pvdaq_load = {
        b: read_citylearn_building(mg / f"Building_{b}.csv.gz", start_s=cl_start)[0]
        for b in spec.pvdaq_homes
    }
    office = parse_node_policy(  # an office desktop: evenings, nights, weekends
        {"windows": ["mon-fri 18:00-08:00", "sat,sun 00:00-24:00"], "timezone": "Europe/Berlin"}
    )
    capped = parse_node_policy({"max_intensity_g_per_kwh": 380})  # an operator who caps intensity
    surplus_only = parse_node_policy({"require_surplus": True})
    # one Home per building, shared by every copy of it: alike nodes stay one class (sim/swarm.py)
    cl_homes = {
        b: Home(SeriesPower(citylearn[b][1]), SeriesPower(citylearn[b][0]), battery)
        for b in spec.citylearn_homes
    }
    pvdaq_pv = SeriesPower(pvdaq)
    pvdaq_homes = {b: Home(pvdaq_pv, SeriesPower(pvdaq_load[b]), battery) for b in spec.pvdaq_homes}
    for _ in range(spec.copies):
        for region, count in spec.grid_only:
            for j in range(count):
                policy = None
                if region == "DE" and j == 1:
                    policy = office
                if region == "PJM" and j == 1:
                    policy = capped
                add(region, policy=policy)
        for b in spec.citylearn_homes:
            add("CISO", cl_homes[b])
        for i, b in enumerate(spec.pvdaq_homes):
            add("AZPS", pvdaq_homes[b], surplus_only if i == 2 else None)
    return nodes
