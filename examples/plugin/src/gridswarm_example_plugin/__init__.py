"""An example gridswarm plugin: what a user writes to add an aggregator, a codec, a carbon-signal
kind and a hub energy policy without editing gridswarm. Each object is named in this package's
`pyproject.toml` under one of gridswarm's entry-point groups."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gridswarm.energy.policy import HubEnergyPolicy, PlanInputs, PolicyDecision
from gridswarm.energy.signals import SignalPoint, SignalProvider, SignalTable
from gridswarm.train.aggregate import Aggregator
from gridswarm.train.params import BlobFormatError


class NormClippedMean(Aggregator):
    """Token-weighted mean after clipping every update to `factor` × the median update norm: one
    huge update cannot drag the mean far, and honest updates pass unchanged."""

    name = "norm-clipped-mean"
    uses_weights = True

    def __init__(self, factor: float = 2.0) -> None:
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = float(factor)

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        norms = updates.norm(dim=1)
        limit = self.factor * norms.median()
        scale = (limit / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (weights / weights.sum()) @ (updates * scale[:, None])


class BF16:
    """bfloat16 on the wire: 2 bytes per value, fp32's range, 8 bits of mantissa."""

    name = "bf16"

    def encode(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": vec.to(torch.bfloat16)}

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        values = tensors.get("values")
        if values is None or values.dtype != torch.bfloat16 or values.numel() != numel:
            raise BlobFormatError(f"bf16 payload must be {numel} bfloat16 values")
        return values.float()


def bf16_codec(_block_size: int) -> BF16:
    return BF16()


class DayNightSignal(SignalProvider):
    """A region whose grid is clean by day (solar) and dirty at night, in UTC hours."""

    kind = "day-night"

    def __init__(self, region: str, day_g: float, night_g: float, day_hours=(8, 18)) -> None:
        self.region, self.day_g, self.night_g = region, day_g, night_g
        self.day_start_h, self.day_end_h = day_hours

    def _intensity(self, t_s: float) -> float:
        hour = (t_s % 86400.0) / 3600.0
        return self.day_g if self.day_start_h <= hour < self.day_end_h else self.night_g

    def current(self, now_s: float) -> SignalPoint:
        return SignalPoint(now_s, self._intensity(now_s))

    def forecast(self, now_s: float, horizon_s: float) -> list[SignalPoint]:
        start = now_s - now_s % 3600.0
        hours = int(horizon_s // 3600.0) + 1
        return [
            SignalPoint(max(start + h * 3600.0, now_s), self._intensity(start + h * 3600.0))
            for h in range(hours)
        ]


class DayNightTable(BaseModel):
    """`signal = {kind = "day-night", day_g_per_kwh = 50, night_g_per_kwh = 400}`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    kind: str
    region: str | None = None
    day_g_per_kwh: float = Field(ge=0, lt=1e5)
    night_g_per_kwh: float = Field(ge=0, lt=1e5)


def day_night_signal(table: SignalTable) -> DayNightSignal:
    """Builds the provider; `table.parse` validates the fields and names any bad one."""
    cfg = table.parse(DayNightTable)
    if table.own_region is None:
        raise ValueError("energy.signal.region: required (or set [energy] region)")
    return DayNightSignal(table.own_region, cfg.day_g_per_kwh, cfg.night_g_per_kwh)


class EnergyEfficient(HubEnergyPolicy):
    """Fewest watt-hours per token: the most efficient machines now, just enough for the pace the
    deadline needs (for a sponsor who pays for energy rather than for carbon)."""

    name = "energy-efficient"

    def decide(self, p: PlanInputs) -> PolicyDecision:
        cap = p.round_tokens
        need = p.tokens_remaining / p.rounds_left * (1 + p.margin)
        if float(cap[p.available].sum()) * p.rounds_left < p.tokens_remaining:
            return PolicyDecision(p.everyone, "behind pace: all nodes", deadline_at_risk=True)
        ix = np.nonzero(p.available)[0]
        order = ix[np.argsort(p.costs.round_energy_wh[ix] / cap[ix], kind="stable")]
        before = np.cumsum(cap[order]) - cap[order]
        shares = np.zeros(len(cap))
        shares[order] = np.clip((need - before) / cap[order], 0.0, 1.0)
        return PolicyDecision(shares, "fewest Wh per token for the pace")
