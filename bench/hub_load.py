"""Hub load benchmark: thousands of light simulated nodes against ONE real hub process.

Each simulated node is a coroutine speaking the real protocol over real HTTP with its own Ed25519
key (every request signed, nonces checked by the hub): it registers, heartbeats as the hub tells
it (every 3 s from a hub that does not pace heartbeats; from one that does, after the interval it
was last told without any answer from the hub, as `HubClient` does), long-polls `/assignment`,
downloads the model delta, "trains" by sleeping, and uploads a small but valid int8 contribution
(built in-process with numpy + safetensors the way the node packs it, no torch in the load
process). The hub is the real `gridswarm hub` subprocess on SQLite or a real PostgreSQL server;
the run has a tiny model, audits and usefulness scoring off, so what is
measured is the hub's control plane, not model work.

Reported per (database, nodes): requests/s, p50/p99 latency per endpoint, hub CPU ms per
contribution (= per node per round), rounds closed, contributions lost (acknowledged but absent
from the database, and finished uploads refused as stale), and the load generator's own CPU
share (if it nears 100 % of a core the figures describe the generator, not the hub; the table
says so).

With `--replicas N …` (PostgreSQL) each configuration runs N hub processes on one database;
the nodes get every URL, start on the one their key picks and fail over like `HubClient`. Hub
CPU then sums every replica, and PostgreSQL's own processes are reported beside it, with the
statements it spent most time on (pg_stat_statements). `--profile` runs the first replica under
bench/sampling_profile.py; `--baseline-src` runs every configuration with another checkout's
hub as well (before/after in one invocation). A Markdown table is written beside the JSON.

    python bench/hub_load.py --quick                      # 1k nodes, SQLite, short
    python bench/hub_load.py --nodes 1000 5000 --db sqlite postgres
    python bench/hub_load.py --nodes 1000 --db postgres --replicas 1 3 --baseline-src ../main/src
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
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save as st_save
from sqlalchemy import create_engine, text

from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import (
    API,
    DEFAULT_HEARTBEAT_S,
    ContributionMeta,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
)
from gridswarm.swarm import Swarm, free_port, local_postgres, plain_http, wait_healthy

MIN_BEAT_WAIT_S = 0.2  # the heartbeat loop looks again at most this often (node/agent.py)
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


def max_wait_s(url: str) -> float:
    """The longest long-poll (`wait_s`) the hub takes, from its OpenAPI document (a baseline
    hub may take less than this checkout's)."""
    doc = httpx.get(f"{url}/openapi.json", timeout=60).json()
    operation = doc["paths"][f"{API}/runs/{{run_id}}/assignment"]["post"]
    (wait,) = [p for p in operation["parameters"] if p["name"] == "wait_s"]
    return float(wait["schema"]["maximum"])


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
    # every "assigned" answer, measuring or not: (round, attempt, deadline_at, answered_at),
    # unix s (hub and generator share this machine's clock): `round_start_spread`'s input
    assigned: list[tuple[int, int, float, float]] = field(default_factory=list)
    stale: int = 0
    transport_errors: int = 0
    measuring: bool = False
    # every registration's latency, the ramp's included (they happen before the window)
    register_s: list[float] = field(default_factory=list)

    def record(self, endpoint: str, started: float, status: int | str) -> None:
        if endpoint == "register":
            self.register_s.append(time.monotonic() - started)
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
    (a long-poll already tells the hub the node is alive). Given several hub replicas it starts
    on the one its key picks and moves to the next on a transport error or a 5xx, as
    `HubClient` does."""

    def __init__(
        self,
        hubs: list[tuple[str, int]],
        run: dict,
        stats: Stats,
        train_s: float,
        seed: int,
        shared_connection: bool = False,
    ) -> None:
        self.hubs, self.shared = hubs, shared_connection
        self.run, self.stats, self.train_s = run, stats, train_s
        self.identity = Identity.generate()
        self.current = int.from_bytes(self.identity.public_key[:4], "big") % len(hubs)
        self.connections: dict[tuple[int, bool], Connection] = {}
        self.rng = np.random.default_rng(seed)
        self.status = "idle"
        # heartbeat pacing as node/client.py does it: the interval last told (None: a hub that
        # does not pace), the last answer to a signed request, the last beat tried
        self.heartbeat_s: float | None = None
        self.last_answer_at = self.last_beat_at = time.monotonic()

    def connection(self, beat: bool) -> Connection:
        """This node's connection to its current replica (its own for heartbeats unless shared)."""
        key = (self.current, beat and not self.shared)
        if key not in self.connections:
            self.connections[key] = Connection(*self.hubs[self.current])
        return self.connections[key]

    def fail_over(self) -> None:
        self.current = (self.current + 1) % len(self.hubs)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()

    async def call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: bytes = b"",
        query: str = "",
        timeout_s: float = 60.0,
        beat: bool = False,
    ) -> Response | None:
        """One signed request, retried on transport errors and 5xx like node/client.py (on the
        next replica at once, with backoff once every replica failed in a row)."""
        for attempt in range(5):
            conn = self.connection(beat)
            headers = sign_request(self.identity, method, path, body)
            started = time.monotonic()
            try:
                response = await conn.request(method, path + query, body, headers, timeout_s)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                self.stats.transport_errors += 1
                self.stats.record(endpoint, started, "transport")
            else:
                self.stats.record(endpoint, started, response.status_code)
                if response.status_code < 400:
                    self.last_answer_at = time.monotonic()  # the hub noted us alive
                if response.status_code < 500:
                    return response
            self.fail_over()
            if (attempt + 1) % len(self.hubs) == 0:
                await asyncio.sleep(0.5 * (attempt + 1))
        return None

    def heartbeat_due_in_s(self) -> float:
        """`HubClient.heartbeat_due_in_s`: seconds until the next beat is due."""
        now = time.monotonic()
        if self.heartbeat_s is None:
            return DEFAULT_HEARTBEAT_S - (now - self.last_beat_at)
        return self.heartbeat_s - (now - max(self.last_answer_at, self.last_beat_at))

    async def heartbeats(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat_s or DEFAULT_HEARTBEAT_S))
        while not stop.is_set():
            due_in_s = self.heartbeat_due_in_s()
            if due_in_s > 0:
                await asyncio.sleep(max(due_in_s, MIN_BEAT_WAIT_S))
                continue
            self.last_beat_at = time.monotonic()
            if self.shared and self.status != "training":
                continue  # one connection: the long-poll on it already says we are alive
            body = HeartbeatRequest(status=self.status).model_dump_json().encode()
            response = await self.call(
                "heartbeat", "POST", f"{API}/nodes/heartbeat", body, beat=True
            )
            if response is not None and response.status_code == 200:
                with suppress(ValueError):  # a hub that does not pace: {"ok": true}
                    told = HeartbeatResponse.model_validate_json(response.content).heartbeat_s
                    self.heartbeat_s = told if told is not None else self.heartbeat_s

    async def main(self, stop: asyncio.Event) -> None:
        req = RegisterRequest(
            probe_tokens_per_s=1e6, probe_numel=1_000_000, name=self.identity.node_id
        )
        registered = await self.call(
            "register", "POST", f"{API}/nodes/register", req.model_dump_json().encode()
        )
        if registered is None:
            return
        with suppress(ValueError):
            self.heartbeat_s = RegisterResponse.model_validate_json(registered.content).heartbeat_s
        beating = asyncio.create_task(self.heartbeats(stop))
        run_id, numel = self.run["run_id"], self.run["numel"]
        try:
            while not stop.is_set():
                # as long as the heartbeat interval the hub told, like `HubClient.long_poll_s`
                wait_s = min(self.run["max_wait_s"], max(WAIT_S, self.heartbeat_s or 0.0))
                response = await self.call(
                    "assignment",
                    "POST",
                    f"{API}/runs/{run_id}/assignment",
                    query=f"?wait_s={wait_s}",
                    timeout_s=wait_s + 60,
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
                self.stats.assigned.append(
                    (a["round"], a["attempt"], a["deadline_at"], time.time())
                )
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
            self.close()


def log(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def round_start_spread(
    assigned: list[tuple[int, int, float, float]],
    deadline_s: float,
    window: tuple[float, float],
) -> dict:
    """How promptly work reached the nodes once it existed, free of the long-poll's wait.

    A round (or a re-planned attempt of it) opens at the first ask that finds it pending, with
    `deadline_at = opened_at + deadline_s` for every node of it (hub/engine.py `_asked`), so the
    hub's own opening time is `deadline_at - deadline_s`. For each round that opened inside
    `window` (unix s), each node's delay is its "assigned" answer's arrival minus that opening:
    the burst of N asks answered at once, and any node that asked late. `assigned` holds
    (round, attempt, deadline_at, answered_at) tuples. Returns p50/p99/max over every answer
    (ms), the delay of each round's first answer (from the hub's opening to the first node
    that saw it), and a row per round."""
    by_round: dict[tuple[int, int, float], list[float]] = {}
    for number, attempt, deadline_at, answered_at in assigned:
        by_round.setdefault((number, attempt, deadline_at), []).append(answered_at)
    delays_s: list[float] = []
    per_round = []
    for (number, attempt, deadline_at), answers in sorted(by_round.items()):
        opened_at = deadline_at - deadline_s
        if not window[0] <= opened_at <= window[1]:
            continue
        delays = sorted(max(0.0, t - opened_at) for t in answers)
        delays_s += delays
        per_round.append(
            {
                "round": number,
                "attempt": attempt,
                "opened_at": round(opened_at, 3),
                "answers": len(delays),
                "first_ms": round(1000 * delays[0], 1),
                "p50_ms": round(1000 * percentile(delays, 0.50), 1),
                "p99_ms": round(1000 * percentile(delays, 0.99), 1),
                "max_ms": round(1000 * delays[-1], 1),
            }
        )
    return {
        "what": "delay from the round's opening on the hub (deadline_at - deadline_s) to each "
        "node's 'assigned' answer, rounds opened in the measuring window; no long-poll wait",
        "rounds": len(per_round),
        "n": len(delays_s),
        "p50_ms": round(1000 * percentile(delays_s, 0.50), 1),
        "p99_ms": round(1000 * percentile(delays_s, 0.99), 1),
        "max_ms": round(1000 * max(delays_s, default=math.nan), 1),
        "per_round": per_round,
    }


def postgres_pids(port: int) -> list[int]:
    """The PostgreSQL server listening on `port` and its children (backends, writers)."""
    parents: dict[int, int] = {}
    postmaster = None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):
            continue
        if comm != "postgres":
            continue
        parents[int(entry)] = int(rest.split()[1])
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-p" in args and args[args.index(b"-p") + 1 :][:1] == [str(port).encode()]:
            postmaster = int(entry)
    if postmaster is None:
        return []
    return [postmaster, *(pid for pid, parent in parents.items() if parent == postmaster)]


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of `pids` still alive."""
    out = {}
    for pid in pids:
        with suppress(OSError, IndexError):
            out[pid] = cpu_s(pid)
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `cpu_of` readings (a process started in between counts
    whole; one that ended in between is lost: pooled connections make both rare)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


@dataclass
class Hubs:
    """The hub replicas under test and how to watch them: their URLs and pids, PostgreSQL's
    port (its processes' CPU counts as the database's), and callbacks at the measuring
    window's start and end (pg_stat_statements reset / read, profiler signals)."""

    urls: list[str]
    pids: list[int]
    pg_port: int | None = None
    on_start: list = field(default_factory=list)
    on_end: list = field(default_factory=list)


async def drive(
    hubs: Hubs,
    run: dict,
    nodes: int,
    ramp_s: float,
    warmup_s: float,
    measure_s: float,
    train_s: float,
    deadline_s: float,
    shared_connection: bool,
) -> dict:
    """Start `nodes` light nodes over `ramp_s`, warm up, measure for `measure_s`, stop."""
    stats, stop = Stats(), asyncio.Event()
    addresses = []
    for url in hubs.urls:
        host, port = url.removeprefix("http://").split(":")
        addresses.append((host, int(port)))
    tasks = []
    for i in range(nodes):
        node = LightNode(addresses, run, stats, train_s, i, shared_connection)
        tasks.append(asyncio.create_task(node.main(stop)))
        await asyncio.sleep(ramp_s / nodes)
    log(f"{nodes} nodes started; warming up {warmup_s:.0f} s")
    await asyncio.sleep(warmup_s)
    log(f"measuring {measure_s:.0f} s")
    stats.measuring = True
    db_pids = postgres_pids(hubs.pg_port) if hubs.pg_port else []
    for callback in hubs.on_start:
        callback()
    hub_cpu0, db_cpu0 = cpu_of(hubs.pids), cpu_of(db_pids)
    own_cpu0, t0, wall0 = cpu_s(), time.monotonic(), time.time()
    acked0 = len(stats.acked)
    await asyncio.sleep(measure_s)
    db_pids = postgres_pids(hubs.pg_port) if hubs.pg_port else []
    hub_cpu1, db_cpu1 = cpu_of(hubs.pids), cpu_of(db_pids)
    own_cpu1, t1, wall1 = cpu_s(), time.monotonic(), time.time()
    acked_in_window = len(stats.acked) - acked0
    for callback in hubs.on_end:
        callback()
    stats.measuring = False
    stop.set()
    log("stopping the nodes")
    await asyncio.wait(tasks, timeout=WAIT_S + 30)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # answers of a round opened in the window count until the nodes stop (a round opened
    # just before the window's end is cut short: its late answers are missing)
    spread = round_start_spread(stats.assigned, deadline_s, (wall0, wall1))
    window_s = t1 - t0
    requests = sum(len(v) for v in stats.latency_s.values())
    hub_cpu, db_cpu = cpu_between(hub_cpu0, hub_cpu1), cpu_between(db_cpu0, db_cpu1)
    per_contribution = max(acked_in_window, 1)
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
        # "assignment" above is the whole request, the long-poll's wait for work included
        "assignment_includes_long_poll_wait": True,
        "registration": {  # every registration, the ramp's included
            "n": len(stats.register_s),
            "p50_ms": round(1000 * percentile(stats.register_s, 0.50), 1),
            "p99_ms": round(1000 * percentile(stats.register_s, 0.99), 1),
        },
        "round_start_spread": spread,
        "window_wall_s": (wall0, wall1),
        "contributions_in_window": acked_in_window,
        "hub_cpu_share": round(hub_cpu / window_s, 3),  # of one core, all replicas
        "db_cpu_share": round(db_cpu / window_s, 3),  # PostgreSQL's processes
        "hub_cpu_ms_per_contribution": round(1000 * hub_cpu / per_contribution, 2),
        "hub_cpu_ms_per_request": round(1000 * hub_cpu / max(requests, 1), 3),
        "requests_per_contribution": round(requests / per_contribution, 1),
        "hub_db_cpu_ms_per_contribution": round(1000 * (hub_cpu + db_cpu) / per_contribution, 2),
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


PG_STATEMENTS = """
SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 200)
FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12
"""


def top_statements(db_url: str, into: dict) -> None:
    """The statements PostgreSQL spent the most time executing in the window (into["sql"])."""
    engine = create_engine("postgresql+psycopg://" + db_url.removeprefix("postgresql://"))
    with engine.connect() as conn:
        into["sql"] = [
            {"calls": c, "total_ms": round(t), "rows": r, "query": q}
            for c, t, r, q in conn.execute(text(PG_STATEMENTS))
        ]
    engine.dispose()


def sql(db_url: str, statement: str) -> None:
    engine = create_engine("postgresql+psycopg://" + db_url.removeprefix("postgresql://"))
    with engine.connect() as conn:
        conn.execute(text(statement))
        conn.commit()
    engine.dispose()


SRC = Path(__file__).resolve().parent.parent / "src"


def one(
    db: str, nodes: int, replicas: int, variant: str, args: argparse.Namespace, workdir: Path
) -> dict:
    """`replicas` hub processes on one database (one on SQLite), one run, `nodes` light nodes:
    the measured figures. `variant` "this" runs this checkout's hub, "baseline" the one in
    --baseline-src (or --hub-src for every run); "this-plain" this checkout's hub on uvicorn's
    pure-Python HTTP parser and asyncio's loop (`plain_http`), as is the baseline with
    --baseline-plain-http."""
    hub_src = args.baseline_src if variant == "baseline" else args.hub_src
    plain = variant == "this-plain" or (variant == "baseline" and args.baseline_plain_http)
    with ExitStack() as stack:
        db_url = None
        if db == "postgres":
            db_url = stack.enter_context(
                local_postgres(
                    max_connections=60 * replicas + 40,  # each replica's pool, the ticker, us
                    settings={"shared_preload_libraries": "pg_stat_statements"},
                )
            )
            sql(db_url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        name = f"{db}-{nodes}-{replicas}-{variant}"
        swarm = Swarm(workdir / name, free_port(), liveness_s=20.0, db_url=db_url)
        swarm.workdir.mkdir(parents=True)
        if hub_src is not None:  # the control: another checkout's hub (e.g. main's src/)
            swarm.env["PYTHONPATH"] = str(hub_src.resolve())
        if plain:
            paths = [str(plain_http(workdir / "plain-http")), str((hub_src or SRC).resolve())]
            swarm.env["PYTHONPATH"] = os.pathsep.join(paths)
        cli = (hub_src or SRC) / "gridswarm" / "cli.py"
        if "register_per_net_hour" in cli.read_text():  # a hub that bounds new identities:
            # every simulated node registers from 127.0.0.1, so no bound
            swarm.hub_extra += ["--register-per-net-hour", "0", "--max-new-nodes", "0"]
        profile = workdir / f"{name}-profile.json"
        if args.profile:  # the first replica under the sampling profiler
            swarm.hub = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).parent / "sampling_profile.py"),
                    str(profile),
                    str(args.profile_interval_s),
                    "-m",
                    "gridswarm.cli",
                    *swarm._hub_args(swarm.port),
                ],
                stdout=(workdir / f"{name}-hub.log").open("ab"),
                stderr=subprocess.STDOUT,
                env=swarm.env,
            )
            stack.callback(swarm.stop)
            wait_healthy(swarm.url, swarm.hub, 240.0)
        else:
            stack.callback(swarm.stop)
            swarm.start_hub(timeout_s=240.0)  # a loaded shared machine starts it slowly
        urls = [swarm.url]
        for _ in range(replicas - 1):
            urls.append(swarm.start_replica(free_port(), timeout_s=240.0))
        hubs = Hubs(urls, [swarm.hub.pid, *(p.pid for p in swarm.replicas.values())])
        extra: dict = {}
        if db_url is not None:
            hubs.pg_port = int(db_url.rsplit(":", 1)[1].split("/")[0])
            hubs.on_start.append(lambda: sql(db_url, "SELECT pg_stat_statements_reset()"))
            hubs.on_end.append(lambda: top_statements(db_url, extra))
        if args.profile:
            hubs.on_start.append(lambda: swarm.hub.send_signal(signal.SIGUSR1))
            hubs.on_end.append(lambda: swarm.hub.send_signal(signal.SIGUSR2))
        sponsor = Identity.generate()
        body = json.dumps({"config": run_config(nodes, args.deadline_s)}).encode()
        headers = sign_request(sponsor, "POST", f"{API}/runs", body)
        run = httpx.post(f"{swarm.url}{API}/runs", content=body, headers=headers, timeout=60).json()
        run["max_wait_s"] = max_wait_s(swarm.url)
        # the hub holds every connection too: two per node only where the limit allows
        shared = 2 * nodes + 256 > resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        ramp_s = args.ramp_s if args.ramp_s is not None else max(5.0, nodes / 250)
        result = asyncio.run(
            drive(
                hubs,
                run,
                nodes,
                ramp_s,
                args.warmup_s,
                args.measure_s,
                args.train_s,
                args.deadline_s,
                shared,
            )
        )
        result["heartbeat_connection"] = "shared" if shared else "own"
        log("stopping the hub")
        swarm.stop()  # SIGTERM: what is in the database now is what survives
        acked = result.pop("acked")
        result["acked_total"] = len(acked)
        result |= from_database(swarm.db_url, run["run_id"], acked, result.pop("window_wall_s"))
        result |= extra
        if args.profile and profile.exists():
            result["profile"] = json.loads(profile.read_text())
    shape = {"train_s": args.train_s, "deadline_s": args.deadline_s}
    return {"db": db, "nodes": nodes, "replicas": replicas, "variant": variant, **shape, **result}


