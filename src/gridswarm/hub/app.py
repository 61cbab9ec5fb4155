"""The hub's HTTP API (FastAPI). Thin: it checks size and signatures, then calls `HubService`.

Every mutating request is signed by its sender (see `gridswarm.identity`); the body is read with a
hard size limit before anything else happens, path and query parameters are bounded, and every
refusal is a `HubError` turned into `{"detail", "reason"}` (`protocol.Problem`) by one handler.
Unless turned off, `GET /metrics` serves the operator's Prometheus metrics (hub/metrics.py): the
`RequestMetrics` middleware times every request, the error handler counts refusals by reason,
and the ticker samples the hub's state every tick.
The OpenAPI document names every request body and error response (`openapi_body`), so a client
can be generated from it. A background thread ticks the round state machine so deadlines fire
without any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated, Generic, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gridswarm.blobs import read_span
from gridswarm.hub.dashboard import add_dashboard_routes
from gridswarm.hub.datasets import add_dataset_routes
from gridswarm.hub.downloads import BlobRedirect, BlobSpan
from gridswarm.hub.errors import HubError
from gridswarm.hub.lifecycle import RunEvent
from gridswarm.hub.membership import Registration
from gridswarm.hub.metrics import CONTENT_TYPE, HubMetrics, HubState, RequestMetrics
from gridswarm.hub.openapi import (
    ERROR_RESPONSES,
    RunIdParam,
    WaitParam,
    install_openapi,
    openapi_body,
)
from gridswarm.hub.privacy import add_privacy_routes
from gridswarm.hub.service import HubService
from gridswarm.hub.trust import add_trust_routes
from gridswarm.hub.uploads import Upload
from gridswarm.hub.weights import add_weights_routes
from gridswarm.identity import HEADER_SIGNATURE, VerifiedRequest
from gridswarm.protocol import (
    API,
    DIGEST_PATTERN,
    MAX_JSON_BYTES,
    AssignmentResponse,
    ContributionAck,
    Empty,
    EnergyReport,
    FailureReport,
    HeartbeatRequest,
    HeartbeatResponse,
    NodeStatus,
    Refusal,
    RegisterRequest,
    RegisterResponse,
    RunCreateRequest,
    RunCreateResponse,
    RunStateRequest,
    describe_errors,
)

OCTET_STREAM = "application/octet-stream"
TICK_S = 0.25
LOCKED_THREADS = 4  # threads for requests that take the service's lock (work, uploads, leave)
# Unsigned reads (run status and reports, the ledger and its verification, the dashboard): anyone
# may send them and some read a whole run or the whole chain, so they run on their own few
# threads, and a flood of them is refused (429 `busy`) rather than queued without bound or let
# onto the threads the swarm's requests run on
PUBLIC_READ_THREADS = 2
MAX_PUBLIC_READS_WAITING = 16
MAX_ASK_BATCH = 128  # asks for work decided in one transaction (`RunBatcher`)
MAX_UPLOAD_BATCH = 32  # checked uploads stored in one transaction (`RunBatcher`)
MAX_REGISTER_BATCH = 128  # node registrations decided in one transaction (`RunBatcher`)
REGISTRATIONS = "registrations"  # the one key registrations are gathered under
INLINE_BLOB_BYTES = 1 << 20  # whole blobs up to this size are answered from memory, read in
# the worker thread that checked the request, not streamed from the file in further hops
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Item = TypeVar("Item")  # what a batched request carries (`RunBatcher`)
R = TypeVar("R")  # its answer
log = logging.getLogger("gridswarm.hub")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 20:
            raise HubError(400, "malformed content-length header")
        if int(declared) > limit:
            raise HubError(413, f"request body of {declared} bytes exceeds the {limit} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HubError(413, f"request body exceeds the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class RoundSignals:
    """Wakes the long-polls of a run when its round changes (a close, a replan, a place freed).

    `notify` may be called from any thread (the ticker, request threads); waiters take the
    run's current event *before* asking the service, so a change between their question and
    their wait is never missed. One event per run and generation: set, then replaced.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: dict[str, asyncio.Event] = {}

    def current(self, run_id: str) -> asyncio.Event:
        return self.events.setdefault(run_id, asyncio.Event())

    def _wake(self, run_id: str) -> None:
        event = self.events.pop(run_id, None)
        if event is not None:
            event.set()

    def notify(self, run_id: str) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, run_id)


