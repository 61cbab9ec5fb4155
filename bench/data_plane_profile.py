"""Where one upload and one download through the hub spend their time (bench/data_plane.py's
side (a), profiled): the hub runs in this process (uvicorn on its own loop, the service's real
thread pools, SQLite, a local blob folder) with cProfile in every thread, and `--nodes` node
processes upload one int8 pseudo-gradient each and download the round's int8 delta, as in the
benchmark. Prints the wall time of each phase and the functions with the most own time over all
the hub's threads (their sum can exceed the wall time: threads run side by side, and hashing
and fsync release the GIL).

    python bench/data_plane_profile.py --nodes 1            # one upload, one download, alone
    python bench/data_plane_profile.py --nodes 8 --top 40   # the benchmark's concurrency
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import torch.multiprocessing as mp
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_plane import PRESETS, collect, node_worker, run_config
from gridswarm.hub.app import create_app
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubSettings
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import free_port
from star_floor import phases

PROFILES: list[cProfile.Profile] = []
CPU_CLOCK = True  # each thread's CPU seconds (time.thread_time), not wall time: see --wall
_GUARD = threading.Lock()


def _profile_this_thread(*_: object) -> None:
    """`threading.setprofile` hook: the first event of each new thread starts a cProfile
    profiler for that thread (which replaces this hook there)."""
    profile = cProfile.Profile(time.thread_time) if CPU_CLOCK else cProfile.Profile()
    with _GUARD:
        PROFILES.append(profile)
    profile.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1, choices=range(1, 9))
    parser.add_argument("--quick", action="store_true", help="0.83 M parameters")
    parser.add_argument("--top", type=int, default=30, help="functions to print")
    parser.add_argument("--callers", nargs="*", help="also who calls these (regexes)")
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--out", type=Path, help="also write the tables to this .md file")
    parser.add_argument(
        "--wall",
        action="store_true",
        help="profile wall time (waits for locks, the GIL and the disk included) instead of "
        "each thread's CPU time",
    )
    args = parser.parse_args()
    global CPU_CLOCK
    CPU_CLOCK = not args.wall
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dataplane-profile-"))
    service = build_service(
        f"sqlite:///{workdir / 'hub.db'}", workdir / "blobs", HubSettings(liveness_s=600)
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.setprofile(_profile_this_thread)  # every thread started from now on
    hub = threading.Thread(target=server.run, name="hub", daemon=True)
    hub.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    sponsor = HubClient(url, Identity.generate(), timeout_s=60)
    config = run_config(PRESETS["quick" if args.quick else "full"], 1)
    config["round"] |= {"quorum": args.nodes, "min_nodes": args.nodes, "max_nodes": args.nodes}
    created = sponsor.create_run(config)
    for profile in PROFILES:  # start counting with the nodes, not with the run's creation
        profile.clear()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.nodes), ctx.Queue()
    procs = []
    for i in range(args.nodes):
        home = workdir / f"node{i}"
        home.mkdir()
        node_args = (i, url, created.run_id, created.numel, 1, barrier, results, str(home))
        procs.append(ctx.Process(target=node_worker, args=node_args))
        procs[-1].start()
    try:
        records = collect(results, procs, 2 * args.nodes)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    print(httpx.get(f"{url}/healthz", timeout=30).json())
    server.should_exit = True
    hub.join(timeout=10)
    threading.setprofile(None)
    for name, rows in phases(records).items():
        for row in rows:
            wall, nbytes, nodes = row["wall_s"], row["bytes"], row["nodes"]
            print(f"{name}: {wall:.3f} s wall, {nbytes:,} bytes, {nodes} nodes")
    out = io.StringIO()
    stats = pstats.Stats(PROFILES[0], stream=out)
    for profile in PROFILES[1:]:
        stats.add(profile)
    summary = buckets(stats)
    stats.sort_stats(args.sort).print_stats(args.top)
    if args.callers:
        for pattern in args.callers:
            stats.print_callers(pattern)
    print(summary)
    print(out.getvalue())
    if args.out is not None:
        clock = "wall" if args.wall else "CPU (thread time)"
        lines = [
            f"# Data plane profile: {args.nodes} node(s), hub in process, {clock}",
            "",
            f"`python bench/data_plane_profile.py {' '.join(sys.argv[1:])}`; "
            + "; ".join(
                f"{name} {row['wall_s']:.3f} s wall"
                for name, rows in phases(records).items()
                for row in rows
            )
            + ".",
            "",
            summary,
            "",
            "```",
            out.getvalue().strip(),
            "```",
        ]
        args.out.write_text("\n".join(lines) + "\n")


# (label, file suffix, function, caller or None): cumulative seconds of these over all the hub's
# threads (with a caller: only what they cost when that function called them)
BUCKETS = (
    ("upload: Uploads.submit (checks, digests, blob write, rows)", "uploads.py", "submit", None),
    ("  its blob write + fsync (LocalBlobStore.put)", "blobs.py", "put", "submit"),
    ("  its update digest (claims.update_sha256)", "claims.py", "update_sha256", "submit"),
    ("  its unpack (safetensors load: one copy)", "params.py", "unpack", "submit"),
    ("  its rows, under the lock (_store_contribution)", "uploads.py", "_store_contribution", None),
    (
        "signatures (HubService.authenticate: sha256, Ed25519, nonce)",
        "service.py",
        "authenticate",
        None,
    ),
    (
        "download: Downloads.download (checks, download row)",
        "downloads.py",
        "download",
        None,
    ),
    ("download: read_span (the range's bytes from the file)", "blobs.py", "read_span", None),
    ("HTTP: uvicorn's request handling (ASGI app, routes)", "httptools_impl.py", "run_asgi", None),
    ("HTTP: body chunks arriving (uvicorn on_body)", "httptools_impl.py", "on_body", None),
    ("ticker: Ticker.tick (round state, pre-screening, the close)", "ticker.py", "tick", None),
    (
        "  the close: new version (aggregate, outer step, blobs, eval)",
        "closing.py",
        "compute_version",
        None,
    ),
)


def buckets(stats: pstats.Stats) -> str:
    """A table of BUCKETS' cumulative seconds and calls."""
    rows = ["| where | calls | seconds |", "|---|---|---|"]
    for label, suffix, function, caller in BUCKETS:
        calls = seconds = 0.0
        for (filename, _, name), (_, ncalls, _, cumtime, callers) in stats.stats.items():
            if name != function or not filename.endswith(suffix):
                continue
            if caller is None:
                calls, seconds = calls + ncalls, seconds + cumtime
                continue
            for (_, _, by), edge in callers.items():
                if by == caller:
                    calls, seconds = calls + edge[1], seconds + edge[3]
        rows.append(f"| {label} | {calls:.0f} | {seconds:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
