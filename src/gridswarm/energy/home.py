"""A node's home: PV and household load as power series and an optional battery.

One description, `Home`, for the live node (node/energy.py builds it from its `[energy]` table and
steps it with `Site`) and the simulator (sim/swarm.py samples every home's series on its time
grid and steps all batteries at once with `solar.step_sites`). A power series is anything with
`power_w(times_s)`: a constant, a recorded series, or pvlib's clear-sky model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gridswarm.energy.series import UniformSeries
from gridswarm.energy.solar import Battery, PVArray, step_site

SITE_STEP_S = 300.0  # a live site's battery is stepped at most this far at a time


class PowerSeries:
    """Power (W) at unix times; `kind` and `describe` say what it is."""

    kind = "abstract"

    def power_w(self, times_s: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def at(self, t_s: float) -> float:
        return float(self.power_w(np.array([t_s], dtype=float))[0])

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True)
class ConstantPower(PowerSeries):
    watts: float
    kind: str = "constant"

    def power_w(self, times_s: np.ndarray) -> np.ndarray:
        return np.full(len(times_s), self.watts)

    def describe(self) -> str:
        return f"constant {self.watts:.0f} W"


@dataclass(frozen=True)
class SeriesPower(PowerSeries):
    """A recorded series (PVDAQ, CityLearn), step-wise constant, looping."""

    series: UniformSeries
    kind: str = "series"

    def power_w(self, times_s: np.ndarray) -> np.ndarray:
        return self.series.sample(times_s)

    def describe(self) -> str:
        return f"series {self.series.name} (step {self.series.step_s:.0f} s)"


@dataclass(frozen=True)
class ClearSkyPV(PowerSeries):
    array: PVArray
    kind: str = "pvlib"

    def power_w(self, times_s: np.ndarray) -> np.ndarray:
        index = pd.DatetimeIndex(pd.to_datetime(np.asarray(times_s, dtype=float), unit="s"))
        index = index.tz_localize("UTC")
        return self.array.ac_power_w(self.array.clearsky_weather(index)).to_numpy()

    def describe(self) -> str:
        a = self.array
        return (
            f"pvlib clear-sky PV {a.kwp} kWp, tilt {a.tilt_deg}°, azimuth {a.azimuth_deg}° at "
            f"({a.lat}, {a.lon}) — an upper bound: no clouds"
        )


@dataclass(frozen=True)
class Home:
    """PV and household load (W series) and an optional battery, charged to
    `initial_soc_frac` of its capacity when the home starts to be stepped."""

    pv: PowerSeries | None = None
    household: PowerSeries | None = None
    battery: Battery | None = None
    initial_soc_frac: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_soc_frac <= 1.0:
            raise ValueError(f"initial_soc_frac must be in [0, 1], got {self.initial_soc_frac}")

    def surplus_w(self, times_s: np.ndarray) -> np.ndarray:
        """PV − household load (before any compute) at each time."""
        pv = self.pv.power_w(times_s) if self.pv else np.zeros(len(times_s))
        load = self.household.power_w(times_s) if self.household else np.zeros(len(times_s))
        return pv - load

    def describe(self) -> str:
        parts = [
            f"PV {self.pv.describe()}" if self.pv else "no PV",
            f"household {self.household.describe()}" if self.household else "no household load",
        ]
        if self.battery:
            b = self.battery
            parts.append(
                f"battery {b.capacity_wh:.0f} Wh / {b.max_power_w:.0f} W, "
                f"η {b.round_trip_efficiency:.0%}, floor {b.soc_floor_frac:.0%}"
            )
        return "site: " + "; ".join(parts)


class Site:
    """One home stepped through time (a live node's): its battery's charge now, and `advance`
    to a later time at a compute draw, which returns (compute energy, the part of it met
    locally) in Wh."""

    def __init__(self, home: Home, t_s: float) -> None:
        self.home = home
        self.soc_wh = home.battery.capacity_wh * home.initial_soc_frac if home.battery else 0.0
        self.t_s = t_s

    def advance(self, t_s: float, compute_w: float) -> tuple[float, float]:
        home = self.home
        energy_wh = local_wh = 0.0
        while self.t_s < t_s - 1e-9:
            dt = min(SITE_STEP_S, t_s - self.t_s)
            mid = np.array([self.t_s + dt / 2])
            pv = float(home.pv.power_w(mid)[0]) if home.pv else 0.0
            load = float(home.household.power_w(mid)[0]) if home.household else 0.0
            step = step_site(home.battery, self.soc_wh, max(pv, 0), max(load, 0), compute_w, dt)
            self.soc_wh = step.soc_wh
            energy_wh += compute_w * dt / 3600.0
            local_wh += step.compute_local_w * dt / 3600.0
            self.t_s += dt
        return energy_wh, local_wh
