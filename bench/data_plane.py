"""Data-plane benchmark: one DiLoCo round's data movement through the hub, with presigned
downloads from S3, and against a gloo all-reduce of the same model. Side by side in one run:

  (a) hub: a real hub process (local blob folder) and 8 signed node processes; each uploads its
      int8 pseudo-gradient (the project's int8 codec, packed and signed as a node does) to the
      hub's contribution route, the hub closes the round (not timed), then each downloads the
      int8 model update (the hub's own int8 delta) from the hub's blob route;
  (b) hub + S3: the same with the hub on `--blobs s3://` against a moto S3 server process:
      uploads go through the hub (which writes them to S3), downloads are 307 redirects to
      presigned URLs served by moto, each Range still checked against its sha256;
  (c) gloo: 8 processes all-reduce the same number of float32 values with torch.distributed
      (backend gloo, 127.0.0.1): what synchronous data parallel moves per step;
  (f0-f2) the floor under (a) (bench/star_floor.py): the same star, 8 client processes and one
      server process, the same upload and download sizes, over plain loopback TCP: (f0) the
      bytes alone; (f1) plus the hashes and signatures a hub and its nodes cannot skip (the
      request signature's sha256 of the body, which also names the blob, the update digest the
      node's claim signs, the node's check of its download); (f2) plus the durable store
      before the acknowledgement (write, fsync, rename, folder fsync, one fsynced journal
      record for the committed row).

Wall seconds of a phase = last finish - first start over the 8 processes, which start together
at a barrier; a hub round's data movement = upload phase + download phase (the hub's close in
between, aggregation + outer step + eval, is compute and not counted). Every process runs with
`torch.set_num_threads(1)`. Everything (hub, moto, 8 nodes) shares this machine's cores, so the
figures measure loopback and CPU contention, not a network.

    python bench/data_plane.py --quick --out bench/results/data_plane_quick.json
    python bench/data_plane.py --out bench/results/data_plane.json   # 8 x 10 M parameters
    PYTHONPATH=OTHER/src python bench/data_plane.py --no-s3 --no-floor  # another tree's hub
    TMPDIR=/dev/shm python bench/data_plane.py --no-s3   # hub, nodes and floor on tmpfs

Where one upload and one download spend their time in the hub: bench/data_plane_profile.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gridswarm.blobs import open_blob_store
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.protocol import ContributionMeta, RegisterRequest
from gridswarm.swarm import Swarm, free_port, plain_http
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from gridswarm.trust.claims import sign_contribution

sys.path.insert(0, str(Path(__file__).resolve().parent))
from star_floor import phases, star_side

NODES = 8
PRESETS = {  # built-in GPT shapes: full = 10.7 M parameters, quick = 0.83 M
    "full": {"n_layer": 6, "n_head": 6, "n_embd": 384},
    "quick": {"n_layer": 4, "n_head": 4, "n_embd": 128},
}
TIMEOUT_S = 900.0


def run_config(model: dict, rounds: int) -> dict:
    """A run whose rounds wait for all 8 nodes and judge nothing by replay (the benchmark moves
    bytes; the node processes do not train)."""
    return {
        "name": "bench-data-plane",
        "seed": 11,
        "model": {"kind": "gpt", **model},
        "train": {"seq_len": 64, "batch_size": 4, "inner_steps": 1, "min_inner_steps": 1},
        "data": {"eval_batches": 1},
        "comm": {"codec": "int8", "codec_down": "int8"},
        "round": {"deadline_s": 3600, "quorum": NODES, "min_nodes": NODES, "max_nodes": NODES},
        "trust": {"audit_max_rate": 0.0, "audit_min_rate": 0.0, "usefulness": False},
        "budget": {"rounds": rounds + 1},  # one more: its assignment carries the last delta
    }


def node_worker(
    i: int, url: str, run_id: str, numel: int, rounds: int, barrier, results, home: str
) -> None:
    """One node: register, then per round take the assignment (from round 1 on, download the
    delta it names), upload an int8 pseudo-gradient; report each phase's start and end."""
    torch.set_num_threads(1)
    identity = Identity.generate()
    client = HubClient(url, identity, timeout_s=TIMEOUT_S, retry_for_s=TIMEOUT_S)
    client.register(RegisterRequest(probe_tokens_per_s=1e4, probe_numel=1_000_000, name=f"b{i}"))
    generator = torch.Generator().manual_seed(1000 + i)
    for r in range(rounds + 1):
        answer = client.assignment(run_id, wait_s=15)
        deadline = time.monotonic() + TIMEOUT_S
        while answer.status != "assigned" and time.monotonic() < deadline:
            answer = client.assignment(run_id, wait_s=15)
        a = answer.assignment
        if r > 0:  # the int8 update from the version this node had to the new one
            barrier.wait()
            t0 = time.time()
            n = client.fetch_blob(a.delta_blob, Path(home) / f"{a.delta_blob}.part")
            results.put(("down", r - 1, i, t0, time.time(), n))
        if r == rounds:
            break
        cfg = a.config["train"]
        codec = make_codec("int8", a.config["comm"].get("block_size", 256))
        tensors = codec.encode(torch.randn(numel, generator=generator) * 1e-3)
        meta = ContributionMeta(
            assignment_id=a.id,
            codec="int8",
            steps=a.inner_steps,
            tokens=a.inner_steps * cfg["seq_len"] * cfg["batch_size"],
            loss_first=5.5,
            loss_last=5.4,
            loss_mean=5.45,
            train_time_s=1.0,
            threads=1,
        )
        claim = sign_contribution(identity, run_id, a.round, tensors, meta.model_dump())
        body = pack(tensors, meta.model_copy(update={"claim": claim}).model_dump())
        barrier.wait()
        t0 = time.time()
        ack = client.contribute(run_id, body)
        results.put(("up", r, i, t0, time.time(), ack.bytes_up))
    client.leave()
    client.close()


