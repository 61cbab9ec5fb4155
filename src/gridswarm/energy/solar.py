"""Local generation at a node: PV array, household load, battery, and the surplus left for compute.

- `PVArray`: a fixed PV array (kWp, tilt, azimuth, lat/lon) modelled with pvlib (PVWatts DC +
  PVWatts inverter, Perez-free isotropic sky, Faiman cell temperature) from a weather frame, or from
  clear sky. A measured series (PVDAQ) can stand in for the model.
- Household load: CityLearn 2022 homes (hourly kWh = mean kW).
- `Battery` + `step_site`: one pure step of PV → household → compute → battery → grid, returning
  every flow and the share of the compute draw met locally.
- `validate_pv_model`: the pvlib model against the measured PVDAQ system 50 (Golden CO) — see
  docs/energy.md for the method and the error it reaches.

Surplus = PV − household load − compute draw (W). Local supply serves the household first.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pvlib

from gridswarm.energy.series import UniformSeries, from_pandas

# --------------------------------------------------------------------------------------------------
# PV


@dataclass(frozen=True)
class PVArray:
    """A fixed-tilt PV array. Azimuth in degrees clockwise from north (180 = south)."""

    kwp: float
    tilt_deg: float
    azimuth_deg: float
    lat: float
    lon: float
    altitude_m: float = 0.0
    losses_frac: float = 0.14  # PVWatts default system losses (soiling, wiring, mismatch, ...)
    gamma_pdc: float = -0.004  # power temperature coefficient, 1/°C (crystalline Si)
    inverter_eff: float = 0.96
    dc_ac_ratio: float = 1.1

    def __post_init__(self) -> None:
        checks = {
            "kwp": self.kwp > 0,
            "tilt_deg": 0 <= self.tilt_deg <= 90,
            "azimuth_deg": 0 <= self.azimuth_deg <= 360,
            "lat": -90 <= self.lat <= 90,
            "lon": -180 <= self.lon <= 180,
            "losses_frac": 0 <= self.losses_frac < 1,
            "inverter_eff": 0 < self.inverter_eff <= 1,
            "dc_ac_ratio": self.dc_ac_ratio > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"PVArray: invalid {bad[0]}={getattr(self, bad[0])!r}")

    @property
    def location(self) -> pvlib.location.Location:
        return pvlib.location.Location(self.lat, self.lon, tz="UTC", altitude=self.altitude_m)

    def ac_power_w(self, weather: pd.DataFrame) -> pd.Series:
        """AC power (W) at each time of `weather` (tz-aware index at interval midpoints; columns
        ghi, dni, dhi in W/m², optional temp_air °C and wind_speed m/s)."""
        missing = {"ghi", "dni", "dhi"} - set(weather.columns)
        if missing:
            raise ValueError(f"weather is missing columns {sorted(missing)}")
        if weather.index.tz is None:
            raise ValueError("weather index must be tz-aware")
        sun = self.location.get_solarposition(weather.index)
        poa = pvlib.irradiance.get_total_irradiance(
            self.tilt_deg,
            self.azimuth_deg,
            sun["apparent_zenith"],
            sun["azimuth"],
            weather["dni"],
            weather["ghi"],
            weather["dhi"],
        )["poa_global"].fillna(0.0)
        temp_air = weather.get("temp_air", 20.0)
        wind = weather.get("wind_speed", 1.0)
        cell_c = pvlib.temperature.faiman(poa, temp_air, wind)
        pdc0_w = self.kwp * 1000.0
        dc_w = pvlib.pvsystem.pvwatts_dc(poa, cell_c, pdc0_w, self.gamma_pdc) * (
            1 - self.losses_frac
        )
        ac_w = pvlib.inverter.pvwatts(dc_w, pdc0_w / self.dc_ac_ratio, self.inverter_eff)
        return pd.Series(np.asarray(ac_w, dtype=float), index=weather.index).clip(lower=0).fillna(0)

    def clearsky_weather(self, times: pd.DatetimeIndex) -> pd.DataFrame:
        """Ineichen clear-sky ghi/dni/dhi at the array (Linke turbidity climatology)."""
        return self.location.get_clearsky(times)


def read_tmy3(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """TMY3 file (plain or .gz) → (frame with pvlib names, metadata). Index: hour-ending stamps in
    the file's local standard time, coerced to 2001 (not a leap year)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data, meta = pvlib.iotools.read_tmy3(f, map_variables=True, coerce_year=2001)
    return data, meta