COLUMNS = (
    "db",
    "replicas",
    "hub",
    "nodes",
    "train s / deadline s",
    "req/s",
    "round start spread p50/p99 ms",
    "assignment request incl. long-poll wait p50/p99 ms",
    "upload p50/p99 ms",
    "blob p50/p99 ms",
    "heartbeat p50/p99 ms",
    "register (ramp incl.) p50/p99 ms",
    "rounds",
    "contribs",
    "req/contrib",
    "hub CPU ms/req",
    "hub CPU ms/contrib",
    "hub+db CPU ms/contrib",
    "hub CPU",
    "db CPU",
    "loadgen CPU",
    "stale",
    "timeouts",
    "lost",
)


def shape(r: dict) -> str:
    """The load's shape: simulated training per round (each node ±20 %) and the round's
    deadline, in seconds ("-" for a document from before they were stored)."""
    if "train_s" not in r:
        return "-"
    return f"{r['train_s']:g} / {r['deadline_s']:g}"


def p50_p99(figures: dict | None) -> str:
    """ "p50/p99" in ms, or "-" with no figures or no samples."""
    if not figures or not figures.get("n", 1):
        return "-"
    return f"{figures['p50_ms']:.0f}/{figures['p99_ms']:.0f}"


def rows(results: list[dict]) -> list[list[str]]:
    """One row of figures per measured configuration (CPU shares are of one core). The round
    start spread has no long-poll wait in it; the assignment request column does."""
    out = []
    for r in results:
        ep = r["endpoints"]

        def p(name: str, ep: dict = ep) -> str:
            return p50_p99(ep.get(name))

        start = p50_p99(r.get("round_start_spread"))

        out.append(
            [
                r["db"],
                str(r.get("replicas", 1)),
                r.get("variant", "this"),
                str(r["nodes"]),
                shape(r),
                f"{r['requests_per_s']:.0f}",
                start,
                p("assignment"),
                p("upload"),
                p("blob"),
                p("heartbeat"),
                p50_p99(r.get("registration")),
                str(r["rounds_closed"]),
                str(r["contributions_in_window"]),
                f"{r.get('requests_per_contribution', float('nan')):.1f}",
                f"{r.get('hub_cpu_ms_per_request', float('nan')):.2f}",
                f"{r['hub_cpu_ms_per_contribution']:.1f}",
                f"{r.get('hub_db_cpu_ms_per_contribution', float('nan')):.1f}",
                f"{r['hub_cpu_share']:.0%}",
                f"{r.get('db_cpu_share', 0):.0%}",
                f"{r['loadgen_cpu_share']:.0%}",
                str(r["stale_refused"]),
                str(r.get("transport_errors", "-")),
                str(r["lost_acknowledged"]),
            ]
        )
    return out