def collect(results, procs: list, count: int) -> list[tuple]:
    """`count` records from the workers; fails at once if a worker died (its traceback is on
    stderr), or after TIMEOUT_S."""
    records: list[tuple] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(records) < count:
        try:
            records.append(results.get(timeout=2))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a worker process failed (see its traceback above)") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(records)} of {count} records after {TIMEOUT_S} s"
                ) from None
    return records


def plain_http_env() -> dict:
    """The hub's environment without httptools and uvloop (bench/hub_load.py `plain_http`):
    uvicorn's "auto" falls back to h11 and asyncio."""
    shim = plain_http(Path(tempfile.mkdtemp(prefix="bench-plain-http-")))
    src = Path(__file__).resolve().parent.parent / "src"
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(src)])}


def hub_side(model: dict, rounds: int, blobs: str | None, env: dict) -> dict:
    """Sides (a) and (b): a hub process (+ moto when `blobs` is s3://) and 8 node processes."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    swarm = Swarm(workdir, free_port(), liveness_s=600)
    swarm.env.update(env)
    swarm.blobs = blobs
    ctx = mp.get_context("spawn")
    procs = []
    try:
        swarm.start_hub(timeout_s=120)
        sponsor = HubClient(swarm.url, Identity.generate(), timeout_s=TIMEOUT_S)
        created = sponsor.create_run(run_config(model, rounds))
        barrier, results = ctx.Barrier(NODES), ctx.Queue()
        for i in range(NODES):
            home = workdir / f"node{i}"
            home.mkdir()
            args = (
                i,
                swarm.url,
                created.run_id,
                created.numel,
                rounds,
                barrier,
                results,
                str(home),
            )
            procs.append(ctx.Process(target=node_worker, args=args))
            procs[-1].start()
        records = collect(results, procs, 2 * rounds * NODES)
        for p in procs:
            p.join(timeout=60)
        counters = httpx.get(f"{swarm.url}/healthz", timeout=30).json()["blobs"]
        return {"numel": created.numel, **phases(records), "hub_blob_route": counters}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        swarm.stop()


def gloo_worker(rank: int, port: int, numel: int, reps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NODES
    )
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    for r in range(reps):
        dist.barrier()
        t0 = time.time()
        dist.all_reduce(tensor)
        results.put(("allreduce", r, rank, t0, time.time(), 4 * numel))
    dist.barrier()
    dist.destroy_process_group()


def gloo_side(numel: int, reps: int) -> dict:
    """Side (c): 8 gloo processes all-reduce `numel` float32 values `reps` times."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=gloo_worker, args=(rank, port, numel, reps, results))
        for rank in range(NODES)
    ]
    for p in procs:
        p.start()
    records = collect(results, procs, reps * NODES)
    for p in procs:
        p.join(timeout=60)
    walls = []
    for r in range(reps):
        recs = [x for x in records if x[1] == r]
        walls.append(max(x[4] for x in recs) - min(x[3] for x in recs))
    return {
        "numel": numel,
        "wall_s": walls,
        "ring_bytes_per_worker": 2 * (NODES - 1) / NODES * 4 * numel,
    }


