"""Uniform time series on a unix-seconds clock, replayable at any calendar time.

Carbon-intensity traces, PV output and household load all become a `UniformSeries`: a start time,
a fixed step and a value per step. Lookups are pure (a time in, a value out), so the live node (wall
clock) and the simulator (virtual clock) read them the same way. A recorded year can be replayed at
any simulated time by shifting it (`replayed_at`), and loops past its end when `loop=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas costs a hub ~0.7 s to import; only trace files need it
    import pandas as pd


@dataclass(frozen=True)
class UniformSeries:
    """Values every `step_s` seconds from unix time `start_s` (step-wise constant)."""

    start_s: float
    step_s: float
    values: np.ndarray
    loop: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        if self.step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {self.step_s}")
        values = np.asarray(self.values, dtype=float)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"series {self.name!r}: values must be a non-empty 1-D array")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"series {self.name!r}: values contain NaN or inf; resample first")
        object.__setattr__(self, "values", values)

    @property
    def duration_s(self) -> float:
        return self.step_s * len(self.values)

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def index_at(self, t_s: float | np.ndarray) -> np.ndarray:
        """Index of the step containing each time (wrapping when looping, clamping otherwise)."""
        k = np.floor((np.asarray(t_s, dtype=float) - self.start_s) / self.step_s).astype(np.int64)
        n = len(self.values)
        return np.mod(k, n) if self.loop else np.clip(k, 0, n - 1)

    def at(self, t_s: float) -> float:
        """Value in force at unix time `t_s`."""
        k = math.floor((t_s - self.start_s) / self.step_s)
        n = len(self.values)
        k = k % n if self.loop else min(max(k, 0), n - 1)
        return float(self.values[k])

    def sample(self, times_s: np.ndarray | list[float]) -> np.ndarray:
        """Values in force at each of `times_s` (vectorised `at`)."""
        return self.values[self.index_at(np.asarray(times_s, dtype=float))]

    def window(self, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """(step start, value) pairs for every step overlapping [t0_s, t1_s), first one at t0_s."""
        if t1_s <= t0_s:
            return []
        first = self.start_s + np.floor((t0_s - self.start_s) / self.step_s) * self.step_s
        starts = np.arange(first, t1_s, self.step_s)
        values = self.sample(starts)
        starts[0] = t0_s
        return [(float(t), float(v)) for t, v in zip(starts, values, strict=True)]

    def mean_between(self, t0_s: float, t1_s: float) -> float:
        """Time-weighted mean over [t0_s, t1_s)."""
        if t1_s <= t0_s:
            return self.at(t0_s)
        pts = self.window(t0_s, t1_s)
        edges = [t for t, _ in pts[1:]] + [t1_s]
        total = sum(v * (e - t) for (t, v), e in zip(pts, edges, strict=True))
        return total / (t1_s - t0_s)

    def replayed_at(self, sim_start_s: float, trace_start_s: float | None = None) -> UniformSeries:
        """The same series shifted so trace time `trace_start_s` (default: its start) falls at
        `sim_start_s`, e.g. replay the 2020 trace from any simulated date."""
        origin = self.start_s if trace_start_s is None else trace_start_s
        return replace(self, start_s=self.start_s + (sim_start_s - origin))

    def scaled(self, factor: float) -> UniformSeries:
        return replace(self, values=self.values * factor)


def from_pandas(
    series: pd.Series, step_s: float, *, name: str = "", loop: bool = True
) -> UniformSeries:
    """Resample a time-indexed series onto a uniform grid.

    Handles mixed steps (e.g. 30 min then 15 min) and NaN: values are averaged into `step_s` bins,
    empty bins are filled by time interpolation, the ends by the nearest value. A naive index is
    read as UTC.
    """
    import pandas as pd

    if not isinstance(series.index, pd.DatetimeIndex):
        raise ValueError(f"series {name!r}: index must be a DatetimeIndex")
    s = series.astype(float).sort_index()
    s = s[~s.index.duplicated(keep="first")]
    if s.index.tz is None:
        s.index = s.index.tz_localize("UTC")
    s = s.dropna()
    if s.empty:
        raise ValueError(f"series {name!r}: no finite values")
    binned = s.resample(pd.Timedelta(seconds=step_s)).mean()
    filled = binned.interpolate("time").ffill().bfill()
    start_s = filled.index[0].timestamp()
    return UniformSeries(start_s, float(step_s), filled.to_numpy(), loop=loop, name=name)
