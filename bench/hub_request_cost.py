"""Hub CPU per request, endpoint by endpoint: what each step of one round costs a real hub.

`bench/hub_load.py` measures a swarm's steady state, where every kind of request is mixed and
queued; this takes one round apart. One real `gridswarm hub` process on SQLite, N signed nodes
(the load generator's hand-written HTTP client, `hub_load.Connection`, 64 connections in
parallel), one run whose round takes all of them, and each phase on its own: N registrations,
N heartbeats, N asks for work (`wait_s=0`), N downloads of the round's model, N uploads of a
small int8 contribution, then the close. Reported per phase: the hub's CPU milliseconds per
request (user + system, from /proc) and wall milliseconds per request. Beside them, the floors
no hub endpoint in this stack can go under: `healthz`, an unsigned GET answered from memory
(uvicorn and FastAPI alone), and `heartbeat`, a signed request that does nothing but verify its
signature, spend its nonce and note the node in memory. A node's round takes at least three
signed requests (its ask, its download, its upload), so three heartbeats are the floor of the
hub's CPU per node-round here. `--baseline-src` runs
the same phases against another checkout's hub right after (before/after in one invocation;
this machine is noisy: read the ratios). `--baseline-hub-arg` gives the baseline's hub an
option of its own instead (the same checkout with and without something), and `--swap` runs
this side first (does the order explain the difference?).

    python bench/hub_request_cost.py --nodes 1000 --baseline-src /tmp/base/src
    python bench/hub_request_cost.py --nodes 300 --baseline-hub-arg=--no-metrics
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np

import hub_load  # beside this file: the light node's HTTP client, the run, the contribution
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API, ContributionMeta, HeartbeatRequest, RegisterRequest
from gridswarm.swarm import Swarm, free_port

PARALLEL = 64  # connections, and requests in flight
PHASES = ("healthz", "register", "heartbeat", "ask", "download", "upload")
ROUND = ("ask", "download", "upload")  # the requests of one node-round
Request = Callable[[hub_load.Connection, int, Identity], Awaitable[hub_load.Response]]


async def signed(
    conn: hub_load.Connection, who: Identity, method: str, path: str, body: bytes = b"", query=""
) -> hub_load.Response:
    response = await conn.request(
        method, path + query, body, sign_request(who, method, path, body), 120
    )
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.content[:300]!r}")
    return response


async def each(port: int, nodes: list[Identity], request: Request) -> list[hub_load.Response]:
    """`request` once per node, PARALLEL at a time over PARALLEL keep-alive connections."""
    conns = [hub_load.Connection("127.0.0.1", port) for _ in range(PARALLEL)]
    gate = asyncio.Semaphore(PARALLEL)
    answers: list = [None] * len(nodes)

    async def one(i: int, who: Identity) -> None:
        async with gate:
            answers[i] = await request(conns[i % PARALLEL], i, who)

    try:
        await asyncio.gather(*(one(i, who) for i, who in enumerate(nodes)))
    finally:
        for conn in conns:
            conn.close()
    return answers


def measure(
    hub_src: Path | None, n: int, workdir: Path, hub_args: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Every phase of one round against a hub from `hub_src` (None: this checkout), started
    with `hub_args` besides the usual options."""
    workdir.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(workdir, free_port(), liveness_s=600.0)
    if hub_src is not None:
        swarm.env["PYTHONPATH"] = str(hub_src.resolve())
    swarm.hub_extra += ["--register-per-net-hour", "0", "--max-new-nodes", "0", *(hub_args or [])]
    swarm.start_hub(timeout_s=240.0)
    try:
        nodes = [Identity.generate() for _ in range(n)]
        cfg = hub_load.run_config(n, 3600.0)
        cfg["round"] |= {"min_nodes": n, "quorum": n}  # the round takes every node
        body = json.dumps({"config": cfg}).encode()
        sponsor = Identity.generate()
        run = httpx.post(
            f"{swarm.url}{API}/runs",
            content=body,
            headers=sign_request(sponsor, "POST", f"{API}/runs", body),
            timeout=60,
        ).json()
        run_id, numel = run["run_id"], run["numel"]
        work: list[dict] = []
        rng = np.random.default_rng(0)

        async def healthz(conn, _i, _who):
            response = await conn.request("GET", "/healthz", b"", {}, 120)
            if response.status_code != 200:
                raise RuntimeError(f"/healthz: {response.status_code}")
            return response

        async def register(conn, _i, who):
            req = RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1_000_000)
            return await signed(
                conn, who, "POST", f"{API}/nodes/register", req.model_dump_json().encode()
            )

        async def heartbeat(conn, _i, who):
            req = HeartbeatRequest(status="idle").model_dump_json().encode()
            return await signed(conn, who, "POST", f"{API}/nodes/heartbeat", req)

        async def ask(conn, _i, who):
            path = f"{API}/runs/{run_id}/assignment"
            return await signed(conn, who, "POST", path, query="?wait_s=0")

        async def download(conn, i, who):
            a = work[i]
            return await signed(
                conn, who, "GET", f"{API}/blobs/{a['delta_blob'] or a['weights_blob']}"
            )

        async def upload(conn, i, who):
            a = work[i]
            meta = ContributionMeta(
                assignment_id=a["id"],
                codec="int8",
                steps=a["inner_steps"],
                tokens=a["inner_steps"] * 32,
                loss_first=5.5,
                loss_last=5.0,
                loss_mean=5.2,
                train_time_s=5.0,
                threads=1,
            )
            blob = hub_load.contribution_blob(rng, numel, 256, meta)
            return await signed(conn, who, "POST", f"{API}/runs/{run_id}/contributions", blob)

        requests: dict[str, Request] = {
            "healthz": healthz,
            "register": register,
            "heartbeat": heartbeat,
            "ask": ask,
            "download": download,
            "upload": upload,
        }
        out: dict[str, dict[str, float]] = {}
        for phase in PHASES:
            cpu0, wall0 = hub_load.cpu_s(swarm.hub.pid), time.monotonic()
            answers = asyncio.run(each(swarm.port, nodes, requests[phase]))
            cpu1, wall1 = hub_load.cpu_s(swarm.hub.pid), time.monotonic()
            out[phase] = {"cpu_ms": 1000 * (cpu1 - cpu0) / n, "wall_ms": 1000 * (wall1 - wall0) / n}
            if phase == "ask":
                work = [r.json()["assignment"] for r in answers]  # every node got a place
            hub_load.log(f"{phase}: {out[phase]['cpu_ms']:.2f} ms of hub CPU per request")
        return out
    finally:
        swarm.stop()