def start_moto() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    os.environ.update(env)  # for this process's bucket creation
    open_blob_store("s3://bench-data-plane/hub").ensure_bucket()
    return proc, env


FLOORS = {  # side key -> (star_floor level, label)
    "floor_transport": ("transport", "(f0) floor: the star over plain loopback TCP, bytes only"),
    "floor_verified": ("verified", "(f1) floor + signatures and hashes (body, update, download)"),
    "floor_durable": ("durable", "(f2) floor + durable store before the ack (write, fsync)"),
}


def floor_sides(hub: dict, rounds: int) -> dict:
    """Sides (f0)-(f2): the star floor at each level with side (a)'s upload and download sizes
    per node."""
    up_bytes = hub["up"][0]["bytes"] // NODES
    down_bytes = hub["down"][0]["bytes"] // NODES
    out = {}
    for key, (level, _) in FLOORS.items():
        out[key] = star_side(NODES, up_bytes, down_bytes, rounds, level)
        print(f"{key}:", round_walls(out[key]), flush=True)
    return out


def round_walls(side: dict) -> list[float]:
    return [u["wall_s"] + d["wall_s"] for u, d in zip(side["up"], side["down"], strict=True)]


def markdown(result: dict) -> str:
    g = statistics.median(result["gloo"]["wall_s"])
    rows = []
    sides = (
        ("hub_plain", "(a0) through the hub, plain HTTP (h11, asyncio loop), run first"),
        ("hub", "(a) through the hub"),
        ("hub_plain_after", "(a1) through the hub, plain HTTP again, run after (a)"),
        ("s3", "(b) up via hub, down presigned S3"),
        ("gloo", "(c) gloo all-reduce, fp32"),
        *((key, label) for key, (_, label) in FLOORS.items()),
    )
    for key, label in sides:
        if key == "gloo":
            rows.append(f"| {label} | – | – | **{g:.3f}** | 1.00× | – |")
            continue
        if key not in result:
            continue
        side = result[key]
        walls = round_walls(side)
        up = statistics.median(u["wall_s"] for u in side["up"])
        down = statistics.median(d["wall_s"] for d in side["down"])
        w = statistics.median(walls)
        served = side.get("hub_blob_route")
        route = f"{served['served']} / {served['redirected']}" if served else "–"
        rows.append(f"| {label} | {up:.3f} | {down:.3f} | **{w:.3f}** | {w / g:.2f}× | {route} |")
    numel = result["hub"]["numel"]
    return "\n".join(
        [
            f"# Data plane: one round, {NODES} nodes × {numel / 1e6:.2f} M parameters",
            "",
            f"`{result['command']}` on {result['machine']}; medians over "
            f"{len(result['hub']['up'])} rounds (hub sides) and {len(result['gloo']['wall_s'])} "
            "all-reduces (gloo). Int8 up (the project's codec, signed, packed) and int8 down "
            "(the hub's own delta); the round's close between the two phases is not counted.",
            "",
            "| side | upload s | download s | round s | / gloo | hub blobs served / redirected |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Target: within 2× of gloo. Honest limits: the hub, the moto S3 server and all 8 node",
            "processes run on the same machine (2 cores here), so this measures loopback and CPU",
            "contention, not a network; moto is an in-memory Python server, slower than real S3.",
            "The upload phase is the same route in (a) and (b) (in (b) the hub also writes each",
            "upload to S3); each contribution's costly checks (size and finite checks on the int8",
            "scales, hashes, the blob write) run outside the hub's lock, side by side; the",
            "decisions and the commit run one at a time under it. (f0)-(f2) are the floor under",
            "(a): the same star and sizes with only TCP, then what no hub can skip",
            "(bench/star_floor.py).",
            "Bytes per round: up "
            + ", ".join(f"{result[k]['up'][0]['bytes']:,}" for k in ("hub", "s3") if k in result)
            + f"; down {result['hub']['down'][0]['bytes']:,}; gloo ring all-reduce "
            f"{result['gloo']['ring_bytes_per_worker'] * NODES:,.0f} (all workers).",
            *floor_costs(result),
        ]
    )


