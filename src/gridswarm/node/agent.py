"""The node's main loop: register, pull an assignment, train, upload, repeat.

A node keeps its identity key and a cache of model versions and dataset shards (by hash) in its
home folder. When it holds the previous version it downloads only the encoded update and rebuilds
the new weights exactly, checking the result against the version's hash. SIGINT/SIGTERM stop it
between steps; it tells the hub it is leaving, so its unfinished assignment is released rather
than awaited.

A node first makes sure it can reach its hub: while it cannot, it says so and retries with backoff
(a countdown in its log) until the hub answers, `connect_timeout_s` passes, or it is stopped. One
process at a time may use a home folder (`gridswarm.home`). An assignment it cannot train (its
dataset is missing, the model does not fit) is reported to the hub with the reason, which marks the
run stalled after a few such failures (hub/lifecycle.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from gridswarm.blobs import BlobError, LocalBlobStore, sha256_hex
from gridswarm.config import RunConfig
from gridswarm.home import lock_home
from gridswarm.hub.lifecycle import RunState
from gridswarm.identity import Identity
from gridswarm.node.client import ClientStopped, HubClient, HubRequestError
from gridswarm.node.energy import (
    EnergyUse,
    NodeEnergy,
    load_node_energy,
    scale_energy,
)
from gridswarm.node.interrupts import Held, PausedPastDeadline, Stopped
from gridswarm.node.probe import hardware, probe_speed
from gridswarm.node.secagg import SecAggContributor, secagg_timeout_s
from gridswarm.node.streaming_round import Ahead, StreamingRounds
from gridswarm.protocol import (
    Assignment,
    AssignmentResponse,
    ContributionAck,
    ContributionMeta,
    NodeStatus,
    Refusal,
    RegisterRequest,
)
from gridswarm.train.codecs import ErrorFeedback, make_codec
from gridswarm.train.data import read_text
from gridswarm.train.dataset import BlobSource, DatasetError, check_dataset_path
from gridswarm.train.device import device_class, resolve_device
from gridswarm.train.params import BlobFormatError, pack, pack_vector, unpack, unpack_vector
from gridswarm.train.streaming import LocalState
from gridswarm.train.workload import Workload
from gridswarm.trust.claims import sign_contribution

log = logging.getLogger("gridswarm.node")
MIN_BEAT_WAIT_S = 0.2  # the heartbeat thread looks again at most this often (hub pacing: client.py)
FAILURE_BACKOFF_S = 2.0  # after a failed assignment, before asking for the next one
# what training an assignment may raise when this machine cannot do it (missing data, memory, a
# model version whose bytes never matched their hash)
TRAINING_FAILURES = (OSError, ValueError, RuntimeError, MemoryError, BlobError)
DOWNLOAD_TRIES = 2  # a download that fails its hash check is started over once


@dataclass
class NodeOptions:
    hub_url: str
    home: Path
    run_id: str | None = None
    data: Path | None = None  # local text for federated runs
    # folders whose files a run's data.dataset may name here (`--data-root`); none: a run
    # must name a bundled dataset or `manifest:<sha256>` (train/dataset.check_dataset_path)
    data_roots: tuple[Path, ...] = ()
    max_threads: int = 1
    region: str | None = None
    name: str | None = None
    throttle: float = 0.0  # fraction of time to idle (emulates a slower machine)
    max_rounds: int | None = None
    wait_s: float = 10.0
    energy: Path | None = None  # node energy TOML: region, signal, PV/battery, policy
    device: str = "cpu"  # auto | cpu | cuda[:i] | mps
    connect_timeout_s: float | None = None  # give up when the hub is unreachable this long


@dataclass
class NodeStats:
    contributions: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: list[str] = field(default_factory=list)
    # utilisation: seconds in inner steps, and wall seconds from the start of the work loop to
    # the last round logged (the sum of the per-round `compute_s=` / `wall_s=` log fields)
    compute_s: float = 0.0
    wall_s: float = 0.0
    ahead_steps: int = 0  # inner steps trained while uploading / waiting (comm.overlap)
    unclaimed_steps: int = 0  # trained ahead beyond the H the hub then planned (not claimed)


class NodeAgent(StreamingRounds):
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.identity = Identity.load_or_create(options.home / "node.key")
        self.cache = LocalBlobStore(options.home / "blobs")
        self.device = resolve_device(options.device)
        self.stop_event = threading.Event()
        self.client = HubClient(
            options.hub_url,
            self.identity,
            retry_for_s=options.connect_timeout_s,
            stop=self.stop_event,
            on_retry=self._announce_retry,
        )
        self._last_wait_reason: str | None = None
        self.status = NodeStatus.IDLE
        self.stats = NodeStats()
        settings = load_node_energy(options.energy, options.region) if options.energy else None
        self.energy = NodeEnergy(settings, region=options.region, threads=options.max_threads)
        self._workloads: dict[str, Workload] = {}
        self._feedback: dict[str, ErrorFeedback] = {}
        # Streaming DiLoCo: per run, the persistent local state and the work trained ahead for
        # the next round while the last upload was in flight; the answer the background poll got
        self._local: dict[str, LocalState] = {}
        self._ahead: dict[str, Ahead] = {}
        self._next_answer: AssignmentResponse | None = None
        # utilisation: the start of the current interval and the compute seconds within it
        self._interval_started = time.perf_counter()
        self._interval_compute_s = 0.0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    # ------------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info("signal %s: leaving after the current step", signum)
            self.stop_event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _announce_retry(self, cause: str, retry_in_s: float, give_up_in_s: float | None) -> None:
        left = "" if give_up_in_s is None else f"; giving up in {give_up_in_s:.0f} s"
        log.warning(
            "cannot reach the hub at %s (%s); retrying in %.1f s%s (Ctrl-C to stop)",
            self.client.base_url,
            cause,
            retry_in_s,
            left,
        )

    def register(self) -> str:
        """Measure this node's speed (on the run's model when a run is active) and register."""
        torch.set_num_threads(self.options.max_threads)
        run = self._active_run()
        workload = None
        if run is not None:
            try:
                workload = self.workload(run["id"], run["config"])
            except TRAINING_FAILURES as exc:  # reported to the hub with the first assignment
                log.warning(
                    "cannot build run %s here (%s): probing the reference model", run["id"], exc
                )
        if workload is not None:
            t = workload.cfg.train  # one micro-batch per step: speed, not batch size, matters
            probe = t.model_copy(update={"batch_size": t.micro_batch_size or t.batch_size})
            tokens_per_s, numel = probe_speed(workload.model, probe, self.device, steps=2)
        else:
            tokens_per_s, numel = probe_speed(device=self.device)
        tokens_per_s *= 1.0 - self.options.throttle
        log.info("probe on %s: %.0f tokens/s, %d parameters", self.device, tokens_per_s, numel)
        return self.client.register(
            RegisterRequest(
                hardware=hardware(self.device),
                region=self.energy.region,
                probe_tokens_per_s=tokens_per_s,
                probe_numel=numel,
                max_threads=self.options.max_threads,
                name=self.options.name,
            )
        )

    def _active_run(self) -> dict | None:
        """The run this node would work on now, with its settings; None if there is none."""
        try:
            run_id = self.pick_run()
            return None if run_id is None else self.client.run_status(run_id)
        except (HubRequestError, httpx.HTTPError, ValueError, OSError) as exc:
            log.info("no run to probe on (%s): probing the reference model", exc)
            return None

    def pick_run(self) -> str | None:
        if self.options.run_id:
            return self.options.run_id
        active = [r for r in self.client.runs() if r["status"] == RunState.ACTIVE]
        return active[-1]["id"] if active else None

    def run(self) -> NodeStats:
        """Work until stopped, the run finishes, or `max_rounds` contributions are made.

        Raises `HomeInUse` if another process uses this home, and `HubUnreachable` if the hub
        did not answer within `connect_timeout_s`."""
        registered = False
        with lock_home(self.options.home):
            try:
                self.client.healthz()  # fail fast and say so before the speed probe
                self.register()
                registered = True
                log.info("energy assumptions:\n%s", self.energy.describe())
                heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
                heartbeat.start()
                self._interval_started = time.perf_counter()
                self._loop()
            except (Stopped, ClientStopped):
                log.info("stopped")
            finally:
                self.stop_event.set()
                if registered:
                    self._leave()
                self.client.close()
        return self.stats

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            if self.options.max_rounds and self.stats.contributions >= self.options.max_rounds:
                return
            run_id = self.pick_run()
            if run_id is None:
                self.stop_event.wait(1.0)
                continue
            if not self.energy.gate(run_id, self.client.energy).allowed:
                self.status = NodeStatus.PAUSED  # our own energy policy says not now
                self.stop_event.wait(self.energy.pause_s)
                continue
            self.status = NodeStatus.IDLE
            # as long as the hub paces heartbeats (a large swarm), short under energy rules
            wait_s = self.energy.poll_wait_s(self.client.long_poll_s(self.options.wait_s))
            try:
                answer, self._next_answer = self._next_answer, None
                if answer is None:
                    answer = self.client.assignment(run_id, wait_s=wait_s)
            except HubRequestError as exc:
                if exc.status != 403:
                    raise
                log.error("the hub refuses this node work: %s", exc.detail)
                self.stats.rejected.append(exc.detail)
                return
            if answer.reason and answer.reason != self._last_wait_reason:
                log.info("no work: %s", answer.reason)
            self._last_wait_reason = answer.reason
            if answer.status == "finished":
                log.info("run %s ended", run_id)
                if self.options.run_id:
                    return
                self.stop_event.wait(1.0)
            elif answer.status == "wait":
                self.stop_event.wait(min(answer.retry_after_s, 1.0))
            else:
                try:
                    self.work(answer.assignment)
                except PausedPastDeadline as held_past:
                    self.status = NodeStatus.IDLE
                    log.info("%s: dropped, the energy policy held it past its deadline", held_past)
                except TRAINING_FAILURES as exc:
                    self._report_failure(answer.assignment, exc)

    def _report_failure(self, a: Assignment, exc: Exception) -> None:
        """This machine could not train `a`: tell the hub why, then back off."""
        self.status = NodeStatus.IDLE
        reason = f"{type(exc).__name__}: {exc}"
        log.error("round %s of run %s: cannot train: %s", a.round, a.run_id, reason)
        self.stats.rejected.append(reason)
        try:
            answer = self.client.report_failure(a.run_id, a.id, reason)
            log.info("reported to the hub; the run is %s", answer.get("run_status"))
        except HubRequestError as refused:
            log.warning("the hub refused the failure report: %s", refused.detail)
        self.stop_event.wait(FAILURE_BACKOFF_S)

    def _leave(self) -> None:
        try:  # one try: the stop event is set, so the client does not wait to retry
            self.client.leave()
        except Exception as exc:
            log.info("could not tell the hub we are leaving: %s", exc)

    def _heartbeat(self) -> None:
        """Beat when due: the interval the hub told (hub/pacing.py), counted from its last
        answer to any signed request of this node, which is itself a sign of life."""
        while not self.stop_event.wait(max(self.client.heartbeat_due_in_s(), MIN_BEAT_WAIT_S)):
            if self.client.heartbeat_due_in_s() > 0:
                continue  # the hub answered another request meanwhile
            try:
                self.client.heartbeat(self.status)
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)

    # ------------------------------------------------------------------ one assignment

    def workload(self, run_id: str, config: dict) -> Workload:
        if run_id not in self._workloads:
            cfg = RunConfig.model_validate(config)
            text = None
            if cfg.data.data == "local":
                if self.options.data is None:
                    raise ValueError(f"run {run_id} is federated: start the node with --data PATH")
                text = read_text(str(self.options.data))
            else:  # the sponsor's config must not make this machine read its files
                check_dataset_path(cfg.data.dataset, self.options.data_roots, "this node")
            # a prepared dataset's shards are fetched (only those a slice draws) into the cache
            source = BlobSource(self.cache, self._fetch_dataset_blob)
            self._workloads[run_id] = Workload.from_config(cfg, text=text, source=source).to(
                self.device
            )
        return self._workloads[run_id]

    def _fetch_dataset_blob(self, digest: str) -> bytes:
        """A dataset blob from the hub; a refusal or a hash mismatch is a training failure
        (reported to the hub), not a crash."""
        try:
            return self.client.blob(digest)
        except (HubRequestError, BlobError) as exc:
            raise DatasetError(f"dataset blob {digest[:12]}…: {exc}") from exc

    def _contribute_securely(
        self, a: Assignment, numel: int, update: torch.Tensor, meta: ContributionMeta
    ) -> None:
        """Secure aggregation (gridswarm.node.secagg): advertise, share, mask, unmask."""
        self.status = NodeStatus.UPLOADING
        contributor = SecAggContributor(self.client, a, self.node_id, update, meta, numel)
        timeout_s = secagg_timeout_s(contributor.cfg, a.deadline_at, time.time())
        outcome = contributor.run(self.stop_event, timeout_s)
        self.status = NodeStatus.IDLE
        self.stats.bytes_up += outcome.bytes_up
        if outcome.status == "done":
            self.stats.contributions += 1
            self.stats.tokens += meta.tokens
            log.info("round %s: SecAgg contribution in the sum (%s)", a.round, outcome.stages)
        else:
            self.stats.rejected.append(outcome.reason or "SecAgg aborted")
            log.warning("round %s: SecAgg contribution aborted: %s", a.round, outcome.reason)

    def fetch_version(self, a: Assignment, numel: int) -> torch.Tensor:
        """The assignment's model version: from cache, by applying the delta, or downloaded."""
        if self.cache.has(a.weights_blob):
            return unpack_vector(self.cache.get(a.weights_blob))
        if a.delta_blob and a.previous_version_blob and self.cache.has(a.previous_version_blob):
            try:
                theta = self._apply_delta(a, numel)
            except BlobFormatError as exc:
                theta = None
                log.warning("delta to version %s is malformed: %s", a.base_version, exc)
            if theta is not None:
                data = pack_vector(theta, {"run_id": a.run_id, "version": a.base_version})
                if sha256_hex(data) == a.weights_blob:
                    self.cache.put(data)
                    return theta
            log.warning("delta did not rebuild version %s exactly; downloading it", a.base_version)
        return unpack_vector(self.download(a.weights_blob))

    def _apply_delta(self, a: Assignment, numel: int) -> torch.Tensor:
        """The assignment's version rebuilt from the cached previous one and the encoded delta
        (Streaming DiLoCo's moves one fragment, named in its metadata)."""
        tensors, meta = unpack(self.download(a.delta_blob))
        codec = make_codec(str(meta["codec"]), RunConfig.model_validate(a.config).comm.block_size)
        previous = unpack_vector(self.cache.get(a.previous_version_blob))
        fragment = delta_fragment(meta, numel)
        if fragment is None:
            return previous - codec.decode(tensors, numel)
        start, end = fragment
        theta = previous.clone()
        theta[start:end] = previous[start:end] - codec.decode(tensors, end - start)
        return theta

    def download(self, digest: str) -> bytes:
        """A model blob, from the cache or downloaded in resumable, hash-checked chunks."""
        if not self.cache.has(digest):
            part = self.options.home / "partial" / f"{digest}.part"
            for attempt in range(DOWNLOAD_TRIES):
                try:  # wrong bytes are discarded by fetch_blob, never cached
                    self.stats.bytes_down += self.client.fetch_blob(digest, part)
                    break
                except BlobError as exc:
                    if attempt == DOWNLOAD_TRIES - 1:
                        raise  # a training failure: reported to the hub
                    log.warning("download of blob %s failed (%s); again", digest[:12], exc)
            self.cache.put_file(part, digest)
        return self.cache.get(digest)

    def _step_hook(self, a: Assignment | None = None, held: Held | None = None):
        """`on_step` for training: stops on the stop event, idles for the throttle and, for
        assignment `a`, looks at the node's own energy policy every `check_every_s` and waits
        while it refuses (counted in `held`), as the simulator's nodes do."""
        step_started = time.perf_counter()
        checked_at = time.monotonic()

        def on_step(_step: int, _loss: float) -> None:
            nonlocal step_started, checked_at
            if self.stop_event.is_set():
                raise Stopped
            if self.options.throttle > 0:
                busy = time.perf_counter() - step_started
                time.sleep(busy * self.options.throttle / (1 - self.options.throttle))
            if (
                a is not None
                and self.energy.settings.policy.rules
                and time.monotonic() - checked_at >= self.energy.pause_s
            ):
                paused_s = self._hold_while_refused(a)
                if held is not None:
                    held.seconds += paused_s
                checked_at = time.monotonic()
            step_started = time.perf_counter()

        return on_step

    def _hold_while_refused(self, a: Assignment) -> float:
        """Wait while the node's energy policy refuses (status `paused`, heartbeats go on);
        `PausedPastDeadline` once `a`'s deadline passes. Returns the seconds waited."""
        decision = self.energy.decide()
        if decision.allowed:
            return 0.0
        log.info(
            "round %s of run %s: energy policy: pause mid-assignment (%s)",
            a.round,
            a.run_id,
            "; ".join(decision.reasons),
        )
        self.status, started = NodeStatus.PAUSED, time.monotonic()
        while not decision.allowed:
            left_s = a.deadline_at - time.time()
            if left_s <= 0:
                raise PausedPastDeadline(f"round {a.round} of run {a.run_id}")
            if self.stop_event.wait(min(self.energy.pause_s, left_s)):
                raise Stopped
            decision = self.energy.decide()
        self.status = NodeStatus.TRAINING
        waited_s = time.monotonic() - started
        log.info(
            "round %s of run %s: energy policy: resume after %.0f s", a.round, a.run_id, waited_s
        )
        return waited_s

    def _net_of_pauses(
        self, train_time_s: float, use: EnergyUse, held: Held
    ) -> tuple[float, EnergyUse]:
        """Training time and energy without the seconds the node sat paused."""
        if held.seconds <= 0 or train_time_s <= 0:
            return train_time_s, use
        trained_s = max(train_time_s - held.seconds, 1e-3)
        return trained_s, scale_energy(use, min(trained_s / train_time_s, 1.0))

    def work(self, a: Assignment) -> None:
        workload = self.workload(a.run_id, a.config)
        cfg = workload.cfg
        if cfg.keeps_node_state:  # Streaming DiLoCo, or a kept inner optimizer
            self._work_streaming(a, workload)
            return
        theta = self.fetch_version(a, workload.numel)
        self.status = NodeStatus.TRAINING
        held = Held()
        with self.energy.measure() as metered:
            result = workload.train(
                theta,
                a.round,
                self.node_id,
                a.inner_steps,
                a.attempt,
                self._step_hook(a, held),
                fit_memory=True,
            )
        train_time_s, use = self._net_of_pauses(result.train_time_s, metered.use, held)
        self._interval_compute_s += train_time_s
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        if cfg.comm.error_feedback:
            feedback = self._feedback.setdefault(a.run_id, ErrorFeedback(codec))
            tensors = feedback.encode(result.pseudo_gradient)
        else:
            tensors = codec.encode(result.pseudo_gradient)
        meta = self._claim(
            a,
            codec.name,
            result.steps,
            result.tokens,
            (result.loss_first, result.loss_last, result.loss_mean),
            train_time_s,
            result.micro_batch_size,
            use,
        )
        if cfg.privacy.secagg:  # only a masked share of the sum leaves the node
            self._contribute_securely(a, workload.numel, result.pseudo_gradient, meta)
            return
        ack = self._upload(a, tensors, meta)
        if ack is not None:
            self._log_round(a, meta, ack.bytes_up)

    def _claim(
        self,
        a: Assignment,
        codec_name: str,
        steps: int,
        tokens: int,
        losses: tuple[float, float, float],
        train_time_s: float,
        micro_batch_size: int,
        use: EnergyUse,
    ) -> ContributionMeta:
        """What this node says of its work on `a` (the hub checks it: hub/acceptance.py);
        `losses` = (first, last, mean) of the inner steps claimed."""
        loss_first, loss_last, loss_mean = losses
        return ContributionMeta(
            assignment_id=a.id,
            codec=codec_name,
            steps=steps,
            tokens=tokens,
            loss_first=loss_first,
            loss_last=loss_last,
            loss_mean=loss_mean,
            train_time_s=train_time_s,
            threads=torch.get_num_threads(),
            device=device_class(self.device),
            micro_batch_size=micro_batch_size,
            **use.meta(),  # energy_wh, power_w, method, region, intensity, local share
        )

    def _upload(
        self,
        a: Assignment,
        tensors: dict[str, torch.Tensor],
        meta: ContributionMeta,
        foreground: bool = True,
    ) -> ContributionAck | None:
        """Sign and upload one contribution; the ack, or None when refused (recorded).
        `foreground`: the node's status says uploading meanwhile (not while training ahead)."""
        claim = sign_contribution(self.identity, a.run_id, a.round, tensors, meta.model_dump())
        meta = meta.model_copy(update={"claim": claim})  # our signed word, for the hub's ledger
        body = pack(tensors, meta.model_dump())
        if foreground:
            self.status = NodeStatus.UPLOADING
        try:
            ack = self.client.contribute(a.run_id, body)
            self.stats.contributions += 1
            self.stats.tokens += meta.tokens
            self.stats.bytes_up += ack.bytes_up
            return ack
        except HubRequestError as exc:
            if exc.reason is Refusal.DUPLICATE:
                self.stats.contributions += 1  # an earlier try was stored before the ack was lost
                log.info("run %s round %s: already stored (an earlier try)", a.run_id, a.round)
            else:
                self.stats.rejected.append(exc.detail)
                log.warning("round %s: contribution refused: %s", a.round, exc.detail)
        except BlobError as exc:
            self.stats.rejected.append(str(exc))
            log.warning("round %s: contribution refused: %s", a.round, exc)
        finally:
            if foreground:
                self.status = NodeStatus.IDLE
        return None

    def _log_round(
        self, a: Assignment, meta: ContributionMeta, bytes_up: int, extra: str = ""
    ) -> None:
        """The per-round log line, with this interval's compute and wall seconds (utilisation:
        the intervals tile the node's time from the start of its work loop)."""
        now = time.perf_counter()
        wall_s = now - self._interval_started
        compute_s = min(self._interval_compute_s, wall_s)
        self._interval_started, self._interval_compute_s = now, 0.0
        self.stats.compute_s += compute_s
        self.stats.wall_s += wall_s
        log.info(
            "run %s round %s: H=%d, %d tokens, %.1f s, %d bytes up, loss %.3f -> %.3f%s "
            "compute_s=%.3f wall_s=%.3f",
            a.run_id,
            a.round,
            meta.steps,
            meta.tokens,
            meta.train_time_s,
            bytes_up,
            meta.loss_first,
            meta.loss_last,
            extra,
            compute_s,
            wall_s,
        )

    # ------------------------------------------------------------------ Streaming DiLoCo


def delta_fragment(meta: dict[str, object], numel: int) -> tuple[int, int] | None:
    """The [start, end) a delta blob's metadata says it moves (None: the whole vector); a
    malformed range is a BlobFormatError (the node then downloads the full weights)."""
    raw = meta.get("fragment")
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
        or not 0 <= raw[0] < raw[1] <= numel
    ):
        raise BlobFormatError(f"delta fragment {raw!r} is not a range within {numel} weights")
    return raw[0], raw[1]