def markdown(doc: dict) -> str:
    sides = list(doc["results"])
    lines = [
        "# Hub CPU per request, by endpoint",
        "",
        f"`{doc['command']}`",
        "",
        f"{doc['nodes']} nodes, {PARALLEL} requests in flight, one round, SQLite; load average "
        f"before: {doc['load_average']}. Hub CPU (user + system) per request, ms; wall per request "
        "in brackets.",
        "",
        "| endpoint | " + " | ".join(sides) + (" | ratio |" if len(sides) == 2 else " |"),
        "|---|" + "---|" * (len(sides) + (len(sides) == 2)),
    ]
    for phase in PHASES:
        cells = [
            f"{doc['results'][s][phase]['cpu_ms']:.2f} ({doc['results'][s][phase]['wall_ms']:.2f})"
            for s in sides
        ]
        if len(sides) == 2:
            a, b = (doc["results"][s][phase]["cpu_ms"] for s in sides)
            cells.append(f"{b / a:.2f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "One node-round (its ask, download and upload) against the floors of the same stack, "
        "hub CPU ms:",
        "",
        "| side | node-round | floor: 3 signed requests (heartbeat) | floor: 3 HTTP (healthz) |",
        "|---|---|---|---|",
    ]
    for side in sides:
        got = doc["results"][side]
        lines.append(
            f"| {side} | {sum(got[p]['cpu_ms'] for p in ROUND):.2f} "
            f"| {3 * got['heartbeat']['cpu_ms']:.2f} | {3 * got['healthz']['cpu_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--baseline-src", type=Path, default=None, help="another checkout's src/")
    parser.add_argument("--hub-src", type=Path, default=None, help="run this side's hub from here")
    parser.add_argument(
        "--baseline-hub-arg",
        action="append",
        default=[],
        help="an option for the baseline's hub only (repeat for more), e.g. --no-metrics",
    )
    parser.add_argument("--swap", action="store_true", help="measure this side first")
    parser.add_argument("--out", type=Path, default=None, help="JSON (and .md beside it)")
    args = parser.parse_args()
    doc: dict = {
        "command": "python bench/hub_request_cost.py " + " ".join(sys.argv[1:]),
        "nodes": args.nodes,
        "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "results": {},
    }
    if args.out is not None:  # before the measurement, not after it
        args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        if args.baseline_src is not None or args.baseline_hub_arg:
            sides.append(("baseline", args.baseline_src, args.baseline_hub_arg))
        sides.insert(len(sides) if not args.swap else 0, ("this", args.hub_src, []))
        got = {}
        for side, src, hub_args in sides:
            hub_load.log(side)
            got[side] = measure(src, args.nodes, Path(tmp) / side, hub_args)
        doc["results"] = {side: got[side] for side in ("baseline", "this") if side in got}
    text = markdown(doc)
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
