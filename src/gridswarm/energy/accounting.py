"""Carbon accounting: per contribution, per node, per run, and the carbon-agnostic counterfactual.

Location-based, average intensity: grid energy is charged at the intensity of the node's region at
the time it was drawn; energy met by the node's own surplus at the PV lifecycle intensity (41 g/kWh
by default, the same lifecycle basis as the shipped grid traces). Pure functions over records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gridswarm.energy.policy import LOCAL_PV_INTENSITY_G_PER_KWH


def emissions_g(
    energy_wh: float,
    intensity_g_per_kwh: float,
    local_energy_wh: float = 0.0,
    local_intensity_g_per_kwh: float = LOCAL_PV_INTENSITY_G_PER_KWH,
) -> float:
    """Grid part at the grid intensity plus local part at the local intensity."""
    if energy_wh < 0 or local_energy_wh < 0 or intensity_g_per_kwh < 0:
        raise ValueError("energy and intensity must be >= 0")
    if local_energy_wh > energy_wh * (1 + 1e-9):
        raise ValueError(f"local_energy_wh {local_energy_wh} exceeds energy_wh {energy_wh}")
    grid_wh = max(energy_wh - local_energy_wh, 0.0)
    return (grid_wh * intensity_g_per_kwh + local_energy_wh * local_intensity_g_per_kwh) / 1000.0


@dataclass(frozen=True)
class ContributionEnergy:
    """Energy facts of one contribution (one node, one round). `emissions_g` is derived."""

    node_id: str
    region: str
    round_index: int
    start_s: float
    duration_s: float
    tokens: float
    energy_wh: float
    intensity_g_per_kwh: float  # grid intensity at region and time (grid-energy weighted)
    local_energy_wh: float = 0.0  # part met by the node's own surplus (PV / battery)
    method: str = "model"  # meter method that produced energy_wh
    local_intensity_g_per_kwh: float = LOCAL_PV_INTENSITY_G_PER_KWH
    emissions_g: float = field(init=False)

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.duration_s < 0:
            raise ValueError(
                f"contribution {self.node_id}/{self.round_index}: negative tokens/time"
            )
        object.__setattr__(
            self,
            "emissions_g",
            emissions_g(
                self.energy_wh,
                self.intensity_g_per_kwh,
                self.local_energy_wh,
                self.local_intensity_g_per_kwh,
            ),
        )

    @property
    def power_w(self) -> float:
        return self.energy_wh * 3600.0 / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def local_surplus_share(self) -> float:
        return self.local_energy_wh / self.energy_wh if self.energy_wh > 0 else 0.0


@dataclass(frozen=True)
class EnergyTotals:
    contributions: int
    tokens: float
    energy_kwh: float
    emissions_kg: float
    local_energy_kwh: float

    @property
    def g_per_1k_tokens(self) -> float:
        return self.emissions_kg * 1e6 / self.tokens if self.tokens > 0 else 0.0

    @property
    def local_surplus_share(self) -> float:
        return self.local_energy_kwh / self.energy_kwh if self.energy_kwh > 0 else 0.0

    @property
    def intensity_g_per_kwh(self) -> float:
        """Effective intensity of the energy used."""
        return self.emissions_kg * 1000.0 / self.energy_kwh if self.energy_kwh > 0 else 0.0


def totals(records: Iterable[ContributionEnergy]) -> EnergyTotals:
    n = tokens = wh = g = local_wh = 0.0
    for r in records:
        n += 1
        tokens += r.tokens
        wh += r.energy_wh
        g += r.emissions_g
        local_wh += r.local_energy_wh
    return EnergyTotals(int(n), tokens, wh / 1000.0, g / 1000.0, local_wh / 1000.0)


@dataclass(frozen=True)
class RunEnergyReport:
    total: EnergyTotals
    per_node: dict[str, EnergyTotals]
    per_region: dict[str, EnergyTotals]
    agnostic_emissions_kg: float | None = None

    @property
    def reduction_vs_agnostic(self) -> float | None:
        """1 − emissions / agnostic emissions (0.4 = 40 % less)."""
        if not self.agnostic_emissions_kg:
            return None
        return 1.0 - self.total.emissions_kg / self.agnostic_emissions_kg


def run_report(
    records: Sequence[ContributionEnergy], agnostic_emissions_g: float | None = None
) -> RunEnergyReport:
    """Totals per node, per region and for the run; optionally vs the agnostic counterfactual."""
    by_node: dict[str, list[ContributionEnergy]] = {}
    by_region: dict[str, list[ContributionEnergy]] = {}
    for r in records:
        by_node.setdefault(r.node_id, []).append(r)
        by_region.setdefault(r.region, []).append(r)
    return RunEnergyReport(
        total=totals(records),
        per_node={k: totals(v) for k, v in sorted(by_node.items())},
        per_region={k: totals(v) for k, v in sorted(by_region.items())},
        agnostic_emissions_kg=None if agnostic_emissions_g is None else agnostic_emissions_g / 1e3,
    )


def format_report(report: RunEnergyReport) -> str:
    """Plain-text table for `gridswarm run report`."""
    head = f"{'node':<18}{'tokens':>14}{'kWh':>10}{'kgCO2e':>10}{'g/1k tok':>10}{'local':>8}"
    lines = [head, "-" * len(head)]

    def row(name: str, t: EnergyTotals) -> str:
        return (
            f"{name:<18}{t.tokens:>14,.0f}{t.energy_kwh:>10.3f}{t.emissions_kg:>10.3f}"
            f"{t.g_per_1k_tokens:>10.4f}{t.local_surplus_share:>8.0%}"
        )

    lines += [row(k, v) for k, v in report.per_node.items()]
    lines += ["-" * len(head), row("run", report.total)]
    if report.agnostic_emissions_kg is not None:
        lines.append(
            f"agnostic counterfactual: {report.agnostic_emissions_kg:.3f} kgCO2e "
            f"(this run: {report.reduction_vs_agnostic:+.1%} less)"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class NodeProfile:
    node_id: str
    region: str
    tokens_per_s: float
    power_w: float


def agnostic_counterfactual_g(
    nodes: Sequence[NodeProfile],
    tokens_total: float,
    start_s: float,
    intensity_at: Callable[[str, float], float],
    step_s: float = 900.0,
) -> float:
    """Emissions (g) had every node run flat out from `start_s` until `tokens_total` was done.

    `intensity_at(node_id, t_s)` gives the effective g/kWh a node would have paid at t (its grid
    intensity, or lower where it has local surplus). Integrated with a midpoint rule on `step_s`.
    """
    rate = sum(n.tokens_per_s for n in nodes)
    if rate <= 0:
        raise ValueError("agnostic counterfactual needs nodes with tokens_per_s > 0")
    duration_s = tokens_total / rate
    steps = max(math.ceil(duration_s / step_s), 1)
    total_g = 0.0
    for k in range(steps):
        t0 = start_s + k * step_s
        dt = min(step_s, start_s + duration_s - t0)
        mid = t0 + dt / 2
        for n in nodes:
            total_g += n.power_w * dt / 3600.0 * intensity_at(n.node_id, mid) / 1000.0
    return total_g