class RunBatcher(Generic[Item, R]):
    """Gathers the requests of each run that arrive while one batch of them is decided, and has
    the service decide them together: asks for work (`Asks.assignments_or_wait`) and
    checked uploads (`Uploads.store_uploads`); and, under one key for the whole hub, node
    registrations (`Membership.register_many`).

    The first request of a quiet run is decided at once, alone: none waits for company. Under
    load, each decision takes every request that queued during the previous one (at most
    `max_batch`), so what a decision costs once (the lock, the run's row lock, the round's
    counts, the commit and its fsync) is paid per batch instead of per request: 5,000 nodes
    asking as a round opens are a few dozen decisions, not 5,000 one after the other."""

    def __init__(
        self,
        decide: Callable[[str, list[Item]], Awaitable[list[R | BaseException]]],
        max_batch: int,
    ) -> None:
        self._decide = decide
        self._max_batch = max_batch
        self._queues: dict[str, list[tuple[Item, asyncio.Future]]] = {}
        self._draining: dict[str, asyncio.Task] = {}

    def queued(self) -> int:
        """Requests waiting for the next batch of their run (the operator's queue depth)."""
        return sum(len(queue) for queue in list(self._queues.values()))

    async def ask(self, run_id: str, item: Item) -> R:
        """`item`'s answer (raises its refusal), decided in the next batch of `run_id`."""
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(run_id, []).append((item, future))
        if run_id not in self._draining:
            self._draining[run_id] = asyncio.create_task(self._drain(run_id))
        answer = await future
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def _drain(self, run_id: str) -> None:
        try:
            while queue := self._queues.pop(run_id, None):
                if len(queue) > self._max_batch:  # the rest goes first in the next batch
                    queue, rest = queue[: self._max_batch], queue[self._max_batch :]
                    self._queues[run_id] = rest
                waiting = [(i, f) for i, f in queue if not f.done()]  # done: the client left
                if not waiting:
                    continue
                try:
                    answers: list = await self._decide(run_id, [i for i, _ in waiting])
                except Exception as exc:  # the run's refusal (404) or a failure: every one's
                    answers = [exc] * len(waiting)
                for (_, future), answer in zip(waiting, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            del self._draining[run_id]


def create_app(
    service: HubService, max_upload_bytes: int = 256 * 1024 * 1024, metrics: bool = True
) -> FastAPI:
    """The hub's app over `service`; `metrics=False` (`gridswarm hub --no-metrics`): no
    `/metrics` route (404) and no per-request instrumentation."""
    stop = threading.Event()
    observed = HubMetrics() if metrics else None
    if observed is not None:
        service.metrics = service.nonces.observer = observed  # work counted where it happens
    signals = RoundSignals()
    # calls that take the service's lock run on their own few threads, so that while they queue
    # for it the shared pool stays free for heartbeats, nonces and reads
    locked_limiter: list[anyio.CapacityLimiter] = []

    def locked() -> anyio.CapacityLimiter:
        if not locked_limiter:  # an app driven without its lifespan (in-process test clients)
            locked_limiter.append(anyio.CapacityLimiter(LOCKED_THREADS))
        return locked_limiter[0]

    async def under_lock(fn: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=locked())

    public_limiter: list[anyio.CapacityLimiter] = []

    async def public_read(fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the public reads' threads, or 429 `busy` when too many already wait."""
        if not public_limiter:  # an app driven without its lifespan (in-process test clients)
            public_limiter.append(anyio.CapacityLimiter(PUBLIC_READ_THREADS))
        limiter = public_limiter[0]
        if limiter.statistics().tasks_waiting >= MAX_PUBLIC_READS_WAITING:
            raise HubError(
                429,
                f"{MAX_PUBLIC_READS_WAITING} public reads are waiting already; try again shortly",
                Refusal.BUSY,
                headers={"Retry-After": "1"},
            )
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    asks: RunBatcher[str, tuple[AssignmentResponse, float | None]] = RunBatcher(
        lambda run_id, node_ids: under_lock(service.asks.assignments_or_wait, run_id, node_ids),
        MAX_ASK_BATCH,
    )
    uploads: RunBatcher[Upload, ContributionAck] = RunBatcher(
        lambda run_id, checked: under_lock(service.uploads.store_uploads, run_id, checked),
        MAX_UPLOAD_BATCH,
    )
    registrations: RunBatcher[Registration, str] = RunBatcher(
        lambda _, batch: under_lock(service.membership.register_many, batch), MAX_REGISTER_BATCH
    )

    def sample_state() -> None:
        """Refresh the metrics' state gauges from memory (the ticker, every tick; a scrape)."""
        if observed is None:
            return
        reads = public_limiter[0].statistics() if public_limiter else None
        observed.sample(
            HubState(
                live_nodes=service.membership.pacing.live_nodes,
                heartbeat_interval_s=service.membership.pacing.interval_s(),
                public_reads_waiting=reads.tasks_waiting if reads else 0,
                public_reads_running=reads.borrowed_tokens if reads else 0,
                queued={
                    "asks": asks.queued(),
                    "uploads": uploads.queued(),
                    "registrations": registrations.queued(),
                    "locked_threads": (
                        locked_limiter[0].statistics().tasks_waiting if locked_limiter else 0
                    ),
                },
                blobs=service.downloads.counters.snapshot(),
            )
        )

    def ticker() -> None:
        while not stop.wait(TICK_S):
            started = time.perf_counter()
            try:
                service.ticker.tick()  # isolates each run's failure itself (Ticker.tick)
            except Exception:
                log.exception("round tick failed")
            if observed is not None:
                observed.tick_seconds.observe(time.perf_counter() - started)
                try:
                    sample_state()
                except Exception:
                    log.exception("sampling the hub's state for its metrics failed")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        signals.loop = asyncio.get_running_loop()
        locked_limiter[:] = [anyio.CapacityLimiter(LOCKED_THREADS)]
        public_limiter[:] = [anyio.CapacityLimiter(PUBLIC_READ_THREADS)]
        service.round_changed = signals.notify
        thread = threading.Thread(target=ticker, name="round-ticker", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=5)

    app = FastAPI(
        title="gridswarm hub", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES
    )
    install_openapi(app)
    if observed is not None:
        app.add_middleware(RequestMetrics, metrics=observed)

    @app.exception_handler(HubError)
    async def _hub_error(_: Request, exc: HubError) -> JSONResponse:
        """The one error handler: every refusal is `{"detail": str, "reason": Refusal}`."""
        if observed is not None:
            observed.refused(exc.reason.value)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Routing errors (no such path, method not allowed) in the same shape."""
        return await _hub_error(request, HubError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = HubError(422, f"malformed request: {describe_errors(exc.errors())}")
        return await _hub_error(request, error)

    async def signed_then(
        request: Request,
        limit: int,
        then: Callable[[VerifiedRequest, bytes], T],
        limiter: anyio.CapacityLimiter | None = None,
        admit: Callable[[VerifiedRequest], None] | None = None,
    ) -> T:
        """Read the body (at most `limit` bytes), verify the request and store its nonce, then
        `then(verified, body)` in the same worker thread: one thread hop per request instead
        of two (each costs a handoff of the GIL and of the event loop). `admit` may refuse the
        verified request before its nonce is stored."""
        body = await read_body(request, limit)
        headers, method, path = dict(request.headers), request.method, request.url.path

        def authenticated() -> T:
            return then(service.authenticate(headers, method, path, body, admit), body)

        return await anyio.to_thread.run_sync(authenticated, limiter=limiter)

    async def signed(
        request: Request, limit: int, admit: Callable[[VerifiedRequest], None] | None = None
    ) -> tuple[VerifiedRequest, bytes]:
        """The verified request and its body (`signed_then` with nothing more to do)."""
        return await signed_then(request, limit, lambda v, body: (v, body), admit=admit)

    def peer(request: Request) -> str | None:
        """The client's address as the ASGI server gives it (behind a proxy: the proxy's,
        unless the server was told to believe its X-Forwarded-For: --forwarded-allow-ips)."""
        return request.client.host if request.client is not None else None

    def parse(model: type[M], body: bytes) -> M:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise HubError(422, f"malformed request: {describe_errors(exc.errors())}") from exc

    @app.get("/healthz")
    async def healthz() -> dict:
        """Up, and what the blob route did (`served`: downloads the hub answered with bytes,
        `served_bytes`, `redirected`: downloads sent to presigned object-store URLs)."""
        return {"ok": True, "blobs": service.downloads.counters.snapshot()}

    if observed is not None:

        @app.get("/metrics", include_in_schema=False)
        async def metrics_text() -> Response:
            """Prometheus text format (hub/metrics.py): aggregate figures only, unsigned like
            the other public reads and through the same bounded gate (429 `busy`)."""

            def scrape() -> bytes:
                sample_state()
                return observed.scrape()

            return Response(await public_read(scrape), media_type=CONTENT_TYPE)

    @app.post(f"{API}/nodes/register", openapi_extra=openapi_body(RegisterRequest))
    async def register(request: Request) -> RegisterResponse:
        """Invited keys only (403 `not_invited`), or on an open hub within the bounds on new
        identities per client network and in all (429 `registration_limited`); a key already
        registered is never refused by those (hub/registration.py)."""
        address = peer(request)
        verified, body = await signed(
            request,
            MAX_JSON_BYTES,
            lambda v: service.membership.registration.precheck(v.public_key, address),
        )
        req = parse(RegisterRequest, body)
        node_id = await registrations.ask(
            REGISTRATIONS, Registration(verified.public_key, req, address)
        )
        return RegisterResponse(
            node_id=node_id, heartbeat_s=service.membership.heartbeat_interval_s()
        )

    @app.post(f"{API}/nodes/heartbeat", openapi_extra=openapi_body(HeartbeatRequest))
    async def heartbeat(request: Request) -> HeartbeatResponse:
        """A sign of life with the node's status. The answer's `heartbeat_s` is the interval
        the node should use from now on: it grows with the live nodes (hub/pacing.py), and any
        signed request counts as a sign of life, so a node beats only after that long without
        an answer from the hub."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        req = parse(HeartbeatRequest, body or b"{}")
        if service.membership.knows(verified.node_id):  # a note in memory: no thread needed
            service.membership.heartbeat(verified.node_id, req.status)
        else:  # once per node and process: its row is looked up
            await run_in_threadpool(service.membership.heartbeat, verified.node_id, req.status)
        return HeartbeatResponse(heartbeat_s=service.membership.heartbeat_interval_s())

    @app.post(f"{API}/nodes/energy", openapi_extra=openapi_body(EnergyReport))
    async def energy(request: Request) -> dict:
        """A node's energy state and forecast (hub/energy.py plans with it)."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        report = parse(EnergyReport, body)
        await run_in_threadpool(service.membership.report_energy, verified.node_id, report)
        return {"ok": True}

    @app.post(f"{API}/nodes/leave", openapi_extra=openapi_body(Empty, required=False))
    async def leave(request: Request) -> dict:
        verified, _ = await signed(request, MAX_JSON_BYTES)
        released = await under_lock(service.membership.leave, verified.node_id)
        return {"released_assignments": released}

    @app.post(f"{API}/runs", openapi_extra=openapi_body(RunCreateRequest))
    async def create_run(request: Request) -> RunCreateResponse:
        verified, body = await signed(request, MAX_JSON_BYTES)
        req = parse(RunCreateRequest, body)
        return await run_in_threadpool(service.create_run, verified.public_key, req.config)

    @app.get(f"{API}/runs")
    async def list_runs() -> list[dict]:
        return await public_read(service.list_runs)

    @app.get(f"{API}/runs/{{run_id}}")
    async def run_status(run_id: RunIdParam) -> dict:
        return await public_read(service.run_status, run_id)

    @app.post(f"{API}/runs/{{run_id}}/state", openapi_extra=openapi_body(RunStateRequest))
    async def run_state(run_id: RunIdParam, request: Request) -> dict:
        """The sponsor pauses, resumes or stops its run (hub/lifecycle.py)."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        req = parse(RunStateRequest, body)
        return await run_in_threadpool(
            service.change_run_state, run_id, verified.public_key, RunEvent(req.event), req.reason
        )

    @app.post(f"{API}/runs/{{run_id}}/failures", openapi_extra=openapi_body(FailureReport))
    async def run_failure(run_id: RunIdParam, request: Request) -> dict:
        """A node could not train its assignment; enough of these mark the run stalled."""
        verified, body = await signed(request, MAX_JSON_BYTES)
        report = parse(FailureReport, body)
        return await run_in_threadpool(service.report_failure, run_id, verified.node_id, report)

    @app.get(f"{API}/runs/{{run_id}}/report")
    async def run_report(run_id: RunIdParam) -> dict:
        """Energy and carbon per node and per run, with the agnostic counterfactual."""
        return await public_read(service.run_report, run_id)

    @app.get(f"{API}/runs/{{run_id}}/versions/latest")
    async def latest_version(run_id: RunIdParam) -> dict:
        return await public_read(service.latest_version, run_id)

    @app.post(
        f"{API}/runs/{{run_id}}/assignment", openapi_extra=openapi_body(Empty, required=False)
    )
    async def assignment(
        run_id: RunIdParam, request: Request, wait_s: WaitParam = 10.0
    ) -> AssignmentResponse:
        """Long-poll: answers as soon as there is work (or the run ends), else after `wait_s`.
        While waiting it holds no thread and no lock: it sleeps until the run's round changes
        (or the service's recheck time passes), then asks once more."""
        verified, _ = await signed(request, MAX_JSON_BYTES)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        while True:
            changed = signals.current(run_id)  # before asking: no change can slip between
            answer, recheck_s = await asks.ask(run_id, verified.node_id)
            left_s = give_up - loop.time()
            if answer.status != "wait" or left_s <= 0:
                return answer
            ask_at = loop.time() + min(recheck_s or left_s, left_s)
            while not changed.is_set() and loop.time() < ask_at:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(),
                        min(ask_at - loop.time(), service.membership.liveness_s() / 2),
                    )
                if not changed.is_set():  # still connected, so alive (a note, no lock)
                    service.membership.heartbeat(verified.node_id, NodeStatus.IDLE)
            if recheck_s is None and not changed.is_set():
                # only a change of the round could alter the answer, and none came: the same
                # answer, without asking (and queueing for the lock) once more at the end
                return answer

    @app.post(f"{API}/runs/{{run_id}}/contributions", openapi_extra=openapi_body(binary=True))
    async def contribute(run_id: RunIdParam, request: Request) -> ContributionAck:
        """Body: one safetensors blob, the encoded update plus `ContributionMeta` as metadata.
        From its arrival until it is decided, a round at its deadline waits for it (a while:
        `rounds.ARRIVING_GRACE_S`)."""
        arriving = observed.uploads_in_flight.track_inprogress() if observed else nullcontext()
        with arriving, service.arriving.receiving(run_id, service.clock()):
            checked = await signed_then(
                request,
                max_upload_bytes,
                lambda v, body: service.uploads.check_upload(
                    run_id, v.node_id, body, v.body_sha256
                ),
                limiter=locked(),
            )
            ack = await uploads.ask(run_id, checked)
        if observed is not None and ack.accepted:
            observed.contributions.inc()
        return ack

    add_privacy_routes(app, service, signed, max_upload_bytes)  # /v1/runs/{id}/secagg/...
    add_dataset_routes(app, service, signed, max_upload_bytes)  # /v1/datasets: sponsors push
    add_weights_routes(app, service, signed, max_upload_bytes)  # /v1/weights: runs start from
    add_trust_routes(app, service, signed, public_read)  # /v1/ledger, /v1/runs/{id}/fund, balances
    add_dashboard_routes(app, service, public_read)  # HTML pages: / and /runs/{id} (read-only)

    @app.get(f"{API}/blobs/{{digest}}")
    async def blob(
        digest: Annotated[str, Path(pattern=DIGEST_PATTERN)], request: Request
    ) -> Response:
        """A published version, delta or dataset blob (whole, or one `Range`). On an S3 hub a
        `307` to a short-lived presigned object-store URL (the client sends the same Range
        there, without its signature headers, and checks the sha256 itself)."""
        range_header = request.headers.get("range")

        def download(node_id: str | None) -> tuple[BlobSpan | BlobRedirect, bytes | None]:
            """The answer, with its bytes read here when they are a range or a small blob."""
            answer = service.downloads.download(digest, node_id, range_header)
            inline = isinstance(answer, BlobSpan) and (
                answer.partial or answer.size <= INLINE_BLOB_BYTES
            )
            data = read_span(answer.path, answer.start, answer.length) if inline else None
            return answer, data

        if request.headers.get(HEADER_SIGNATURE):  # signed downloads are counted per node
            answer, data = await signed_then(request, 0, lambda v, _: download(v.node_id))
        else:
            answer, data = await run_in_threadpool(download, None)
        if isinstance(answer, BlobRedirect):
            headers = {"location": answer.url, "cache-control": "no-store"}
            return Response(status_code=307, headers=headers)
        span = answer
        headers = {"accept-ranges": "bytes"}
        if data is None:  # a large whole blob: streamed from its file
            return FileResponse(span.path, media_type=OCTET_STREAM, headers=headers)
        if not span.partial:
            return Response(content=data, media_type=OCTET_STREAM, headers=headers)
        headers["content-range"] = f"bytes {span.start}-{span.start + span.length - 1}/{span.size}"
        return Response(content=data, status_code=206, media_type=OCTET_STREAM, headers=headers)

    return app
