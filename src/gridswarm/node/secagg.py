"""A node's side of secure aggregation in a live round: after training, contribute the
pseudo-gradient through the four SecAgg stages so that only a masked share of the sum leaves it.

    advertise  POST secagg/advertise     signed claims (ContributionMeta) + fresh X25519 keys
    poll       POST secagg/task          long-poll: share | mask | unmask | wait | done | aborted
    answer     POST secagg/{round}/{attempt}/{share|masked|unmask}

Before it reveals anything the node checks the hub's round config against the run's settings
(`gridswarm.privacy.live.check_round_config`): a hub that raised the dropout tolerance or shrank
the graph could otherwise unmask single updates. The update itself is weighted (or clipped and
noised under DP) by `gridswarm.privacy.live.node_vector`, quantised and masked by
`gridswarm.privacy.secagg.SecAggClient`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from gridswarm.config import RunConfig
from gridswarm.node.client import HubClient, HubRequestError
from gridswarm.privacy.live import SECAGG_CODEC, check_round_config, node_vector
from gridswarm.privacy.secagg import (
    RandomBytes,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    decode_message,
    encode_message,
    generate_keys,
    public_keys,
)
from gridswarm.protocol import API, Assignment, ContributionMeta, Refusal

log = logging.getLogger("gridswarm.node.secagg")


@dataclass
class SecAggOutcome:
    """How one SecAgg contribution ended: `done` (in the sum) or `aborted` (with why)."""

    status: str
    reason: str | None = None
    bytes_up: int = 0
    stages: tuple[str, ...] = ()


def _decode(doc: Any) -> Any:
    return decode_message(json.dumps(doc).encode())


class SecAggContributor:
    """One assignment's SecAgg contribution; `run` drives it, the step methods let a test stop
    it between stages (a node that vanishes after masking)."""

    def __init__(
        self,
        client: HubClient,
        assignment: Assignment,
        node_id: str,
        pseudo_gradient: torch.Tensor,
        meta: ContributionMeta,
        numel: int,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.client = client
        self.a = assignment
        self.cfg = RunConfig.model_validate(assignment.config)
        self.node_id = node_id
        self.pseudo_gradient = pseudo_gradient
        self.meta = meta.model_copy(update={"codec": SECAGG_CODEC})
        self.numel = numel
        self._random = random_bytes
        self._keys = generate_keys(random_bytes)
        self._secagg: SecAggClient | None = None
        self.bytes_up = 0
        self.stages: list[str] = []
        self.base = f"{API}/runs/{assignment.run_id}/secagg"

    def advertise(self) -> dict:
        """The contribution: signed claims and this round's public keys."""
        cipher, mask = public_keys(self._keys)
        body = json.dumps(
            {
                "meta": self.meta.model_dump(),
                "cipher_key": base64.b64encode(cipher).decode(),
                "mask_key": base64.b64encode(mask).decode(),
            }
        ).encode()
        ack = self.client.request("POST", f"{self.base}/advertise", body).json()
        self.bytes_up += len(body)
        self.stages.append("advertise")
        return ack

    def poll(self, wait_s: float = 10.0) -> dict:
        body = json.dumps({"assignment_id": self.a.id}).encode()
        response = self.client.request("POST", f"{self.base}/task", body, params={"wait_s": wait_s})
        return response.json()

    def answer(self, task: dict) -> None:
        """Do the stage `task` asks for and post the result."""
        stage = task["stage"]
        config: SecAggConfig = _decode(task["config"])
        message = _decode(task["message"])
        if stage == "share":
            check_round_config(
                config,
                self.cfg,
                self.a.run_id,
                self.a.round,
                int(task["attempt"]),
                self.node_id,
                self.numel,
            )
            self._secagg = SecAggClient(config, self.node_id, self._random, self._keys)
            advertised = self._secagg.advertise_keys()  # moves the client to its share stage
            if (advertised.cipher_public_key, advertised.mask_public_key) != public_keys(
                self._keys
            ):
                raise SecAggError("round keys changed between advertisement and sharing")
            out, kind = encode_message(self._secagg.share_keys(message)), "share"
        elif self._secagg is None or self._secagg.config != config:
            raise SecAggError(f"asked for the {stage} stage of a session this node did not join")
        elif stage == "mask":
            vector = node_vector(
                self.cfg, self.pseudo_gradient, self.meta.tokens, len(config.node_ids)
            )
            out, kind = self._secagg.mask_input(message, vector).masked, "masked"
        elif stage == "unmask":
            out, kind = encode_message(self._secagg.unmask(message)), "unmask"
        else:
            raise SecAggError(f"unknown SecAgg stage {stage!r}")
        path = f"{self.base}/{task['round']}/{task['attempt']}/{kind}"
        self.client.request("POST", path, out)
        self.bytes_up += len(out)
        self.stages.append(kind)

    def run(self, stop: threading.Event, timeout_s: float) -> SecAggOutcome:
        """Advertise, then follow the hub's stages until the sum is made or the round ends."""
        try:
            self.advertise()
        except HubRequestError as exc:
            return SecAggOutcome("aborted", exc.detail, self.bytes_up, tuple(self.stages))
        give_up = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < give_up:
            try:
                task = self.poll(wait_s=min(10.0, max(give_up - time.monotonic(), 0.1)))
                if task["stage"] in ("done", "aborted"):
                    return SecAggOutcome(
                        task["stage"], task.get("reason"), self.bytes_up, tuple(self.stages)
                    )
                if task["stage"] != "wait":
                    self.answer(task)
            except HubRequestError as exc:
                if exc.reason is Refusal.DUPLICATE:
                    continue  # an earlier try was stored before its answer was lost
                log.warning("SecAgg request refused: %s", exc.detail)
                if exc.status != 409:  # stale answers are normal when a stage moved on
                    return SecAggOutcome("aborted", exc.detail, self.bytes_up, tuple(self.stages))
            except SecAggError as exc:
                log.warning("SecAgg refused by this node: %s", exc)
                return SecAggOutcome("aborted", str(exc), self.bytes_up, tuple(self.stages))
        why = "node stopping" if stop.is_set() else f"no result within {timeout_s:.0f} s"
        return SecAggOutcome("aborted", why, self.bytes_up, tuple(self.stages))


def secagg_timeout_s(cfg: RunConfig, deadline_at: float, now_s: float) -> float:
    """How long a node follows one round's SecAgg: the training deadline, then three stages."""
    stages_s = 3 * (cfg.privacy.secagg.stage_timeout_s if cfg.privacy.secagg else 0.0)
    return max(deadline_at - now_s, 0.0) + stages_s + 30.0