def transfer_weather(
    tmy: pd.DataFrame, tmy_meta: dict, array: PVArray, year: int, tz_offset_h: float
) -> pd.DataFrame:
    """Weather at `array` built from another site's TMY by clear-sky-index transfer.

    For each TMY hour the clear-sky index k = GHI / GHI_clear at the TMY site (0 ≤ k ≤ 1.3) is
    applied to the clear-sky GHI at the array's site at the same local standard clock time of
    `year`; DNI/DHI are split from GHI with the Erbs model; air temperature and wind are the TMY
    site's. This keeps the array's sun geometry and altitude and borrows only cloudiness.
    """
    src = pvlib.location.Location(
        tmy_meta["latitude"], tmy_meta["longitude"], tz="UTC", altitude=tmy_meta["altitude"]
    )
    src_tz = timezone(timedelta(hours=float(tmy_meta["TZ"])))
    src_times = pd.DatetimeIndex(tmy.index.tz_localize(None) - pd.Timedelta("30min")).tz_localize(
        src_tz
    )  # hour-ending → mid-hour
    cs_src = src.get_clearsky(src_times)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(cs_src["ghi"].to_numpy() > 20, tmy["ghi"].to_numpy() / cs_src["ghi"], 0.0)
    k = np.clip(np.nan_to_num(k), 0.0, 1.3)

    dst_tz = timezone(timedelta(hours=tz_offset_h))
    naive = src_times.tz_localize(None)
    naive = naive + pd.DateOffset(years=year - naive[0].year)
    times = pd.DatetimeIndex(naive).tz_localize(dst_tz)
    keep = ~times.duplicated()
    times, k = times[keep], k[keep]
    sun = array.location.get_solarposition(times)
    cs = array.location.get_clearsky(times, solar_position=sun)
    ghi = k * cs["ghi"].to_numpy()
    split = pvlib.irradiance.erbs(ghi, sun["zenith"], times)
    return pd.DataFrame(
        {
            "ghi": ghi,
            "dni": np.nan_to_num(np.asarray(split["dni"], dtype=float)),
            "dhi": np.nan_to_num(np.asarray(split["dhi"], dtype=float)),
            "temp_air": tmy["temp_air"].to_numpy()[keep],
            "wind_speed": tmy["wind_speed"].to_numpy()[keep],
        },
        index=times,
    )


def read_pvdaq(path: str | Path) -> pd.Series:
    """Measured AC power (W, 15 min) of PVDAQ system 50 as a UTC-indexed series.

    The stamps carry a fixed '-07:00' but follow daylight saving time (the pvanalytics source file
    is named '..._full_DST'): the centre of daily production jumps by ~0.75 h at each DST switch
    when read literally, and not at all when read as America/Denver clock time, which we do.
    """
    df = pd.read_csv(path)
    if {"measured_on", "ac_power_2"} - set(df.columns):
        raise ValueError(f"{path}: expected columns measured_on, ac_power_2")
    local = pd.DatetimeIndex(pd.to_datetime(df["measured_on"].str.slice(0, 19)))
    idx = local.tz_localize("America/Denver", ambiguous="NaT", nonexistent="NaT")
    s = pd.Series(df["ac_power_2"].to_numpy(dtype=float), index=idx)
    return s[s.index.notna()].tz_convert("UTC")


# --------------------------------------------------------------------------------------------------
# PV model validation against PVDAQ system 50


PVDAQ50_LAT, PVDAQ50_LON, PVDAQ50_ALT_M = 39.7406, -105.1775, 1730.0
PVDAQ50_TZ_H = -7.0  # Mountain Standard Time


@dataclass(frozen=True)
class PVValidation:
    """Model vs measurement for one year; errors are (model − measured) / measured."""

    year: int
    calibration_year: int
    kwp_fitted: float
    tilt_deg: float
    azimuth_deg: float
    measured_kwh: float  # over the hours with a measurement
    model_kwh: float  # same hours, TMY-transfer weather
    clearsky_kwh: float  # same hours, clear sky (the upper bound a naive model would give)
    annual_error_frac: float
    clearsky_error_frac: float
    profile_nrmse: float  # RMSE of the mean daily profile / its mean (hours with sun)
    profile_peak_hour_measured: float
    profile_peak_hour_model: float
    monthly_error_frac: tuple[float, ...]
    hourly_profile_measured_w: tuple[float, ...]  # mean W per local standard hour 0..23
    hourly_profile_model_w: tuple[float, ...]