def floor_costs(result: dict) -> list[str]:
    """The durable floor's server steps, summed over its uploads (CPU seconds; the stores'
    wall seconds too, fsync waits included)."""
    side = result.get("floor_durable")
    if side is None:
        return []
    c, uploads = side["server_costs"], sum(u["nodes"] for u in side["up"])
    ms = {k: 1e3 * v / uploads for k, v in c.items()}
    return [
        "",
        f"(f2)'s server per upload ({uploads} uploads): signature check (sha256 of the body + "
        f"Ed25519) {ms['verify_cpu_s']:.1f} ms CPU, update digest {ms['update_hash_cpu_s']:.1f} "
        f"ms CPU, durable store {ms['store_cpu_s']:.1f} ms CPU and {ms['store_wall_s']:.1f} ms "
        "wall (the fsyncs of 8 uploads at once wait on the disk and on each other).",
    ]


READING = "<!-- reading: kept when the table above is written again -->"


def write_markdown(path: Path, result: dict) -> None:
    """The table and its notes; what follows the READING marker in an existing file (a
    reading of the figures, by hand) is kept."""
    kept = ""
    if path.exists() and READING in (old := path.read_text()):
        kept = "\n" + old[old.index(READING) :]
    path.write_text(markdown(result) + "\n" + kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="0.83 M parameters, 1 round (the floors: 3)"
    )
    parser.add_argument(
        "--plain-http",
        action="store_true",
        help="also run side (a) with the hub on uvicorn's pure-Python HTTP (h11) and asyncio's "
        "loop: httptools and uvloop hidden from it (before/after they became dependencies)",
    )
    parser.add_argument("--no-s3", action="store_true", help="leave side (b) out")
    parser.add_argument("--no-floor", action="store_true", help="leave sides (f0)-(f2) out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_plane.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = PRESETS["quick" if args.quick else "full"]
    rounds = 1 if args.quick else 3
    moto, env = start_moto()
    try:
        result: dict = {
            "command": "python bench/data_plane.py"
            + (" --quick" if args.quick else "")
            + (" --plain-http" if args.plain_http else "")
            + (" --no-s3" if args.no_s3 else "")
            + (" --no-floor" if args.no_floor else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        if args.plain_http:
            result["hub_plain"] = hub_side(model, rounds, None, plain_http_env())
            print("hub, plain HTTP:", round_walls(result["hub_plain"]), flush=True)
        result["hub"] = hub_side(model, rounds, None, {})
        print("hub:", round_walls(result["hub"]), flush=True)
        if args.plain_http:  # before and after (a): the machine's drift shows
            result["hub_plain_after"] = hub_side(model, rounds, None, plain_http_env())
            print("hub, plain HTTP again:", round_walls(result["hub_plain_after"]), flush=True)
        if not args.no_s3:
            result["s3"] = hub_side(model, rounds, "s3://bench-data-plane/hub", env)
            print("hub + S3:", round_walls(result["s3"]), flush=True)
        result["gloo"] = gloo_side(result["hub"]["numel"], reps=3)
        print("gloo:", result["gloo"]["wall_s"], flush=True)
        if not args.no_floor:
            result |= floor_sides(result["hub"], max(rounds, 3))
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    g = statistics.median(result["gloo"]["wall_s"])
    sides = ("hub_plain", "hub", "hub_plain_after", "s3", *FLOORS)
    for key in [k for k in sides if k in result]:
        result[key]["round_wall_s"] = round_walls(result[key])
        result[key]["ratio_to_gloo"] = statistics.median(result[key]["round_wall_s"]) / g
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    write_markdown(args.out.with_suffix(".md"), result)
    print(markdown(result))


if __name__ == "__main__":
    main()
