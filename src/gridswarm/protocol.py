"""The hub's wire format: JSON bodies of the control plane, shared by hub and node.

Contributions travel as one safetensors blob whose metadata (`ContributionMeta`) names the
assignment, so the signed request body covers the payload and its claims together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

API = "/v1"
MAX_JSON_BYTES = 64 * 1024


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Msg):
    cpu: str = "unknown"
    cores: int = Field(default=1, ge=1)
    memory_gb: float = Field(default=0, ge=0)
    gpu: str | None = None
    torch: str = ""


class RegisterRequest(_Msg):
    hardware: Hardware = Hardware()
    region: str | None = Field(default=None, max_length=64)
    probe_tokens_per_s: float = Field(gt=0, description="measured on the reference GPT")
    probe_numel: int = Field(gt=0, description="parameters of the reference GPT")
    max_threads: int = Field(default=1, ge=1, le=1024)
    name: str | None = Field(default=None, max_length=64)


class RegisterResponse(_Msg):
    node_id: str


class RunCreateRequest(_Msg):
    config: dict[str, Any]


class RunCreateResponse(_Msg):
    run_id: str
    version_blob: str
    numel: int


class Assignment(_Msg):
    id: str
    run_id: str
    round: int
    attempt: int
    base_version: int
    weights_blob: str
    previous_version_blob: str | None = None  # a node holding this version may apply `delta_blob`
    delta_blob: str | None = None
    inner_steps: int
    deadline_at: float
    config: dict[str, Any]


class AssignmentResponse(_Msg):
    status: Literal["assigned", "wait", "finished"]
    retry_after_s: float = 1.0
    assignment: Assignment | None = None


class ContributionMeta(_Msg):
    """Claims a node makes about its contribution; stored in the blob's safetensors metadata."""

    assignment_id: str
    codec: str
    steps: int = Field(ge=1)
    tokens: int = Field(ge=1)
    loss_first: float
    loss_last: float
    loss_mean: float
    train_time_s: float = Field(ge=0)
    threads: int = Field(ge=1)
    energy_wh: float | None = Field(default=None, ge=0)
    power_w: float | None = Field(default=None, ge=0)
    energy_method: str | None = None
    region: str | None = None


class ContributionAck(_Msg):
    contribution_id: str
    accepted: bool
    bytes_up: int


class HeartbeatRequest(_Msg):
    status: Literal["idle", "training", "uploading", "paused"] = "idle"
    run_id: str | None = None


class Problem(_Msg):
    detail: str
