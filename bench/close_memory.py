"""The memory the hub's close holds for a round's uploads while it aggregates them.

N uploads of a D-parameter model, int8-encoded as nodes send them, aggregated the two ways the
hub can (`train/aggregate.py` `EncodedRows`): `stacked`, every upload decoded into its row of
one `[N, D]` fp32 matrix (what the close did for every rule, and still does for Krum, the
geometric median, centered clipping and DP), and `columns`, the mean a block of columns at a
time from the payloads (what the close does now for the mean, median and trimmed mean). Each
side runs in a fresh process; reported: its peak RSS above the same process holding only the
payloads (their floor), in MiB and in fp32 models, and its wall time. The two results are
checked to be the same bits.

    python bench/close_memory.py --params 10000000 --nodes 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def one_side(side: str, params: int, nodes: int) -> dict:
    """In this process: encode the uploads, then aggregate them `side`'s way."""
    import torch

    from gridswarm.train.aggregate import EncodedRows, make_aggregator
    from gridswarm.train.codecs import make_codec

    gen = torch.Generator().manual_seed(0)
    codec = make_codec("int8", 256)
    payloads = [codec.encode(torch.randn(params, generator=gen) * 1e-3) for _ in range(nodes)]
    weights = torch.ones(nodes)
    mean = make_aggregator("mean")
    uploads = EncodedRows(codec, payloads, params)
    del payloads
    reset_peak()
    floor = peak_rss_bytes()
    started = time.perf_counter()
    if side == "stacked":
        result = mean(uploads.stacked(), weights)
    else:
        result = uploads.aggregate(mean, weights)
    wall_s = time.perf_counter() - started
    above = peak_rss_bytes() - floor
    checksum = int(result.view(torch.int32).to(torch.int64).sum())
    return {
        "above_mib": above / MIB,
        "models": above / (4 * params),
        "wall_s": wall_s,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=Path, default=None, help="JSON (and .md beside it)")
    parser.add_argument("--side", choices=("stacked", "columns"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # the child: one measurement, as JSON on stdout
        import torch

        torch.set_num_threads(1)
        print(json.dumps(one_side(args.side, args.params, args.nodes[0])))
        return
    rows = []
    for nodes in args.nodes:
        got = {}
        for side in ("stacked", "columns"):
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--params",
                    str(args.params),
                    "--nodes",
                    str(nodes),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            got[side] = json.loads(child.stdout)
            print(f"{nodes} nodes, {side}: {got[side]}", file=sys.stderr)
        if got["stacked"]["checksum"] != got["columns"]["checksum"]:
            raise SystemExit("the two ways gave different results")
        rows.append({"nodes": nodes, **{s: got[s] for s in got}})
    doc = {
        "command": "python bench/close_memory.py " + " ".join(sys.argv[1:]),
        "params": args.params,
        "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "rows": rows,
    }
    lines = [
        "# The close's memory while it aggregates a round",
        "",
        f"`{doc['command']}`",
        "",
        f"{args.params:,} parameters, int8 uploads, the mean; load average {doc['load_average']}. "
        "Peak RSS above the process holding the payloads, MiB (fp32 models); wall s. Same bits "
        "both ways (checked). Oracle: 0 above the payloads, plus the one fp32 result.",
        "",
        "| nodes | stacked rows | by columns | stacked wall s | by columns wall s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        st, co = r["stacked"], r["columns"]
        lines.append(
            f"| {r['nodes']} | {st['above_mib']:,.0f} ({st['models']:.1f}) "
            f"| {co['above_mib']:,.0f} ({co['models']:.1f}) "
            f"| {st['wall_s']:.2f} | {co['wall_s']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