def _clear_day_fit(
    measured: pd.Series, candidates: list[tuple[float, float]], days_per_month: int
) -> tuple[float, float, float]:
    """(kwp, tilt, azimuth) best matching the clearest measured days under clear sky."""
    t_mid = measured.index + pd.Timedelta("7.5min")
    best: tuple[float, float, float, float] | None = None
    for tilt, az in candidates:
        unit = PVArray(1.0, tilt, az, PVDAQ50_LAT, PVDAQ50_LON, PVDAQ50_ALT_M)
        model = unit.ac_power_w(unit.clearsky_weather(t_mid)).to_numpy()
        frame = pd.DataFrame({"meas": measured.to_numpy(), "model": model}, index=measured.index)
        daily = frame.resample("1D").sum()
        ratio = (daily["meas"] / daily["model"]).replace([np.inf, -np.inf], np.nan).dropna()
        clear = ratio.groupby(ratio.index.month).nlargest(days_per_month).index.get_level_values(-1)
        sel = frame[frame.index.floor("1D").isin(clear)].dropna()
        kwp = sel["meas"].sum() / sel["model"].sum()
        err = float(np.sqrt(((sel["meas"] - kwp * sel["model"]) ** 2).mean()) / sel["meas"].mean())
        if best is None or err < best[0]:
            best = (err, kwp, tilt, az)
    assert best is not None
    return best[1], best[2], best[3]


def validate_pv_model(
    pvdaq_path: str | Path,
    tmy_path: str | Path,
    *,
    year: int = 2012,
    calibration_year: int = 2013,
    days_per_month: int = 3,
) -> PVValidation:
    """Check the pvlib model against measured PVDAQ system 50 output.

    Method (the shipped TMY3 is Greensboro NC, not Golden CO, and the system's kWp and orientation
    are not in the data): (1) fit kWp, tilt and azimuth on the clearest days of
    `calibration_year` under clear sky; (2) build `year`'s weather at Golden by clear-sky-index
    transfer from the Greensboro TMY3 (`transfer_weather`); (3) compare `year`'s energy over the
    hours that have a measurement, per month, and the mean daily profile.
    """
    measured = read_pvdaq(pvdaq_path)
    cal = measured[measured.index.year == calibration_year]
    if cal.dropna().empty:
        raise ValueError(f"no measured PV data in calibration year {calibration_year}")
    candidates = [(t, a) for t in (30.0, 40.0, 50.0, 60.0) for a in (150.0, 160.0, 170.0, 180.0)]
    kwp, tilt, az = _clear_day_fit(cal, candidates, days_per_month)
    array = PVArray(kwp, tilt, az, PVDAQ50_LAT, PVDAQ50_LON, PVDAQ50_ALT_M)

    tmy, meta = read_tmy3(tmy_path)
    weather = transfer_weather(tmy, meta, array, year, PVDAQ50_TZ_H)
    model_h = array.ac_power_w(weather)
    model_h.index = (model_h.index - pd.Timedelta("30min")).tz_convert("UTC")  # hour starts
    clear_h = array.ac_power_w(array.clearsky_weather(weather.index))
    clear_h.index = model_h.index

    meas = measured[measured.index.year == year]
    if meas.dropna().empty:
        raise ValueError(f"no measured PV data in {year}")
    meas_h = meas.resample("1h").mean().dropna()
    common = meas_h.index.intersection(model_h.index)
    m, p, c = meas_h[common], model_h[common], clear_h[common]
    measured_kwh, model_kwh, clear_kwh = m.sum() / 1e3, p.sum() / 1e3, c.sum() / 1e3

    local = common.tz_convert(timezone(timedelta(hours=PVDAQ50_TZ_H)))
    months = local.month
    monthly = tuple(
        float(p[months == mo].sum() / m[months == mo].sum() - 1.0) for mo in range(1, 13)
    )
    prof_m = m.groupby(local.hour).mean().reindex(range(24), fill_value=0.0)
    prof_p = p.groupby(local.hour).mean().reindex(range(24), fill_value=0.0)
    sunny = prof_m > 0.02 * prof_m.max()
    nrmse = float(np.sqrt(((prof_p - prof_m)[sunny] ** 2).mean()) / prof_m[sunny].mean())

    def peak_hour(profile: pd.Series) -> float:  # centroid of production, local standard time
        return float((profile * (profile.index + 0.5)).sum() / profile.sum())

    return PVValidation(
        year=year,
        calibration_year=calibration_year,
        kwp_fitted=float(kwp),
        tilt_deg=tilt,
        azimuth_deg=az,
        measured_kwh=float(measured_kwh),
        model_kwh=float(model_kwh),
        clearsky_kwh=float(clear_kwh),
        annual_error_frac=float(model_kwh / measured_kwh - 1.0),
        clearsky_error_frac=float(clear_kwh / measured_kwh - 1.0),
        profile_nrmse=nrmse,
        profile_peak_hour_measured=peak_hour(prof_m),
        profile_peak_hour_model=peak_hour(prof_p),
        monthly_error_frac=monthly,
        hourly_profile_measured_w=tuple(float(v) for v in prof_m),
        hourly_profile_model_w=tuple(float(v) for v in prof_p),
    )


