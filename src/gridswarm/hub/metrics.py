"""Operator metrics: `GET /metrics` in the Prometheus text format (`prometheus_client`).

What a monitoring system scrapes from a hub: its HTTP requests (count and latency by route
*template*, method and status class; requests in flight), its refusals by typed reason
(`protocol.Refusal`), its state (live nodes as the heartbeat pacing last counted them, the
heartbeat interval it advertises, active runs, public reads waiting for their threads, uploads
in flight, the batchers' queues) and its work (rounds closed and re-planned, how long a close
and a tick take, contributions accepted, the nonce book's group commits, blob downloads).

Every label value comes from a bounded set the hub's code fixes: route templates
(`/v1/runs/{run_id}`, never the path a client sent), a method from `METHODS` (anything else is
`other`), a status class (`2xx`), a `Refusal` member, a round decision. Nothing a stranger
chooses (a run id, a node id, a path, a header) ever becomes a label, so a flood of odd
requests cannot grow the series without bound.

Cost: one `RequestMetrics` ASGI middleware per request (two clock reads, one cached label
lookup, a counter, a histogram and a gauge under their own small locks: ~4 µs, ~1 % of the
cheapest signed request, bench/results/metrics_cost.md); the state gauges are read from memory
(no SQL) by the round ticker every tick and by the scrape itself.

Several processes (`gridswarm hub --workers N`): `use_multiprocess` (called by the server before
it forks the replicas) switches prometheus_client to its multiprocess mode over a per-hub
temporary folder, so any replica's `/metrics` answers for all of them: counters and histograms
summed over the replicas (dead ones included, so totals never go back), in-flight gauges summed
over the live ones (`livesum`), and the hub-wide figures each replica reads alike (live nodes,
heartbeat interval, active runs) as the most recently set value (`mostrecent`). Hubs on several
machines each serve their own `/metrics` (scrape every one).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import prometheus_client.values
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for the folder
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format: every Prometheus reads it
UNMATCHED = "unmatched"  # the route label of a request no route matched (404)
OTHER = "other"  # the method label of any method outside METHODS
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
# seconds; long-polls (`/assignment`, up to `WaitParam`'s 60 s) land in the top buckets
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CLOSE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TICK_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
NONCE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUEUES = ("asks", "uploads", "registrations", "locked_threads")  # the `queue` label's values


class WorkObserver:
    """What `HubService` reports as it works: nothing is recorded here (a service without
    metrics, the default); `HubMetrics` records it. Each call is made where the work happens
    (hub/service.py), so the service knows no metric library."""

    def nonce_batch(self, size: int, commit_s: float) -> None:
        """The nonce book stored `size` nonces in one commit that took `commit_s` seconds."""

    def round_advanced(self, decision: str, elapsed_s: float) -> None:
        """The ticker advanced one run's round (`rounds.Decision` value) in `elapsed_s`."""

    def active_runs(self, count: int) -> None:
        """The ticker found `count` active runs (the replica holding the ticker lease)."""


NO_METRICS = WorkObserver()


def multiprocess_dir() -> str | None:
    """The multiprocess folder when prometheus_client runs in multiprocess mode, else None."""
    if getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
        return os.environ.get(MULTIPROC_ENV)
    return None


def use_multiprocess(path: str) -> None:
    """Switch this process (and the replicas it forks afterwards) to prometheus_client's
    multiprocess mode over the empty folder `path`: what the library decides from
    `PROMETHEUS_MULTIPROC_DIR` when it is first imported, decided here instead, because the
    hub imports it long before it knows it will fork. Metric objects made after this call
    write their values to per-process files in `path`; `HubMetrics` made before it stay
    in-process (the server makes them only in the forked replicas)."""
    os.environ[MULTIPROC_ENV] = path
    prometheus_client.values.ValueClass = prometheus_client.values.MultiProcessValue()


def process_ended(pid: int) -> None:
    """A replica process ended: its live gauges (`livesum`) stop counting (its counters stay)."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)


@dataclass(frozen=True)
class HubState:
    """The hub's state figures as one sample (read from memory, no SQL)."""

    live_nodes: int
    heartbeat_interval_s: float
    public_reads_waiting: int
    public_reads_running: int
    queued: dict[str, int]  # by `QUEUES` name
    blobs: dict[str, int]  # `BlobCounters.snapshot()`: this process's totals since it started


