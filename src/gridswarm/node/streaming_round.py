"""Streaming DiLoCo on the node: one round of it, with or without overlap (`comm.fragments`,
`comm.overlap`); also the round of a run with `train.keep_inner_optimizer` (one fragment: the
node takes the whole published version each round and keeps only its inner AdamW).

The node keeps its own weights and inner AdamW across rounds (`train/streaming.LocalState`),
merges the fragment each new version synced, trains the rest of H and uploads
`global[f] - local[f]`. With `comm.overlap` a background thread uploads, long-polls for the next
assignment and fetches its version while the main thread trains ahead on the next round's data.
`StreamingRounds` is the part of `NodeAgent` that does this; the agent's classic round, energy
gate, claims and uploads are in node/agent.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gridswarm.node.energy import EnergyUse, combine_energy, scale_energy
from gridswarm.node.interrupts import Held, Stopped
from gridswarm.protocol import (
    Assignment,
    AssignmentResponse,
    ContributionAck,
    ContributionMeta,
    NodeStatus,
)
from gridswarm.train.codecs import make_codec
from gridswarm.train.data import Batch, slice_seed
from gridswarm.train.streaming import LocalState, Progress
from gridswarm.train.workload import Workload

if TYPE_CHECKING:
    from gridswarm.node.agent import NodeAgent

log = logging.getLogger("gridswarm.node")


class StreamingRounds:
    """NodeAgent's Streaming DiLoCo rounds (a mixin: it uses the agent's fetch, hook, claim,
    upload and log). Per run it holds the kept local state and the steps trained ahead."""

    _local: dict[str, LocalState]  # run -> the weights and inner AdamW kept across rounds
    _ahead: dict[str, Ahead]  # run -> the next round's steps trained while uploading

    def _local_state(
        self: NodeAgent, a: Assignment, workload: Workload, theta: torch.Tensor
    ) -> LocalState:
        """The local state to train `a` from: the kept one with the fragment version
        `a.base_version` synced merged in, when it was built on the version before; otherwise
        (first round, missed rounds, a restart, dropped ahead work) a fresh one from `theta`."""
        comm = workload.cfg.comm
        state = self._local.get(a.run_id)
        if state is not None and state.version == a.base_version - 1:
            mix = comm.overlap_mix if comm.overlap else 0.0
            state.merge(theta, workload.fragment(a.base_version - 1), mix, a.base_version)
            return state
        if state is not None:
            log.info(
                "run %s round %s: local state is from version %d, not %d: starting fresh",
                a.run_id,
                a.round,
                state.version,
                a.base_version - 1,
            )
        self._ahead.pop(a.run_id, None)
        state = self._local[a.run_id] = LocalState(workload, theta, a.base_version)
        return state

    def _work_streaming(self: NodeAgent, a: Assignment, workload: Workload) -> None:
        """One round of Streaming DiLoCo: merge the synced fragment into the kept local state,
        train the rest of H (some may have been trained ahead), upload global[f] - local[f];
        with `comm.overlap`, upload and fetch the next version in the background while training
        ahead on the next round's data."""
        cfg = workload.cfg
        theta = self.fetch_version(a, workload.numel)
        ahead = self._ahead.pop(a.run_id, None)
        if ahead is not None and ahead.round != a.round:
            log.info(
                "run %s round %s: dropping %d steps trained ahead for round %s",
                a.run_id,
                a.round,
                ahead.progress.steps,
                ahead.round,
            )
            self._local.pop(a.run_id, None)  # the kept weights include the dropped steps
            ahead = None
        state = self._local_state(a, workload, theta)
        if ahead is not None and state.steps_taken == 0:
            ahead = None  # a fresh state: the steps trained ahead went with the old one
        self.status = NodeStatus.TRAINING
        if ahead is not None:
            progress, stream, use_ahead = ahead.progress, ahead.stream, ahead.energy
        else:
            progress = Progress()
            stream = workload.batches(slice_seed(cfg.seed, a.round, self.node_id, a.attempt))
            use_ahead = None
        trained_ahead = progress.steps
        compute_before = progress.compute_s
        held = Held()
        try:
            with self.energy.measure() as metered:
                rest = a.inner_steps - progress.steps
                if rest > 0:
                    state.train(stream, rest, progress, a.round, self._step_hook(a, held))
        except BaseException:
            self._local.pop(a.run_id, None)  # half-trained: the next round starts fresh
            raise
        compute_s, measured = self._net_of_pauses(
            progress.compute_s - compute_before, metered.use, held
        )
        progress.compute_s = compute_before + compute_s
        self._interval_compute_s += compute_s
        use = measured if use_ahead is None else combine_energy(use_ahead, measured)
        # the hub planned fewer steps than were trained ahead (its speed estimate moved): the
        # claim covers the H planned steps (time and energy pro rata), the surplus is unpaid
        # local progress rather than a reason to throw the local state away
        claimed = a.inner_steps
        surplus = progress.steps - claimed
        share = claimed / progress.steps
        train_time_s = progress.compute_s * share
        if surplus > 0:
            use = scale_energy(use, share)
            self.stats.unclaimed_steps += surplus
        fragment = workload.fragment(a.round)
        update = state.pseudo_gradient(theta, fragment)
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        tensors = codec.encode(update)
        losses = progress.losses
        meta = self._claim(
            a,
            codec.name,
            claimed,
            claimed * cfg.tokens_per_step,
            (losses[0], losses[-1], sum(losses) / len(losses)),
            train_time_s,
            state.micro_batch_size,
            use,
        )
        extra = f" fragment={fragment_label(fragment)} ahead={trained_ahead}"
        if surplus > 0:
            extra += f" unclaimed={surplus}"
        self.stats.ahead_steps += trained_ahead
        if not cfg.comm.overlap:
            ack = self._upload(a, tensors, meta)
            if ack is not None:
                self._log_round(a, meta, ack.bytes_up, extra)
            return
        self._upload_while_training_ahead(a, workload, state, tensors, meta, extra)

    def _upload_while_training_ahead(
        self: NodeAgent,
        a: Assignment,
        workload: Workload,
        state: LocalState,
        tensors: dict[str, torch.Tensor],
        meta: ContributionMeta,
        extra: str,
    ) -> None:
        """`comm.overlap`: a background thread uploads, long-polls for the next assignment and
        fetches its version, while this thread trains ahead (at most this round's H) on the next
        round's data stream. The next assignment goes to the work loop; the steps trained ahead
        are kept for it when it is round `a.round + 1`, else dropped with the local state."""
        cfg = workload.cfg
        box = _Background()

        def background() -> None:
            try:
                box.ack = self._upload(a, tensors, meta, foreground=False)
                box.answer = self._poll_next(a, cfg.round.deadline_s)
                nxt = box.answer.assignment if box.answer is not None else None
                if nxt is not None and nxt.round == a.round + 1:
                    self.fetch_version(nxt, workload.numel)  # into the cache for work()
            except Exception as exc:  # reported by the main thread
                box.error = exc

        thread = threading.Thread(target=background, name="upload", daemon=True)
        thread.start()
        self.status = NodeStatus.TRAINING
        progress = Progress()
        stream = workload.batches(slice_seed(cfg.seed, a.round + 1, self.node_id, 0))
        on_step = self._step_hook()
        try:
            with self.energy.measure() as metered:
                while thread.is_alive() and progress.steps < a.inner_steps:
                    state.train(stream, 1, progress, a.round + 1, on_step)
        except BaseException:
            self._local.pop(a.run_id, None)
            raise
        self._interval_compute_s += progress.compute_s
        self.status = NodeStatus.UPLOADING
        while thread.is_alive() and not self.stop_event.is_set():
            thread.join(timeout=0.5)
        if self.stop_event.is_set():
            raise Stopped
        self.status = NodeStatus.IDLE
        if box.ack is not None:
            self._log_round(a, meta, box.ack.bytes_up, extra)
        if box.error is not None:
            log.warning("round %s: the background upload or fetch failed: %s", a.round, box.error)
        self._next_answer = box.answer
        nxt = box.answer.assignment if box.answer is not None else None
        if progress.steps and (box.error is not None or nxt is None or nxt.round != a.round + 1):
            log.info(
                "run %s: no round %s to train ahead for: dropping %d steps",
                a.run_id,
                a.round + 1,
                progress.steps,
            )
            self._local.pop(a.run_id, None)
        elif progress.steps:
            self._ahead[a.run_id] = Ahead(a.round + 1, progress, stream, metered.use)

    def _poll_next(self: NodeAgent, a: Assignment, deadline_s: float) -> AssignmentResponse | None:
        """Long-poll for the assignment after `a` (while the hub says wait: its round has not
        closed yet), for at most about two round deadlines; None when stopped."""
        give_up_at = time.monotonic() + max(60.0, 2 * deadline_s)
        answer = None
        while not self.stop_event.is_set():
            wait_s = self.client.long_poll_s(self.options.wait_s)
            answer = self.client.assignment(a.run_id, wait_s=wait_s)
            if answer.status != "wait" or time.monotonic() > give_up_at:
                break
            self.stop_event.wait(min(answer.retry_after_s, 1.0))
        return answer


@dataclass
class Ahead:
    """Inner steps trained for `round` before its assignment arrived (comm.overlap)."""

    round: int
    progress: Progress
    stream: Iterator[Batch]  # the round's data stream, positioned after those steps
    energy: EnergyUse


@dataclass
class _Background:
    """What the background upload thread hands back."""

    ack: ContributionAck | None = None
    answer: AssignmentResponse | None = None
    error: Exception | None = None


def fragment_label(fragment: tuple[int, int] | None) -> str:
    """`start:end` of a fragment for the log, `all` for the whole vector."""
    return "all" if fragment is None else f"{fragment[0]}:{fragment[1]}"