# --------------------------------------------------------------------------------------------------
# series for nodes: measured PV, CityLearn homes


def measured_pv_series(
    path: str | Path, *, kwp: float, source_kwp: float, year: int | None = None, step_s: float = 900
) -> UniformSeries:
    """PVDAQ measured output rescaled from `source_kwp` to an array of `kwp` (W, uniform step)."""
    s = read_pvdaq(path)
    if year is not None:
        s = s[s.index.year == year]
    s = s.clip(lower=0.0) * (kwp / source_kwp)
    return from_pandas(s, step_s, name=f"pvdaq50 x{kwp / source_kwp:.2f}")


def citylearn_start_s(anchor_year: int, tz_offset_h: float = -8.0) -> float:
    """Unix time of CityLearn 2022 row 0 (month 7, hour 24 = 23:00-24:00 on 31 July, local
    standard time of Fontana CA). The dataset does not state the year: `anchor_year` picks it."""
    tz = timezone(timedelta(hours=tz_offset_h))
    return datetime(anchor_year, 7, 31, 23, tzinfo=tz).timestamp()


def read_citylearn_building(
    path: str | Path, *, start_s: float, kwp: float | None = None
) -> tuple[UniformSeries, UniformSeries]:
    """(household load W, PV W) hourly series of one CityLearn home.

    `non_shiftable_load` is kWh per hour (= mean kW); `solar_generation` is W per kWp installed, so
    PV is scaled by `kwp` (None → a zero PV series).
    """
    df = pd.read_csv(path)
    for col in ("non_shiftable_load", "solar_generation"):
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r}")
    load_w = np.clip(np.nan_to_num(df["non_shiftable_load"].to_numpy(dtype=float)), 0, None) * 1e3
    pv_w = np.clip(np.nan_to_num(df["solar_generation"].to_numpy(dtype=float)), 0, None)
    pv_w = pv_w * (kwp or 0.0)
    name = Path(path).name.split(".")[0]
    return (
        UniformSeries(start_s, 3600.0, load_w, name=f"{name} load"),
        UniformSeries(start_s, 3600.0, pv_w, name=f"{name} pv"),
    )


# --------------------------------------------------------------------------------------------------
# battery and one site step


@dataclass(frozen=True)
class Battery:
    """A home battery charged only from PV; round-trip efficiency split evenly both ways."""

    capacity_wh: float
    max_power_w: float
    round_trip_efficiency: float = 0.9
    soc_floor_frac: float = 0.1

    def __post_init__(self) -> None:
        if self.capacity_wh <= 0:
            raise ValueError(f"Battery: capacity_wh must be > 0, got {self.capacity_wh}")
        if self.max_power_w <= 0:
            raise ValueError(f"Battery: max_power_w must be > 0, got {self.max_power_w}")
        if not 0 < self.round_trip_efficiency <= 1:
            raise ValueError(
                "Battery: round_trip_efficiency must be in (0, 1], "
                f"got {self.round_trip_efficiency}"
            )
        if not 0 <= self.soc_floor_frac < 1:
            raise ValueError(
                f"Battery: soc_floor_frac must be in [0, 1), got {self.soc_floor_frac}"
            )

    @property
    def one_way_efficiency(self) -> float:
        return float(np.sqrt(self.round_trip_efficiency))

    @property
    def floor_wh(self) -> float:
        return self.capacity_wh * self.soc_floor_frac

    def available_w(self, soc_wh: float, dt_s: float) -> float:
        """Power it can deliver for `dt_s` without going below the floor."""
        usable_wh = max(soc_wh - self.floor_wh, 0.0) * self.one_way_efficiency
        return min(self.max_power_w, usable_wh * 3600.0 / dt_s)


