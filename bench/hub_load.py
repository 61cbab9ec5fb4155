"""Hub load benchmark: thousands of light simulated nodes against ONE real hub process.

Each simulated node is a coroutine speaking the real protocol over real HTTP with its own Ed25519
key (every request signed, nonces checked by the hub): it registers, heartbeats every 3 s,
long-polls `/assignment`, downloads the model delta, "trains" by sleeping, and uploads a small
but valid int8 contribution (built in-process with numpy + safetensors the way the node packs
it, no torch in the load process). The hub is the real `gridswarm hub` subprocess on SQLite or
a real PostgreSQL server; the run has a tiny model, audits and usefulness scoring off, so what is
measured is the hub's control plane, not model work.

Reported per (database, nodes): requests/s, p50/p99 latency per endpoint, hub CPU ms per
contribution (= per node per round), rounds closed, contributions lost (acknowledged but absent
from the database, and finished uploads refused as stale), and the load generator's own CPU
share (if it nears 100 % of a core the figures describe the generator, not the hub; the table
says so).

    python bench/hub_load.py --quick                      # 1k nodes, SQLite, short
    python bench/hub_load.py --nodes 1000 5000 --db sqlite postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save as st_save
from sqlalchemy import create_engine, text

from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API, ContributionMeta, HeartbeatRequest, RegisterRequest
from gridswarm.swarm import Swarm, free_port, local_postgres

HEARTBEAT_S = 3.0  # what the real node does while training (node/agent.py)
WAIT_S = 10.0  # long-poll length the node asks for
KEEPALIVE_S = 4.0  # reuse a connection idle at most this long (uvicorn's keep-alive is 5 s)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_config(nodes: int, deadline_s: float) -> dict:
    """A tiny model and a round every node can join: audits/usefulness off (control plane only)."""
    return {
        "name": f"hub-load-{nodes}",
        "seed": 1,
        "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
        "data": {"eval_batches": 1},
        "train": {"seq_len": 16, "batch_size": 2, "inner_steps": 10, "min_inner_steps": 1},
        "round": {
            "deadline_s": deadline_s,
            "quorum": 1,
            "min_nodes": max(1, int(0.9 * nodes)),
            "max_nodes": nodes,
        },
        "budget": {"rounds": 100000},
        "trust": {"audit_max_rate": 0.0, "audit_min_rate": 0.0, "usefulness": False},
    }


def cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def contribution_blob(
    rng: np.random.Generator, numel: int, block_size: int, meta: ContributionMeta
) -> bytes:
    """An int8 blockwise payload of `numel` values packed like `train.params.pack` does."""
    n_blocks = -(-numel // block_size)
    tensors = {
        "q": rng.integers(-127, 128, size=n_blocks * block_size, dtype=np.int8),
        "scale": rng.uniform(1e-4, 1e-3, size=n_blocks).astype(np.float32),
    }
    blob_meta = json.dumps(meta.model_dump(), sort_keys=True, separators=(",", ":"))
    return st_save(tensors, metadata={"gridswarm": blob_meta})


@dataclass
class Stats:
    latency_s: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    stale: int = 0
    transport_errors: int = 0
    measuring: bool = False

    def record(self, endpoint: str, started: float, status: int | str) -> None:
        if not self.measuring:
            return
        self.latency_s.setdefault(endpoint, []).append(time.monotonic() - started)
        counts = self.statuses.setdefault(endpoint, {})
        counts[str(status)] = counts.get(str(status), 0) + 1


class Connection:
    """One keep-alive HTTP/1.1 connection, written by hand: httpx costs ~1 ms of CPU per
    request, which on this machine made the generator, not the hub, the bottleneck. Enough
    HTTP for the hub's answers (uvicorn always sends content-length)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.busy = asyncio.Lock()  # one request at a time on a shared connection
        self.used_at = 0.0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _exchange(self, head: bytes, body: bytes) -> Response:
        if self.writer is not None and time.monotonic() - self.used_at > KEEPALIVE_S:
            self.close()  # uvicorn closes a connection idle for 5 s: do not race it
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the hub closed the connection")
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        response = Response(int(status_line.split()[1]), await self.reader.readexactly(length))
        self.used_at = time.monotonic()
        return response

    async def request(
        self, method: str, target: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> Response:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"host: {self.host}",
            f"content-length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        async with self.busy:
            try:
                return await asyncio.wait_for(self._exchange(head, body), timeout_s)
            except BaseException:
                self.close()  # a half-read answer would poison the next one
                raise


@dataclass
class Response:
    status_code: int
    content: bytes

    def json(self) -> dict:
        return json.loads(self.content)


class LightNode:
    """One simulated node: the real node's request pattern, with sleeping in place of training.
    Two connections, like the real node (its heartbeat thread has its own), unless the open-file
    limit forbids: then heartbeats share the one connection and are sent only while training
    (a long-poll already tells the hub the node is alive)."""

    def __init__(
        self,
        host: str,
        port: int,
        run: dict,
        stats: Stats,
        train_s: float,
        seed: int,
        shared_connection: bool = False,
    ) -> None:
        self.main_conn = Connection(host, port)
        self.beat_conn = self.main_conn if shared_connection else Connection(host, port)
        self.run, self.stats, self.train_s = run, stats, train_s
        self.identity = Identity.generate()
        self.rng = np.random.default_rng(seed)
        self.status = "idle"

    async def call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: bytes = b"",
        query: str = "",
        timeout_s: float = 60.0,
        conn: Connection | None = None,
    ) -> Response | None:
        """One signed request, retried on transport errors and 5xx like node/client.py."""
        conn = conn or self.main_conn
        for attempt in range(5):
            headers = sign_request(self.identity, method, path, body)
            started = time.monotonic()
            try:
                response = await conn.request(method, path + query, body, headers, timeout_s)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                self.stats.transport_errors += 1
                self.stats.record(endpoint, started, "transport")
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            self.stats.record(endpoint, started, response.status_code)
            if response.status_code < 500:
                return response
            await asyncio.sleep(0.5 * (attempt + 1))
        return None

    async def heartbeats(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, HEARTBEAT_S))
        while not stop.is_set():
            if self.beat_conn is self.main_conn and self.status != "training":
                await asyncio.sleep(HEARTBEAT_S)
                continue
            body = HeartbeatRequest(status=self.status).model_dump_json().encode()
            await self.call(
                "heartbeat", "POST", f"{API}/nodes/heartbeat", body, conn=self.beat_conn
            )
            await asyncio.sleep(HEARTBEAT_S)

    async def main(self, stop: asyncio.Event) -> None:
        req = RegisterRequest(
            probe_tokens_per_s=1e6, probe_numel=1_000_000, name=self.identity.node_id
        )
        if (
            await self.call(
                "register", "POST", f"{API}/nodes/register", req.model_dump_json().encode()
            )
            is None
        ):
            return
        beating = asyncio.create_task(self.heartbeats(stop))
        run_id, numel = self.run["run_id"], self.run["numel"]
        try:
            while not stop.is_set():
                response = await self.call(
                    "assignment",
                    "POST",
                    f"{API}/runs/{run_id}/assignment",
                    query=f"?wait_s={WAIT_S}",
                    timeout_s=WAIT_S + 60,
                )
                if response is None or response.status_code != 200:
                    await asyncio.sleep(1.0)
                    continue
                answer = response.json()
                if answer["status"] == "finished":
                    return
                if answer["status"] != "assigned":
                    continue  # the hub held the long-poll as long as it wanted
                a = answer["assignment"]
                self.status = "training"
                blob = a["delta_blob"] or a["weights_blob"]
                await self.call("blob", "GET", f"{API}/blobs/{blob}")
                train_s = self.train_s * random.uniform(0.8, 1.2)
                await asyncio.sleep(train_s)
                tokens_per_step = 16 * 2
                meta = ContributionMeta(
                    assignment_id=a["id"],
                    codec="int8",
                    steps=a["inner_steps"],
                    tokens=a["inner_steps"] * tokens_per_step,
                    loss_first=5.5,
                    loss_last=5.0,
                    loss_mean=5.2,
                    train_time_s=train_s,
                    threads=1,
                )
                body = contribution_blob(self.rng, numel, 256, meta)
                self.status = "uploading"
                response = await self.call(
                    "upload", "POST", f"{API}/runs/{run_id}/contributions", body
                )
                self.status = "idle"
                if response is not None and response.status_code == 200:
                    self.stats.acked.append(response.json()["contribution_id"])
                elif response is not None and b"stale" in response.content:
                    self.stats.stale += int(self.stats.measuring)
        finally:
            beating.cancel()
            self.main_conn.close()
            self.beat_conn.close()


