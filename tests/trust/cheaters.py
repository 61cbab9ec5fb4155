"""Cheating nodes for the live attack tests (never part of the product).

`InProcessNode` is a real node in the test process: its own Ed25519 identity, a real HubClient
talking signed HTTP to a real hub process, and the run's real Workload for training. Its
`contribution` builds an upload the way the agent does (encode, meta, signed ledger claim) and lets
a test tamper with any step. `CheatingAgent` is the real NodeAgent with a tampering hook, for the
6-node run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gridswarm.config import RunConfig
from gridswarm.identity import Identity
from gridswarm.node.agent import NodeAgent
from gridswarm.node.client import HubClient
from gridswarm.protocol import Assignment, ContributionAck, ContributionMeta, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.local import LocalResult
from gridswarm.train.params import pack, unpack_vector
from gridswarm.train.workload import Workload
from gridswarm.trust.claims import sign_contribution

Tensors = dict[str, torch.Tensor]
REGISTRATION = RegisterRequest(probe_tokens_per_s=1e9, probe_numel=1000)


@dataclass
class Upload:
    """One built contribution: what was trained, what is sent."""

    assignment: Assignment
    result: LocalResult
    tensors: Tensors
    meta: dict[str, Any]
    body: bytes = b""


@dataclass(eq=False)
class InProcessNode:
    url: str
    identity: Identity = field(default_factory=Identity.generate)

    def __post_init__(self) -> None:
        self.client = HubClient(self.url, self.identity, retry_for_s=10)
        self.client.register(REGISTRATION)
        self._workloads: dict[str, Workload] = {}

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def assignment(self, run_id: str) -> Assignment:
        answer = self.client.assignment(run_id, wait_s=10)
        assert answer.status == "assigned", f"{self.node_id} got {answer}"
        return answer.assignment

    def workload(self, a: Assignment) -> Workload:
        if a.run_id not in self._workloads:
            self._workloads[a.run_id] = Workload.from_config(RunConfig.model_validate(a.config))
        return self._workloads[a.run_id]

    def train(
        self, a: Assignment, node_id: str | None = None, steps: int | None = None
    ) -> LocalResult:
        """Train the assignment (honestly by default; another slice or fewer steps if asked)."""
        theta = unpack_vector(self.client.blob(a.weights_blob))
        return self.workload(a).train(
            theta, a.round, node_id or self.node_id, steps or a.inner_steps, a.attempt
        )

    def build(
        self,
        a: Assignment,
        result: LocalResult | None = None,
        tamper: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tensors: Tensors | None = None,
        signer: Identity | None = None,
        **meta_overrides: Any,
    ) -> Upload:
        """An upload as the agent builds it, with an optional tampering at any step."""
        result = result or self.train(a)
        cfg = self.workload(a).cfg
        update = result.pseudo_gradient if tamper is None else tamper(result.pseudo_gradient)
        if tensors is None:
            tensors = make_codec(cfg.comm.codec, cfg.comm.block_size).encode(update)
        meta = (
            ContributionMeta(
                assignment_id=a.id,
                codec=cfg.comm.codec,
                steps=a.inner_steps,
                tokens=a.inner_steps * cfg.tokens_per_step,
                loss_first=result.loss_first,
                loss_last=result.loss_last,
                loss_mean=result.loss_mean,
                train_time_s=result.train_time_s,
                threads=torch.get_num_threads(),
            ).model_dump()
            | meta_overrides
        )
        meta["claim"] = sign_contribution(signer or self.identity, a.run_id, a.round, tensors, meta)
        upload = Upload(a, result, tensors, meta)
        upload.body = pack(tensors, ContributionMeta.model_validate(meta).model_dump())
        return upload

    def submit(self, run_id: str, upload: Upload) -> ContributionAck:
        return self.client.contribute(run_id, upload.body)


# ------------------------------------------------------------------------------ tamperings


def noise(update: torch.Tensor) -> torch.Tensor:
    """Random noise of the honest update's size (no work, plausible norm)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(update.shape, generator=g) * update.std() * 3


def scaled(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The honest update scaled up, to pull the model further toward this node."""
    return lambda update: update * factor


# ------------------------------------------------------------------------------ agents


class CheatingAgent(NodeAgent):
    """A real NodeAgent whose uploads are tampered with: `cheat(agent, assignment, workload,
    theta) -> (LocalResult, update)` replaces honest training."""

    cheat: Callable[..., tuple[LocalResult, torch.Tensor]]

    def work(self, a: Assignment) -> None:
        workload = self.workload(a.run_id, a.config)
        cfg = workload.cfg
        theta = self.fetch_version(a, workload.numel)
        result, update = self.cheat(self, a, workload, theta)
        tensors = make_codec(cfg.comm.codec, cfg.comm.block_size).encode(update)
        meta = ContributionMeta(
            assignment_id=a.id,
            codec=cfg.comm.codec,
            steps=a.inner_steps,
            tokens=a.inner_steps * cfg.tokens_per_step,
            loss_first=result.loss_first,
            loss_last=result.loss_last,
            loss_mean=result.loss_mean,
            train_time_s=result.train_time_s,
            threads=torch.get_num_threads(),
        ).model_dump()
        meta["claim"] = sign_contribution(self.identity, a.run_id, a.round, tensors, meta)
        ack = self.client.contribute(a.run_id, pack(tensors, meta))
        self.stats.contributions += 1
        self.stats.bytes_up += ack.bytes_up


def scaling_cheat(agent: NodeAgent, a: Assignment, workload: Workload, theta: torch.Tensor):
    result = workload.train(theta, a.round, agent.node_id, a.inner_steps, a.attempt)
    return result, result.pseudo_gradient * 4


def other_data_cheat(agent: NodeAgent, a: Assignment, workload: Workload, theta: torch.Tensor):
    """Trains on a slice of its own choosing (here: the one meant for a made-up node)."""
    result = workload.train(theta, a.round, "not-my-slice", a.inner_steps, a.attempt)
    return result, result.pseudo_gradient
