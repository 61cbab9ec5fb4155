"""A fixed-seed set of hub planning cases (nodes with forecasts, PV, batteries, availability) that
pins `plan_round`'s decisions: `fixtures/plan_golden.json` holds the plans the reference
implementation made, and `test_policy.py` checks that every later implementation makes the same."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from gridswarm.energy.policy import HUB_POLICIES, NodeEnergyState, RoundEnergyPlan, plan_round

HOUR = 3600.0
FIXTURES = Path(__file__).parent / "fixtures"


def random_nodes(rng: np.random.Generator, n: int, now_s: float) -> list[NodeEnergyState]:
    nodes = []
    for i in range(n):
        times = now_s + np.arange(0, 30 * HOUR, 900.0)
        times[0] = now_s
        wave = 300 + 250 * np.sin(times / 86400 * 2 * np.pi + i)
        g = np.maximum(wave + rng.normal(0, 40, len(times)), 5)
        surplus = availability = None
        if i % 3 == 0:
            pv = np.maximum(np.sin((times - 6 * HOUR) / 86400 * 2 * np.pi), 0) * 3000 - 400
            surplus = list(zip(times.tolist(), pv.tolist(), strict=True))
        if i % 4 == 1:
            ok = ((times // HOUR) % 24) >= 18
            availability = list(zip(times.tolist(), ok.tolist(), strict=True))
        nodes.append(
            NodeEnergyState(
                node_id=f"n{i:02d}",
                region=f"R{i % 3}",
                tokens_per_s=float(rng.choice([8e3, 3e4, 4.5e4, 6e4])),
                power_w=float(rng.choice([70.0, 300.0, 320.0, 350.0])),
                available=bool(i % 5 != 2),
                intensity_forecast=list(zip(times.tolist(), g.tolist(), strict=True)),
                surplus_forecast_w=surplus,
                availability_forecast=availability,
                battery_available_wh=float(rng.choice([0.0, 500.0, 3000.0])) if i % 3 == 0 else 0.0,
            )
        )
    return nodes


def cases() -> list[dict]:
    """Every policy on twelve seeded situations: loads from idle to overloaded, deadlines from
    hours to days."""
    out = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        now_s = 1654473600.0 + seed * 7 * HOUR
        nodes = random_nodes(rng, 3 + seed, now_s)
        round_s = float(rng.choice([900.0, 1860.0, 3600.0]))
        deadline_s = now_s + float(rng.choice([2, 12, 40, 100])) * HOUR
        capacity = sum(n.tokens_per_s for n in nodes) * (deadline_s - now_s)
        tokens = float(rng.choice([0.05, 0.3, 0.7, 1.4])) * capacity
        for policy in HUB_POLICIES:
            plan = plan_round(policy, now_s, nodes, tokens, deadline_s, round_s, margin=0.1)
            out.append({"seed": seed, "policy": policy, "plan": plan_json(plan)})
    return out


def plan_json(plan: RoundEnergyPlan) -> dict:
    d = asdict(plan)
    d["planned_tokens_by_round"] = list(d["planned_tokens_by_round"])
    return d
