"""Grid signals: carbon intensity (gCO2e/kWh) and price, now and forecast, per region.

One interface, `SignalProvider`, with `current(now_s)` and `forecast(now_s, horizon_s)`; the clock
is always passed in so the same provider serves the live node and the simulator. Providers:

- `TraceSignal`: a recorded series (the lets-wait-awhile ENTSO-E-derived CSVs and the EIA-930 CSVs
  in shared data), resampled to a uniform step, replayable at any calendar time, with an optional
  seeded forecast error that grows with lead time.
- `ConstantSignal`: a fixed intensity (and price).
- HTTP clients (httpx): `ElectricityMapsSignal` (v3 API), `WattTimeSignal` (v3 API, marginal MOER,
  converted from lbs/MWh) and `GBCarbonIntensitySignal` (api.carbonintensity.org.uk, national or a
  DNO region).

`signal_from_config` builds any of them from a node's TOML `[energy] signal = {kind = ...}` table;
more kinds come from plugins (the `gridswarm.signals` entry points, see gridswarm.plugins).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gridswarm.energy.series import UniformSeries, from_pandas
from gridswarm.plugins import Registry
from gridswarm.protocol import describe_errors

if TYPE_CHECKING:  # pandas costs a hub ~0.7 s to import; only trace files need it
    import pandas as pd

G_PER_KWH_PER_LB_PER_MWH = 0.45359237  # 1 lb/MWh = 453.59237 g / 1000 kWh


class SignalError(RuntimeError):
    """A signal source failed or answered something we cannot use."""


@dataclass(frozen=True)
class SignalPoint:
    """The signal in force from `t_s` (unix seconds) on."""

    t_s: float
    intensity_g_per_kwh: float
    price_per_kwh: float | None = None


class SignalProvider(ABC):
    """Carbon intensity (and price where known) for one region, now and ahead."""

    region: str
    kind: str = "abstract"

    @abstractmethod
    def current(self, now_s: float) -> SignalPoint:
        """The signal in force at `now_s`."""

    @abstractmethod
    def forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        """Points covering [now_s, now_s + horizon_s), the first at `now_s`."""

    def intensity_forecast(self, now_s: float, horizon_s: float) -> list[tuple[float, float]]:
        """(unix_s, g/kWh) pairs, the shape `policy.NodeEnergyState.intensity_forecast` takes."""
        return [(p.t_s, p.intensity_g_per_kwh) for p in self.forecast(now_s, horizon_s)]

    def describe(self) -> str:
        return f"{self.kind} signal for {self.region}"


def parse_time_s(text: str) -> float:
    """ISO-8601 time (with Z or an offset; naive means UTC) to unix seconds."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise SignalError(f"cannot parse time {text!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _iso_minutes(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, UTC).strftime("%Y-%m-%dT%H:%MZ")


def points_window(points: list[SignalPoint], now_s: float, horizon_s: float) -> list[SignalPoint]:
    """Clip a sorted point list to [now_s, now_s + horizon_s), re-anchoring the first at now_s."""
    if not points:
        return []
    ahead = [p for p in points if now_s < p.t_s < now_s + horizon_s]
    before = [p for p in points if p.t_s <= now_s]
    head = before[-1] if before else points[0]
    return [replace(head, t_s=now_s), *ahead]


# --------------------------------------------------------------------------------------------------
# recorded traces


def read_trace_csv(path: str | Path) -> tuple[pd.Series, str]:
    """Read a carbon-intensity CSV in one of the shipped formats.

    Returns (series of g/kWh indexed by UTC time, region guessed from the file name).
    Formats: lets-wait-awhile (`Time`, `Carbon Intensity`; naive UTC) and EIA-930 via dc-rl
    (`timestamp` with offset, fuel columns, `avg_CI`).
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise ValueError(f"trace file not found: {path}")
    df = pd.read_csv(path)
    if {"Time", "Carbon Intensity"} <= set(df.columns):
        index = pd.to_datetime(df["Time"], utc=True)
        values = df["Carbon Intensity"]
    elif {"timestamp", "avg_CI"} <= set(df.columns):
        index = pd.to_datetime(df["timestamp"], utc=True)
        values = df["avg_CI"]
    else:
        raise ValueError(
            f"{path}: unknown trace format, columns {list(df.columns)[:6]}; expected "
            "('Time', 'Carbon Intensity') or ('timestamp', 'avg_CI')"
        )
    series = pd.Series(pd.to_numeric(values, errors="coerce").to_numpy(), index=index)
    stem = path.name.split(".")[0]
    region = stem.split("_")[1].upper() if stem.startswith("lwa_") else stem.split("_")[-1].upper()
    return series, region


class TraceSignal(SignalProvider):
    """A recorded intensity series; forecasts are the recorded future, optionally perturbed.

    `forecast_error` is the relative standard deviation of the forecast error at 24 h lead time;
    it grows with the square root of lead time and is seeded by (seed, issue step), so a run replays
    exactly. The current value is the recorded one (it is a measurement, not a forecast).
    """

    kind = "trace"

    def __init__(
        self,
        series: UniformSeries,
        region: str,
        *,
        price_per_kwh: float | None = None,
        forecast_error: float = 0.0,
        seed: int = 0,
    ) -> None:
        if forecast_error < 0:
            raise ValueError(f"forecast_error must be >= 0, got {forecast_error}")
        self.series = series
        self.region = region
        self.price_per_kwh = price_per_kwh
        self.forecast_error = forecast_error
        self.seed = seed

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        region: str | None = None,
        step_s: float = 900.0,
        replay_at_s: float | None = None,
        trace_from_s: float | None = None,
        **kwargs: Any,
    ) -> TraceSignal:
        """Load a shipped CSV, resample to `step_s`; with `replay_at_s`, trace time `trace_from_s`
        (default: the trace start) is replayed at simulated time `replay_at_s`."""
        raw, guessed = read_trace_csv(path)
        series = from_pandas(raw, step_s, name=Path(path).name)
        if replay_at_s is not None:
            series = series.replayed_at(replay_at_s, trace_from_s)
        return cls(series, region or guessed, **kwargs)

    def current(self, now_s: float) -> SignalPoint:
        return SignalPoint(now_s, self.series.at(now_s), self.price_per_kwh)

    def _forecast_arrays(self, now_s: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
        if horizon_s <= 0:
            return np.zeros(0), np.zeros(0)
        step = self.series.step_s
        first = self.series.start_s + math.floor((now_s - self.series.start_s) / step) * step
        times = np.arange(first, now_s + horizon_s, step)
        values = self.series.sample(times)
        times[0] = now_s
        if self.forecast_error > 0:
            lead_days = (times - now_s) / 86400.0
            issue = math.floor(now_s / self.series.step_s)
            rng = np.random.default_rng([self.seed, issue & 0x7FFFFFFF])
            noise = rng.standard_normal(len(values)) * self.forecast_error * np.sqrt(lead_days)
            values = np.maximum(values * (1.0 + noise), 0.0)
        return times, values

    def forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        times, values = self._forecast_arrays(now_s, horizon_s)
        return [
            SignalPoint(t, v, self.price_per_kwh)
            for t, v in zip(times.tolist(), values.tolist(), strict=True)
        ]

    def intensity_forecast(self, now_s: float, horizon_s: float) -> list[tuple[float, float]]:
        times, values = self._forecast_arrays(now_s, horizon_s)
        return list(zip(times.tolist(), values.tolist(), strict=True))

    def describe(self) -> str:
        err = f", forecast error {self.forecast_error:.0%} at 24 h" if self.forecast_error else ""
        return f"trace {self.series.name} for {self.region}, step {self.series.step_s:.0f} s{err}"


class ConstantSignal(SignalProvider):
    """The same intensity (and price) at all times."""

    kind = "constant"

    def __init__(
        self, region: str, intensity_g_per_kwh: float, price_per_kwh: float | None = None
    ) -> None:
        if not intensity_g_per_kwh >= 0:
            raise ValueError(f"intensity_g_per_kwh must be >= 0, got {intensity_g_per_kwh}")
        self.region = region
        self.intensity_g_per_kwh = float(intensity_g_per_kwh)
        self.price_per_kwh = price_per_kwh

    def current(self, now_s: float) -> SignalPoint:
        return SignalPoint(now_s, self.intensity_g_per_kwh, self.price_per_kwh)

    def forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        return [self.current(now_s)]


# --------------------------------------------------------------------------------------------------
# HTTP clients


class _HttpSignal(SignalProvider):
    """Shared HTTP plumbing: one httpx client, clear errors, a small forecast cache keyed on the
    caller's clock (no wall-clock reads here)."""

    def __init__(self, base_url: str, client: httpx.Client | None, cache_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client or httpx.Client(timeout=10.0)
        self.cache_s = cache_s
        self._cache: tuple[float, float, list[SignalPoint]] | None = None  # (fetched, horizon, pts)

    def _get(self, path: str, **kwargs: Any) -> Any:
        url = f"{self.base_url}{path}"
        try:
            resp = self.client.get(url, **kwargs)
        except httpx.HTTPError as exc:
            raise SignalError(f"{self.kind}: GET {url} failed: {exc}") from exc
        if resp.status_code != 200:
            raise SignalError(
                f"{self.kind}: GET {url} -> HTTP {resp.status_code}: {resp.text[:200]}"
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise SignalError(f"{self.kind}: GET {url} returned non-JSON") from exc

    @abstractmethod
    def _fetch_forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]: ...

    def forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        c = self._cache
        if c is None or now_s - c[0] >= self.cache_s or now_s < c[0] or horizon_s > c[1]:
            pts = sorted(self._fetch_forecast(now_s, horizon_s), key=lambda p: p.t_s)
            if not pts:
                raise SignalError(f"{self.kind}: empty forecast for {self.region}")
            self._cache = c = (now_s, horizon_s, pts)
        return points_window(c[2], now_s, horizon_s)


class ElectricityMapsSignal(_HttpSignal):
    """Electricity Maps v3: `carbon-intensity/latest`, `carbon-intensity/forecast` and, when
    `with_price`, `price-day-ahead/latest` (currency/MWh, returned per kWh). Header `auth-token`."""

    kind = "electricitymaps"

    def __init__(
        self,
        zone: str,
        token: str,
        *,
        base_url: str = "https://api.electricitymaps.com",
        client: httpx.Client | None = None,
        horizon_hours: int = 24,
        with_price: bool = False,
        cache_s: float = 900.0,
    ) -> None:
        super().__init__(base_url, client, cache_s)
        if not token:
            raise ValueError("electricitymaps: token is empty")
        self.region = zone
        self.headers = {"auth-token": token}
        self.horizon_hours = horizon_hours
        self.with_price = with_price

    def _price_per_kwh(self) -> float | None:
        if not self.with_price:
            return None
        body = self._get(
            "/v3/price-day-ahead/latest", params={"zone": self.region}, headers=self.headers
        )
        try:
            return float(body["value"]) / 1000.0
        except (KeyError, TypeError, ValueError) as exc:
            raise SignalError(
                f"electricitymaps: price answer has no numeric 'value': {body}"
            ) from exc

    def current(self, now_s: float) -> SignalPoint:
        body = self._get(
            "/v3/carbon-intensity/latest", params={"zone": self.region}, headers=self.headers
        )
        try:
            value = float(body["carbonIntensity"])
            t_s = parse_time_s(body["datetime"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SignalError(f"electricitymaps: unexpected latest answer: {body}") from exc
        return SignalPoint(t_s, value, self._price_per_kwh())

    def _fetch_forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        hours = max(self.horizon_hours, math.ceil(horizon_s / 3600))
        body = self._get(
            "/v3/carbon-intensity/forecast",
            params={"zone": self.region, "horizonHours": hours},
            headers=self.headers,
        )
        try:
            return [
                SignalPoint(parse_time_s(p["datetime"]), float(p["carbonIntensity"]))
                for p in body["forecast"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise SignalError(f"electricitymaps: unexpected forecast answer: {body}") from exc


class WattTimeSignal(_HttpSignal):
    """WattTime v3 (marginal MOER): `/login` (HTTP basic) gives a bearer token; `/v3/forecast`
    gives 5-min points in lbs CO2/MWh, converted to g/kWh. Marginal, not average, intensity."""

    kind = "watttime"

    def __init__(
        self,
        region: str,
        username: str,
        password: str,
        *,
        base_url: str = "https://api.watttime.org",
        client: httpx.Client | None = None,
        signal_type: str = "co2_moer",
        horizon_hours: int = 24,
        cache_s: float = 300.0,
    ) -> None:
        super().__init__(base_url, client, cache_s)
        if not username or not password:
            raise ValueError("watttime: username and password are required")
        self.region = region
        self.auth = (username, password)
        self.signal_type = signal_type
        self.horizon_hours = horizon_hours
        self._token: str | None = None

    def _login(self) -> str:
        body = self._get("/login", auth=self.auth)
        token = body.get("token") if isinstance(body, dict) else None
        if not token:
            raise SignalError(f"watttime: login answer has no token: {body}")
        return token

    def _authorized_get(self, path: str, params: dict[str, Any]) -> Any:
        for attempt in range(2):
            if self._token is None:
                self._token = self._login()
            try:
                return self._get(
                    path, params=params, headers={"Authorization": f"Bearer {self._token}"}
                )
            except SignalError as exc:
                if "HTTP 401" not in str(exc) or attempt == 1:
                    raise
                self._token = None  # expired (tokens last 30 min): log in again once
        raise AssertionError("unreachable")

    def _fetch_forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        hours = max(self.horizon_hours, math.ceil(horizon_s / 3600))
        body = self._authorized_get(
            "/v3/forecast",
            {"region": self.region, "signal_type": self.signal_type, "horizon_hours": hours},
        )
        try:
            units = body["meta"]["units"]
            factor = {"lbs_co2_per_mwh": G_PER_KWH_PER_LB_PER_MWH, "g_co2_per_kwh": 1.0}[units]
            return [
                SignalPoint(parse_time_s(p["point_time"]), float(p["value"]) * factor)
                for p in body["data"]
            ]
        except KeyError as exc:
            raise SignalError(f"watttime: unexpected forecast answer (missing {exc})") from exc
        except (TypeError, ValueError) as exc:
            raise SignalError(f"watttime: unexpected forecast answer: {exc}") from exc

    def current(self, now_s: float) -> SignalPoint:
        return self.forecast(now_s, 300.0)[0]


class GBCarbonIntensitySignal(_HttpSignal):
    """National Grid ESO carbon-intensity API (GB, no key). National (`/intensity`,
    `/intensity/{from}/fw48h`) or one DNO region (`/regional/regionid/{id}`,
    `/regional/intensity/{from}/fw48h/regionid/{id}`). Half-hourly, g/kWh."""

    kind = "gb"

    def __init__(
        self,
        *,
        regionid: int | None = None,
        base_url: str = "https://api.carbonintensity.org.uk",
        client: httpx.Client | None = None,
        cache_s: float = 1800.0,
    ) -> None:
        super().__init__(base_url, client, cache_s)
        self.regionid = regionid
        self.region = "GB" if regionid is None else f"GB-{regionid}"

    @staticmethod
    def _point(entry: Mapping[str, Any]) -> SignalPoint:
        intensity = entry["intensity"]
        value = intensity.get("actual")
        if value is None:
            value = intensity["forecast"]
        return SignalPoint(parse_time_s(entry["from"]), float(value))

    def current(self, now_s: float) -> SignalPoint:
        try:
            if self.regionid is None:
                body = self._get("/intensity")
                return self._point(body["data"][0])
            body = self._get(f"/regional/regionid/{self.regionid}")
            return self._point(body["data"][0]["data"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SignalError(f"gb: unexpected current answer ({exc!r})") from exc

    def _fetch_forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        start = _iso_minutes(now_s)
        try:
            if self.regionid is None:
                entries = self._get(f"/intensity/{start}/fw48h")["data"]
            else:
                body = self._get(f"/regional/intensity/{start}/fw48h/regionid/{self.regionid}")
                entries = body["data"]["data"]
            return [self._point(e) for e in entries]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SignalError(f"gb: unexpected forecast answer ({exc!r})") from exc


# --------------------------------------------------------------------------------------------------
# construction from a node's TOML


def parse_time_value(value: Any, where: str) -> float:
    """Unix seconds from a number, a TOML datetime or an ISO string; errors name `where`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            return parse_time_s(value)
        except SignalError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    raise ValueError(f"{where}: expected unix seconds or an ISO time, got {value!r}")


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    kind: str


TimeValue = float | datetime | Annotated[str, Field(max_length=64)]
Zone = Annotated[str, Field(min_length=1, max_length=64)]
EnvName = Annotated[str, Field(min_length=1, max_length=128)]
Price = Annotated[float, Field(ge=0, le=1e6)]


class TraceTable(_Table):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    region: Zone | None = None
    step_s: Annotated[float, Field(gt=0, le=86400)] = 900.0
    replay_at: TimeValue | None = None
    trace_from: TimeValue | None = None
    forecast_error: Annotated[float, Field(ge=0, le=10)] = 0.0
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    price_per_kwh: Price | None = None


class ConstantTable(_Table):
    region: Zone | None = None
    intensity_g_per_kwh: Annotated[float, Field(ge=0, le=1e5)]
    price_per_kwh: Price | None = None


class _HttpTable(_Table):
    base_url: Annotated[str, Field(max_length=2048)] | None = None
    cache_s: Annotated[float, Field(ge=0, le=86400)] | None = None

    def options(self, *names: str) -> dict[str, Any]:
        """The client settings given in the file (the rest keep the client's defaults)."""
        fields = ("base_url", "cache_s", *names)
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


class _ForecastTable(_HttpTable):
    horizon_hours: Annotated[int, Field(ge=1, le=24 * 14)] | None = None


class ElectricityMapsTable(_ForecastTable):
    zone: Zone | None = None
    token: Annotated[str, Field(max_length=4096)] | None = None
    token_env: EnvName = "ELECTRICITYMAPS_TOKEN"
    with_price: bool | None = None


class WattTimeTable(_ForecastTable):
    region: Zone | None = None
    username_env: EnvName = "WATTTIME_USERNAME"
    password_env: EnvName = "WATTTIME_PASSWORD"
    signal_type: Annotated[str, Field(max_length=64)] | None = None


class GbTable(_HttpTable):
    regionid: Annotated[int, Field(ge=1, le=17)] | None = None


T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class SignalTable:
    """What a signal builder gets: the TOML table, the region it defaults to, where relative paths
    start, the environment (for secrets) and an optional HTTP client (tests inject one)."""

    cfg: Mapping[str, Any]
    region: str | None
    base_dir: Path
    env: Mapping[str, str]
    client: httpx.Client | None = None

    @property
    def own_region(self) -> str | None:
        return self.cfg.get("region", self.cfg.get("zone", self.region))

    def parse(self, model: type[T]) -> T:
        """The table validated by a pydantic model (plugins may use it for their own kinds);
        errors name the field as `energy.signal.FIELD`."""
        try:
            return model.model_validate(dict(self.cfg))
        except ValidationError as exc:
            errors = [{**e, "loc": ("energy", "signal", *e["loc"])} for e in exc.errors()]
            raise ValueError(describe_errors(errors)) from exc


# kind -> builder(SignalTable) -> SignalProvider; plugins add kinds through the
# `gridswarm.signals` entry points
SIGNALS: Registry[Callable[[SignalTable], SignalProvider]] = Registry(
    "gridswarm.signals", "carbon-signal kind"
)


def signal_from_config(
    cfg: Mapping[str, Any],
    *,
    region: str | None = None,
    base_dir: str | Path = ".",
    env: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
) -> SignalProvider:
    """Build a provider from a TOML table such as
    `signal = {kind = "trace", path = "de.csv.gz", replay_at = "2026-06-01T00:00:00Z"}`.

    `region` is the node's `[energy] region`, the default for the signal's own region/zone.
    Secrets are never in the file: `token_env` / `username_env` / `password_env` name environment
    variables (defaults ELECTRICITYMAPS_TOKEN, WATTTIME_USERNAME, WATTTIME_PASSWORD).
    Raises ValueError naming the offending field.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"energy.signal: expected a table, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if not isinstance(kind, str) or kind not in SIGNALS:
        raise ValueError(f"energy.signal.kind: must be one of {SIGNALS.names()}, got {kind!r}")
    table = SignalTable(cfg, region, Path(base_dir), os.environ if env is None else env, client)
    provider = SIGNALS.get(kind)(table)
    if not isinstance(provider, SignalProvider):
        raise ValueError(f"energy.signal.kind {kind!r}: the plugin built no SignalProvider")
    return provider


def _trace(t: SignalTable) -> SignalProvider:
    cfg = t.parse(TraceTable)
    path = Path(cfg.path)
    times = {
        name: parse_time_value(value, f"energy.signal.{name}") if value is not None else None
        for name, value in (("replay_at", cfg.replay_at), ("trace_from", cfg.trace_from))
    }
    return TraceSignal.from_csv(
        path if path.is_absolute() else t.base_dir / path,
        region=t.own_region,
        step_s=cfg.step_s,
        replay_at_s=times["replay_at"],
        trace_from_s=times["trace_from"],
        price_per_kwh=cfg.price_per_kwh,
        forecast_error=cfg.forecast_error,
        seed=cfg.seed,
    )


def _constant(t: SignalTable) -> SignalProvider:
    cfg = t.parse(ConstantTable)
    if t.own_region is None:
        raise ValueError("energy.signal.region: required (or set [energy] region)")
    return ConstantSignal(t.own_region, cfg.intensity_g_per_kwh, cfg.price_per_kwh)


def _electricitymaps(t: SignalTable) -> SignalProvider:
    cfg = t.parse(ElectricityMapsTable)
    if t.own_region is None:
        raise ValueError("energy.signal.zone: required (or set [energy] region)")
    token = cfg.token or t.env.get(cfg.token_env, "")
    if not token:
        raise ValueError(
            f"energy.signal.token_env: environment variable {cfg.token_env!r} is not set"
        )
    options = cfg.options("horizon_hours", "with_price")
    return ElectricityMapsSignal(t.own_region, token, client=t.client, **options)


def _watttime(t: SignalTable) -> SignalProvider:
    cfg = t.parse(WattTimeTable)
    if t.own_region is None:
        raise ValueError("energy.signal.region: required (a WattTime region, e.g. CAISO_NORTH)")
    creds = []
    for field, name in (("username_env", cfg.username_env), ("password_env", cfg.password_env)):
        if not t.env.get(name):
            raise ValueError(f"energy.signal.{field}: environment variable {name!r} is not set")
        creds.append(t.env[name])
    options = cfg.options("horizon_hours", "signal_type")
    return WattTimeSignal(t.own_region, creds[0], creds[1], client=t.client, **options)


def _gb(t: SignalTable) -> SignalProvider:
    cfg = t.parse(GbTable)
    return GBCarbonIntensitySignal(regionid=cfg.regionid, client=t.client, **cfg.options())


for _kind, _builder in (
    ("trace", _trace),
    ("constant", _constant),
    ("electricitymaps", _electricitymaps),
    ("watttime", _watttime),
    ("gb", _gb),
):
    SIGNALS.register(_kind, _builder, builtin=True)