@dataclass(frozen=True)
class SiteStep:
    """Mean flows (W) over one step and the state of charge after it."""

    pv_w: float
    household_w: float
    compute_w: float
    charge_w: float
    discharge_w: float
    grid_import_w: float
    grid_export_w: float
    compute_local_w: float  # part of the compute draw met by PV or battery
    soc_wh: float

    @property
    def surplus_w(self) -> float:
        return surplus_w(self.pv_w, self.household_w, self.compute_w)

    @property
    def compute_local_share(self) -> float:
        return self.compute_local_w / self.compute_w if self.compute_w > 0 else 0.0


def surplus_w(pv_w: float, household_w: float, compute_w: float = 0.0) -> float:
    """PV − household load − compute draw (negative: a deficit)."""
    return pv_w - household_w - compute_w


def step_site(
    battery: Battery | None,
    soc_wh: float,
    pv_w: float,
    household_w: float,
    compute_w: float,
    dt_s: float,
) -> SiteStep:
    """Advance a home by `dt_s`: PV serves the household, then compute; the rest charges the
    battery, then is exported. A deficit is met by the battery (down to its floor), then grid."""
    if dt_s <= 0:
        raise ValueError(f"dt_s must be > 0, got {dt_s}")
    if min(pv_w, household_w, compute_w) < 0:
        raise ValueError("pv_w, household_w and compute_w must be >= 0")
    dt_h = dt_s / 3600.0
    net_w = surplus_w(pv_w, household_w, compute_w)
    charge_w = discharge_w = 0.0
    if battery is not None:
        if not 0 <= soc_wh <= battery.capacity_wh + 1e-9:
            raise ValueError(f"soc_wh {soc_wh} outside [0, {battery.capacity_wh}]")
        eta = battery.one_way_efficiency
        if net_w > 0:
            room_w = (battery.capacity_wh - soc_wh) / (eta * dt_h)
            charge_w = min(net_w, battery.max_power_w, max(room_w, 0.0))
        elif net_w < 0:
            discharge_w = min(-net_w, battery.available_w(soc_wh, dt_s))
        soc_wh = soc_wh + (eta * charge_w - discharge_w / eta) * dt_h
        soc_wh = min(max(soc_wh, 0.0), battery.capacity_wh)
    export_w = max(net_w, 0.0) - charge_w
    import_w = max(-net_w, 0.0) - discharge_w
    compute_local_w = min(max(pv_w + discharge_w - household_w, 0.0), compute_w)
    return SiteStep(
        pv_w=pv_w,
        household_w=household_w,
        compute_w=compute_w,
        charge_w=charge_w,
        discharge_w=discharge_w,
        grid_import_w=import_w,
        grid_export_w=export_w,
        compute_local_w=compute_local_w,
        soc_wh=soc_wh,
    )


def step_sites(
    capacity_wh: np.ndarray,
    max_power_w: np.ndarray,
    one_way_efficiency: np.ndarray,
    floor_wh: np.ndarray,
    soc_wh: np.ndarray,
    pv_w: np.ndarray,
    household_w: np.ndarray,
    compute_w: np.ndarray,
    dt_s: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """`step_site` for many homes at once (arrays; capacity 0 = no battery, dt 0 = no step):
    returns (state of charge after, part of the compute draw met by PV or battery in W)."""
    dt_h = np.maximum(dt_s, 1e-12) / 3600.0
    net_w = pv_w - household_w - compute_w
    room_w = np.maximum((capacity_wh - soc_wh) / (one_way_efficiency * dt_h), 0.0)
    charge_w = np.where(net_w > 0, np.minimum(np.minimum(net_w, max_power_w), room_w), 0.0)
    usable_wh = np.maximum(soc_wh - floor_wh, 0.0) * one_way_efficiency
    available_w = np.minimum(max_power_w, usable_wh / dt_h)
    discharge_w = np.where(net_w < 0, np.minimum(-net_w, available_w), 0.0)
    soc = soc_wh + (one_way_efficiency * charge_w - discharge_w / one_way_efficiency) * dt_h
    soc = np.where(dt_s > 0, np.clip(soc, 0.0, capacity_wh), soc_wh)
    local_w = np.minimum(np.maximum(pv_w + discharge_w - household_w, 0.0), compute_w)
    return soc, local_w