def log(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def drive(
    url: str,
    run: dict,
    nodes: int,
    ramp_s: float,
    warmup_s: float,
    measure_s: float,
    train_s: float,
    hub_pid: int,
    shared_connection: bool,
) -> dict:
    """Start `nodes` light nodes over `ramp_s`, warm up, measure for `measure_s`, stop."""
    stats, stop = Stats(), asyncio.Event()
    host, port = url.removeprefix("http://").split(":")
    tasks = []
    for i in range(nodes):
        node = LightNode(host, int(port), run, stats, train_s, i)
        tasks.append(asyncio.create_task(node.main(stop)))
        await asyncio.sleep(ramp_s / nodes)
    log(f"{nodes} nodes started; warming up {warmup_s:.0f} s")
    await asyncio.sleep(warmup_s)
    log(f"measuring {measure_s:.0f} s")
    stats.measuring = True
    hub_cpu0, own_cpu0, t0, wall0 = cpu_s(hub_pid), cpu_s(), time.monotonic(), time.time()
    acked0 = len(stats.acked)
    await asyncio.sleep(measure_s)
    hub_cpu1, own_cpu1, t1, wall1 = cpu_s(hub_pid), cpu_s(), time.monotonic(), time.time()
    acked_in_window = len(stats.acked) - acked0
    stats.measuring = False
    stop.set()
    log("stopping the nodes")
    await asyncio.wait(tasks, timeout=WAIT_S + 30)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    window_s = t1 - t0
    requests = sum(len(v) for v in stats.latency_s.values())
    return {
        "window_s": round(window_s, 1),
        "requests_per_s": round(requests / window_s, 1),
        "endpoints": {
            name: {
                "n": len(v),
                "p50_ms": round(1000 * percentile(v, 0.50), 1),
                "p99_ms": round(1000 * percentile(v, 0.99), 1),
                "statuses": stats.statuses.get(name, {}),
            }
            for name, v in sorted(stats.latency_s.items())
        },
        "window_wall_s": (wall0, wall1),
        "contributions_in_window": acked_in_window,
        "hub_cpu_share": round((hub_cpu1 - hub_cpu0) / window_s, 3),
        "hub_cpu_ms_per_contribution": round(
            1000 * (hub_cpu1 - hub_cpu0) / max(acked_in_window, 1), 2
        ),
        "loadgen_cpu_share": round((own_cpu1 - own_cpu0) / window_s, 3),
        "stale_refused": stats.stale,
        "transport_errors": stats.transport_errors,
        "acked": stats.acked,
    }


def from_database(db_url: str, run_id: str, acked: list[str], window: tuple[float, float]) -> dict:
    """Read after the hub stopped: acknowledged contributions absent from its database, and the
    versions (closed rounds) published in the measuring window."""
    if db_url.startswith("postgresql://"):
        db_url = "postgresql+psycopg://" + db_url.removeprefix("postgresql://")
    engine = create_engine(db_url)
    with engine.connect() as conn:
        stored = set(
            conn.execute(
                text("SELECT id FROM contributions WHERE run_id = :r"), {"r": run_id}
            ).scalars()
        )
        closed = conn.execute(
            text(
                "SELECT count(*) FROM versions WHERE run_id = :r AND created_at BETWEEN :a AND :b"
            ),
            {"r": run_id, "a": window[0], "b": window[1]},
        ).scalar_one()
    engine.dispose()
    return {"rounds_closed": closed, "lost_acknowledged": len(set(acked) - stored)}


def one(db: str, nodes: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One hub process, one run, `nodes` light nodes: the measured figures."""
    with ExitStack() as stack:
        db_url = (
            stack.enter_context(local_postgres(max_connections=200)) if db == "postgres" else None
        )
        swarm = Swarm(workdir / f"{db}-{nodes}", free_port(), liveness_s=20.0, db_url=db_url)
        swarm.workdir.mkdir(parents=True)
        if args.hub_src is not None:  # the control: another checkout's hub (e.g. main's src/)
            swarm.env["PYTHONPATH"] = str(args.hub_src.resolve())
        else:  # every simulated node registers from 127.0.0.1: no bound on new identities
            swarm.hub_extra += ["--register-per-net-hour", "0", "--max-new-nodes", "0"]
        swarm.start_hub(timeout_s=240.0)  # a loaded shared machine starts it slowly
        stack.callback(swarm.stop)
        sponsor = Identity.generate()
        body = json.dumps({"config": run_config(nodes, args.deadline_s)}).encode()
        headers = sign_request(sponsor, "POST", f"{API}/runs", body)
        run = httpx.post(f"{swarm.url}{API}/runs", content=body, headers=headers, timeout=60).json()
        # the hub holds every connection too: two per node only where the limit allows
        shared = 2 * nodes + 256 > resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        ramp_s = args.ramp_s if args.ramp_s is not None else max(5.0, nodes / 250)
        result = asyncio.run(
            drive(
                swarm.url,
                run,
                nodes,
                ramp_s,
                args.warmup_s,
                args.measure_s,
                args.train_s,
                swarm.hub.pid,
                shared,
            )
        )
        result["heartbeat_connection"] = "shared" if shared else "own"
        log("stopping the hub")
        swarm.stop()  # SIGTERM: what is in the database now is what survives
        acked = result.pop("acked")
        result["acked_total"] = len(acked)
        result |= from_database(swarm.db_url, run["run_id"], acked, result.pop("window_wall_s"))
    return {"db": db, "nodes": nodes, **result}


def table(results: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "db",
        "nodes",
        "req/s",
        "assign p50/p99 ms",
        "upload p50/p99 ms",
        "heartbeat p99 ms",
        "rounds",
        "contribs",
        "hub CPU ms/contrib",
        "hub CPU",
        "loadgen CPU",
        "stale",
        "lost",
    ):
        t.add_column(col, justify="right")
    for r in results:
        ep = r["endpoints"]

        def p(name: str, ep: dict = ep) -> str:
            e = ep.get(name)
            return f"{e['p50_ms']:.0f}/{e['p99_ms']:.0f}" if e else "-"

        t.add_row(
            r["db"],
            str(r["nodes"]),
            f"{r['requests_per_s']:.0f}",
            p("assignment"),
            p("upload"),
            f"{ep['heartbeat']['p99_ms']:.0f}" if "heartbeat" in ep else "-",
            str(r["rounds_closed"]),
            str(r["contributions_in_window"]),
            f"{r['hub_cpu_ms_per_contribution']:.2f}",
            f"{r['hub_cpu_share']:.0%}",
            f"{r['loadgen_cpu_share']:.0%}",
            str(r["stale_refused"]),
            str(r["lost_acknowledged"]),
        )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument(
        "--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--quick", action="store_true", help="1k nodes, SQLite, short")
    parser.add_argument("--train-s", type=float, default=5.0, help="simulated training per round")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--ramp-s", type=float, default=None, help="registration spread")
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--measure-s", type=float, default=45.0)
    parser.add_argument("--hub-src", type=Path, default=None, help="run the hub from this src/")
    parser.add_argument("--label", default="", help="tag stored with the results (e.g. baseline)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.db, args.warmup_s, args.measure_s = [1000], ["sqlite"], 10.0, 30.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the hub on SIGTERM
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(args.nodes) + 256 > hard:
        sys.exit(f"open-file limit {hard} is too low for {max(args.nodes)} nodes")
    console = Console(width=220)
    results = []
    with tempfile.TemporaryDirectory(prefix="hub-load-") as tmp:
        for db in args.db:
            for nodes in args.nodes:
                console.print(f"[bold]{db}, {nodes} nodes[/bold] …")
                results.append(one(db, nodes, args, Path(tmp)))
                console.print(table(results[-1:], ""))
    title = f"hub load {args.label}".strip()
    console.print(table(results, title))
    out = args.out or Path(__file__).parent / "results" / (
        "hub_load_quick.json" if args.quick else "hub_load.json"
    )
    document = {
        "label": args.label,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    out.write_text(json.dumps(document, indent=2, default=str))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