class HubMetrics(WorkObserver):
    """The registry and every metric object of one hub process (one per app: in-process test
    hubs do not share counts). `sample` refreshes the state gauges; `scrape` renders them."""

    def __init__(self) -> None:
        self.multiprocess_path = multiprocess_dir()
        # in multiprocess mode the values live in the folder's files, and a scrape reads them
        # all (`MultiProcessCollector`): registering here too would count this process twice
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess_path else self.registry
        http = ("route", "method", "status")
        self.requests = Counter(
            "gridswarm_http_requests", "HTTP requests answered", http, registry=reg
        )
        self.latency = Histogram(
            "gridswarm_http_request_duration_seconds",
            "HTTP request time, first byte received to last byte sent",
            http,
            buckets=REQUEST_BUCKETS_S,
            registry=reg,
        )
        self.in_flight = Gauge(
            "gridswarm_http_requests_in_flight",
            "HTTP requests being handled (long-polls included)",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.refusals = Counter(
            "gridswarm_refusals", "requests refused, by typed reason", ["reason"], registry=reg
        )
        self.live_nodes = Gauge(
            "gridswarm_live_nodes",
            "nodes heard from within the liveness window (the pacing's count, every 5 s)",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.heartbeat_interval = Gauge(
            "gridswarm_heartbeat_interval_seconds",
            "heartbeat interval the hub advertises to nodes now",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.runs_active = Gauge(
            "gridswarm_active_runs",
            "active runs (as the ticker, on the replica holding its lease, last listed them)",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.public_reads_waiting = Gauge(
            "gridswarm_public_reads_waiting",
            "unsigned reads waiting for their threads (429 busy beyond the bound)",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.public_reads_running = Gauge(
            "gridswarm_public_reads_running",
            "unsigned reads running on their threads",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.uploads_in_flight = Gauge(
            "gridswarm_uploads_in_flight",
            "contributions arriving, being checked or waiting for their decision",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.queued = Gauge(
            "gridswarm_queued",
            "requests queued for a batch decision (asks, uploads, registrations) or waiting "
            "for the threads that take the service lock",
            ["queue"],
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.rounds_closed = Counter(
            "gridswarm_rounds_closed", "rounds closed (a new version published)", registry=reg
        )
        self.rounds_replanned = Counter(
            "gridswarm_rounds_replanned", "rounds re-planned instead of closed", registry=reg
        )
        self.close_seconds = Histogram(
            "gridswarm_round_close_seconds",
            "time to close a round: aggregate, outer step, blobs, held-out loss, commit",
            buckets=CLOSE_BUCKETS_S,
            registry=reg,
        )
        self.tick_seconds = Histogram(
            "gridswarm_tick_seconds",
            "time of one round-ticker tick (every run's advance)",
            buckets=TICK_BUCKETS_S,
            registry=reg,
        )
        self.contributions = Counter(
            "gridswarm_contributions_accepted", "contributions accepted and stored", registry=reg
        )
        self.nonce_batch_size = Histogram(
            "gridswarm_nonce_batch_size",
            "nonces stored per group commit",
            buckets=NONCE_BATCH_BUCKETS,
            registry=reg,
        )
        self.nonce_commit_seconds = Histogram(
            "gridswarm_nonce_commit_seconds",
            "time of one group commit of nonces",
            buckets=COMMIT_BUCKETS_S,
            registry=reg,
        )
        self.blob_downloads = Counter(
            "gridswarm_blob_downloads",
            "blob downloads answered with bytes (served) or a presigned URL (redirected)",
            ["answer"],
            registry=reg,
        )
        self.blob_served_bytes = Counter(
            "gridswarm_blob_served_bytes", "bytes of blobs the hub served itself", registry=reg
        )
        self._blobs_seen: dict[str, int] = {}  # `BlobCounters` totals already counted
        self._sample_lock = threading.Lock()
        # (route, method, status class) -> its two children: a dict read per request instead
        # of prometheus_client's label lookup (bounded: routes x METHODS+1 x 5)
        self._http: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._refused: dict[str, Counter] = {}
        for queue in QUEUES:  # every series present from the start (0), not on first use
            self.queued.labels(queue)
        for answer in ("served", "redirected"):
            self.blob_downloads.labels(answer)

    # ------------------------------------------------------------ per request

    def observe_request(self, route: str, method: str, status: int, elapsed_s: float) -> None:
        """One answered request: `route` a template, `method` and `status` as sent/answered."""
        status_class = STATUS_CLASSES.get(status // 100, OTHER)
        key = (route, method if method in METHODS else OTHER, status_class)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.requests.labels(*key),
                self.latency.labels(*key),
            )
        children[0].inc()
        children[1].observe(elapsed_s)

    def refused(self, reason: str) -> None:
        """One refusal (`HubError.reason`, a `Refusal` member)."""
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.refusals.labels(reason)
        child.inc()

    # ------------------------------------------------------------ work (WorkObserver)

    def nonce_batch(self, size: int, commit_s: float) -> None:
        self.nonce_batch_size.observe(size)
        self.nonce_commit_seconds.observe(commit_s)

    def round_advanced(self, decision: str, elapsed_s: float) -> None:
        if decision == "close":
            self.rounds_closed.inc()
            self.close_seconds.observe(elapsed_s)
        elif decision == "replan":
            self.rounds_replanned.inc()

    def active_runs(self, count: int) -> None:
        self.runs_active.set(count)

    # ------------------------------------------------------------ state and scrape

    def sample(self, state: HubState) -> None:
        """Set the state gauges from `state`; blob counts move by what grew since the last."""
        with self._sample_lock:
            self.live_nodes.set(state.live_nodes)
            self.heartbeat_interval.set(state.heartbeat_interval_s)
            self.public_reads_waiting.set(state.public_reads_waiting)
            self.public_reads_running.set(state.public_reads_running)
            for queue, depth in state.queued.items():
                self.queued.labels(queue).set(depth)
            # two samplers (the ticker, a scrape) may read the totals in either order: only
            # what grew past the largest total already counted is counted
            grown = {k: v - self._blobs_seen.get(k, 0) for k, v in state.blobs.items()}
            for k, v in state.blobs.items():
                self._blobs_seen[k] = max(v, self._blobs_seen.get(k, 0))
            for answer in ("served", "redirected"):
                if grown.get(answer, 0) > 0:
                    self.blob_downloads.labels(answer).inc(grown[answer])
            if grown.get("served_bytes", 0) > 0:
                self.blob_served_bytes.inc(grown["served_bytes"])

    def scrape(self) -> bytes:
        """The text exposition of this hub (of every replica process in multiprocess mode)."""
        if self.multiprocess_path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.multiprocess_path)
        return generate_latest(registry)


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by route template (the route
    FastAPI matched, `UNMATCHED` when none did), method and status class; holds the in-flight
    gauge. A request that fails without an answer counts as 500 (what the server sends)."""

    def __init__(self, app: ASGIApp, metrics: HubMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, answer)
        finally:
            metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)