def table(results: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in rows(results):
        t.add_row(*row)
    return t


def markdown(document: dict) -> str:
    """The results as Markdown: the command, the table, the hottest SQL and hub code."""
    lines = [
        f"# hub load {document['label']}".rstrip(),
        "",
        f"`{document['command']}`",
        "",
        f"{document['cpus']} CPUs, load average before the runs "
        + ", ".join(f"{x:.1f}" for x in document["load_average"])
        + "".join(
            " (then " + ", ".join(f"{x:.1f}" for x in later) + ")"
            for later in document.get("later_load_averages", [])
        )
        + ". CPU shares are of one core; hub CPU sums every replica process, db CPU "
        "PostgreSQL's processes; per contribution = per node per round.",
        "",
        "Latency columns: **round start spread** is, for each round opened in the measuring "
        "window, the delay from its opening on the hub (`deadline_at - deadline_s`) to each "
        "node's `assigned` answer: did work reach the nodes promptly once it existed (no "
        "long-poll wait in it). **assignment request incl. long-poll wait** is the whole "
        "`/assignment` request, which by design waits up to `wait_s` (10–60 s) while there is "
        "no work: it measures the round's length as much as the hub. Upload, blob (download), "
        "heartbeat and register are plain requests (register: every registration, the "
        "ramp's included, as they happen before the window). A request that timed out (60 s) "
        "or lost its connection counts in **timeouts** (and in its endpoint's latency) and is "
        "retried; a retried upload the hub had already stored is answered 409.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(document["results"])]
    for r in document["results"]:
        head = f"{r['db']}, {r.get('replicas', 1)} replica(s), {r.get('variant')}, {r['nodes']}"
        per_round = (r.get("round_start_spread") or {}).get("per_round")
        if per_round:
            lines += [
                "",
                f"## Round start spread by round ({head} nodes, train/deadline {shape(r)} s)",
                "",
                "| round | attempt | answers | first ms | p50 ms | p99 ms | max ms |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {x['round']} | {x['attempt']} | {x['answers']} | {x['first_ms']:.0f} "
                f"| {x['p50_ms']:.0f} | {x['p99_ms']:.0f} | {x['max_ms']:.0f} |"
                for x in per_round
            ]
        if r.get("sql"):
            lines += ["", f"## PostgreSQL time by statement ({head} nodes)", ""]
            lines += ["| calls | total ms | rows | statement |", "|---|---|---|---|"]
            for q in r["sql"][:8]:
                query = q["query"].replace("|", "\\|")
                lines.append(f"| {q['calls']} | {q['total_ms']} | {q['rows']} | `{query}` |")
        if r.get("profile"):
            prof = r["profile"]
            lines += [
                "",
                f"## Hub CPU samples, first replica ({head} nodes; {prof['samples']} samples)",
            ]
            total = max(prof["samples"], 1)
            if prof.get("thread_cpu_s"):  # what the kernel charged each thread group
                lines += ["", "| thread | CPU s in the window | samples |", "|---|---|---|"]
                by_thread = dict(prof.get("samples_by_thread", []))
                for group, cpu_s in prof["thread_cpu_s"].items():
                    lines.append(f"| {group} | {cpu_s:.1f} | {by_thread.get(group, 0)} |")
            lines += ["", "| share | where (innermost gridswarm line) |", "|---|---|"]
            for where, n in prof["gridswarm_line"][:12]:
                lines.append(f"| {n / total:.0%} | `{where}` |")
            lines += ["", "| share | function (inclusive) |", "|---|---|"]
            for where, n in prof["inclusive"][:25]:
                lines.append(f"| {n / total:.0%} | `{where}` |")
    return "\n".join(lines) + "\n"


TARGET_CPU_MS_PER_NODE_ROUND = 2.0  # issue 9's targets, drawn on the plot
TARGET_P99_MS = 250.0


def plot(document: dict, path: Path) -> None:
    """Two panels against the number of nodes, a line per database, replica count and hub
    (baseline / this): hub CPU per node-round and the upload and assignment p99, each with
    its target. Written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in document["results"]:
        key = f"{r['db']}, {r.get('replicas', 1)} replica(s), {r.get('variant', 'this')}"
        key += f", train/deadline {shape(r)} s" if "train_s" in r else ""
        series.setdefault(key, []).append(r)
    fig, (cpu_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, results in series.items():
        results = sorted(results, key=lambda r: r["nodes"])
        nodes = [r["nodes"] for r in results]
        line = cpu_ax.plot(nodes, [r["hub_cpu_ms_per_contribution"] for r in results], "o-")
        cpu_ax.lines[-1].set_label(key)
        color = line[0].get_color()
        for name, style, p99 in (
            ("upload", "o-", [r["endpoints"].get("upload", {}) for r in results]),
            ("round start spread", "^-.", [r.get("round_start_spread") or {} for r in results]),
            (
                "assignment request incl. long-poll wait",
                "s:",
                [r["endpoints"].get("assignment", {}) for r in results],
            ),
        ):
            values = [e.get("p99_ms", math.nan) if e.get("n") else math.nan for e in p99]
            if not all(math.isnan(v) for v in values):
                p99_ax.plot(nodes, values, style, color=color, label=f"{key}: {name}")
    cpu_ax.axhline(TARGET_CPU_MS_PER_NODE_ROUND, color="k", ls=":", label="target (2 ms)")
    p99_ax.axhline(TARGET_P99_MS, color="grey", lw=3, alpha=0.4, label="target (250 ms)")
    cpu_ax.set(xlabel="nodes", ylabel="hub CPU ms per node-round", xscale="log", yscale="log")
    p99_ax.set(xlabel="nodes", ylabel="p99 latency, ms", xscale="log", yscale="log")
    for ax in (cpu_ax, p99_ax):  # plain numbers, not powers of ten
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cpu_ax.set_yticks([v for v in (1, 2, 5, 10, 20, 50, 100, 200) if v <= cpu_ax.get_ylim()[1]])
    all_nodes = sorted({r["nodes"] for r in document["results"]})
    for ax in (cpu_ax, p99_ax):  # a tick at each swarm size measured
        ax.set_xticks(all_nodes)
    cpu_ax.set_title("hub CPU per node and round")
    p99_ax.set_title(
        "p99: upload (solid), round start spread (dash-dot),\n"
        "assignment request incl. long-poll wait (dotted)",
        fontsize=9,
    )
    cpu_ax.legend(fontsize=7)
    p99_ax.legend(fontsize=6)
    fig.suptitle(textwrap.fill(document["command"], 200), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument(
        "--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1],
        help="hub processes on one PostgreSQL database (SQLite runs use 1)",
    )
    parser.add_argument("--quick", action="store_true", help="1k nodes, SQLite, short")
    parser.add_argument("--train-s", type=float, default=5.0, help="simulated training per round")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--ramp-s", type=float, default=None, help="registration spread")
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--measure-s", type=float, default=45.0)
    parser.add_argument("--hub-src", type=Path, default=None, help="run the hub from this src/")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run every configuration with the hub from this src/ (before/after)",
    )
    parser.add_argument(
        "--baseline-plain-http",
        action="store_true",
        help="run the baseline hub without httptools/uvloop (h11 and asyncio), as before they "
        "were dependencies",
    )
    parser.add_argument(
        "--this-plain",
        action="store_true",
        help="also run this checkout's hub without httptools/uvloop (the levers apart)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the first replica's CPU by code line"
    )
    parser.add_argument("--profile-interval-s", type=float, default=0.05)
    parser.add_argument("--label", default="", help="tag stored with the results (e.g. baseline)")
    parser.add_argument("--out", type=Path, default=None, help="JSON; Markdown beside it")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the results already in --out and add these (e.g. another load shape)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="keep the hubs' logs in this folder"
    )
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.db, args.warmup_s, args.measure_s = [1000], ["sqlite"], 10.0, 30.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the hub on SIGTERM
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(args.nodes) + 256 > hard:
        sys.exit(f"open-file limit {hard} is too low for {max(args.nodes)} nodes")
    command = "python " + " ".join(sys.argv)
    load_average = os.getloadavg()
    variants = ["baseline"] if args.baseline_src is not None else []
    variants += ["this-plain"] if args.this_plain else []
    variants += ["this"]
    console = Console(width=240)
    results = []
    with tempfile.TemporaryDirectory(prefix="hub-load-") as tmp:
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep_logs)
        for nodes in args.nodes:
            for db in args.db:
                for replicas in args.replicas if db == "postgres" else [1]:
                    for variant in variants:
                        console.print(f"[bold]{db}, {replicas} hub(s), {variant}, {nodes}[/bold]")
                        results.append(one(db, nodes, replicas, variant, args, Path(tmp)))
                        console.print(table(results[-1:], ""))
    title = f"hub load {args.label}".strip()
    console.print(table(results, title))
    out = args.out or Path(__file__).parent / "results" / (
        "hub_load_quick.json" if args.quick else "hub_load.json"
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    document = {
        "label": args.label,
        "command": command,
        "cpus": os.cpu_count(),
        "load_average": load_average,
        "settings": settings,
        "results": results,
    }
    if args.append and out.exists():  # another shape beside the runs already there
        before = json.loads(out.read_text())
        document = {
            **before,
            "command": f"{before['command']}` then `{command}",
            "load_average": before["load_average"],
            "later_load_averages": [*before.get("later_load_averages", []), load_average],
            "later_settings": [*before.get("later_settings", []), settings],
            "results": [*before["results"], *results],
        }
    out.write_text(json.dumps(document, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(document))
    plot(document, out.with_suffix(".png"))
    console.print(f"written to {out} and its .md and .png")


if __name__ == "__main__":
    main()
