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
    reason: str | None = None  # why there is no work: the run is paused, stalled, stopped, ...


MAX_REASON_CHARS = 500


class FailureReport(_Msg):
    """A node could not train an assignment (POST /v1/runs/{id}/failures): the hub releases it
    and counts it toward marking the run stalled (hub/lifecycle.py)."""

    assignment_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)


class RunStateRequest(_Msg):
    """The sponsor pauses, resumes or stops its run (POST /v1/runs/{id}/state)."""

    event: Literal["pause", "resume", "stop"]
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


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
    # the node's own view (energy/accounting.py): grid intensity over the training interval and
    # the share of the energy its own PV/battery covered; the hub prefers its own signal
    intensity_g_per_kwh: float | None = Field(default=None, ge=0)
    local_surplus_share: float | None = Field(default=None, ge=0, le=1)
    # the node's signed ledger claim over all of the above (trust/claims.py); it goes on the
    # hub's ledger as the node signed it. Optional: a node without one is recorded by the hub only
    claim: dict[str, str] | None = None


class ContributionAck(_Msg):
    contribution_id: str
    accepted: bool
    bytes_up: int


class HeartbeatRequest(_Msg):
    status: Literal["idle", "training", "uploading", "paused"] = "idle"
    run_id: str | None = None


MAX_FORECAST_POINTS = 600


class EnergyReport(_Msg):
    """A node's energy state and outlook (POST /v1/nodes/energy): may it run now and why not,
    its draw, and its forecasts on one time grid (unix s), for the hub's energy policy."""

    run_id: str | None = Field(default=None, max_length=64)  # the run it is working on
    region: str | None = Field(default=None, max_length=64)
    available: bool = True
    reasons: list[str] = Field(default_factory=list, max_length=16)
    at_s: float  # the node's clock when it decided
    power_w: float = Field(gt=0)  # draw of its training (measured once it has trained)
    intensity_g_per_kwh: float | None = Field(default=None, ge=0)
    price_per_kwh: float | None = None
    surplus_w: float | None = None  # PV - household now (W)
    battery_available_wh: float = Field(default=0.0, ge=0)
    intensity_forecast: list[tuple[float, float]] = Field(
        default_factory=list, max_length=MAX_FORECAST_POINTS
    )
    surplus_forecast_w: list[tuple[float, float]] | None = Field(
        default=None, max_length=MAX_FORECAST_POINTS
    )
    availability_forecast: list[tuple[float, bool]] | None = Field(
        default=None, max_length=MAX_FORECAST_POINTS
    )
    signal: str = Field(default="", max_length=200)  # which provider the node reads


class Problem(_Msg):
    detail: str
