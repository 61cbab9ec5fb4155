"""How long the simulator takes: every hub energy policy at 1,000 and 10,000 nodes × one week.

    python bench/sim_scale.py --quick          # 1,000 nodes × 1 day and 10,000 nodes × 1 day
    python bench/sim_scale.py                  # 1,000 and 10,000 nodes × 7 days (the target)

The carbon benchmark's swarm (`sim.scenario`, 24 nodes over 9 recorded grids, a third of them
homes with PV and a battery) repeated to the node count, token target 35 % of the swarm's
capacity before the deadline. Reports wall and CPU time per policy (target: under 5 minutes for
10,000 nodes × a week), rounds, whether the deadline was met and the host's load (this machine is
shared: with a load above its core count, wall time reads slower than CPU time). Writes JSON
and a markdown table (same stem, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from gridswarm.energy.policy import HUB_POLICIES
from gridswarm.sim.scenario import ScenarioSpec, build_swarm, ts
from gridswarm.sim.swarm import SimConfig, simulate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "energy"
TARGET_S = 300.0
LOAD = 0.35


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one simulated day instead of seven")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--days", type=float, default=None)
    ap.add_argument("--policies", nargs="+", default=list(HUB_POLICIES), choices=HUB_POLICIES)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sim_scale.json")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"shared data not found at {args.data}", file=sys.stderr)
        return 2
    days = args.days or (1.0 if args.quick else 7.0)
    rows = []
    for target_nodes in args.nodes:
        spec = ScenarioSpec(copies=max(round(target_nodes / 24), 1))
        t = time.perf_counter()
        nodes = build_swarm(args.data, spec)
        build_s = time.perf_counter() - t
        start = ts(spec.start)
        wall_share = 1800.0 / 1860.0
        capacity = sum(n.tokens_per_s for n in nodes) * days * 86400.0 * wall_share
        cfg = SimConfig(
            start_s=start,
            deadline_s=start + days * 86400.0,
            tokens_target=LOAD * capacity,
            forecast_seed=spec.seed,
        )
        for policy in args.policies:
            load_before = os.getloadavg()[0]
            t, cpu = time.perf_counter(), time.process_time()
            res = simulate(policy, nodes, cfg)
            wall_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
            row = {
                "nodes": len(nodes),
                "days": days,
                "policy": policy,
                "wall_s": round(wall_s, 1),
                "cpu_s": round(cpu_s, 1),
                "build_s": round(build_s, 1),
                "rounds": res.rounds,
                "deferrals": res.deferrals,
                "replans": res.replans,
                "missed": res.missed,
                "deadline_met": res.deadline_met,
                "emissions_kg": round(res.report().total.emissions_kg, 1),
                "host_load": round((load_before + os.getloadavg()[0]) / 2, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "command": "python bench/sim_scale.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "cpus": os.cpu_count(),
        "target_s": TARGET_S,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Simulator scale",
        "",
        f"Command: `{report['command']}` ({report['cpus']} CPUs, shared; host load = 1-min "
        "load average during the run). Target: 10,000 nodes × 7 days under "
        f"{TARGET_S:.0f} s per policy.",
        "",
        "| nodes | days | policy | wall (s) | CPU (s) | rounds | deferrals | replans | missed | "
        "deadline met | kgCO2e | host load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['days']:g} | {r['policy']} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['rounds']} | "
            f"{r['deferrals']} | {r['replans']} | {r['missed']} | {r['deadline_met']} | "
            f"{r['emissions_kg']} | {r['host_load']} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
