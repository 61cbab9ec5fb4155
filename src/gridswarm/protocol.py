"""The hub's wire format: JSON bodies of the control plane, shared by hub and node.

Contributions travel as one safetensors blob whose metadata (`ContributionMeta`) names the
assignment, so the signed request body covers the payload and its claims together.

Every message is hostile until validated: numbers are finite and bounded, strings are short and
printable (no control characters, no lone surrogates), ids match their pattern, so nothing a
sender writes can overflow a column, a float or a log line downstream.
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

API = "/v1"
MAX_JSON_BYTES = 64 * 1024
MAX_TEXT_CHARS = 256  # any free-text field a message carries
RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # the hub makes uuid4().hex[:12]
ASSIGNMENT_ID_PATTERN = r"^[0-9a-f]{32}$"  # uuid4().hex
NODE_ID_PATTERN = r"^[0-9a-f]{16}$"  # sha256(public key)[:16]
DIGEST_PATTERN = r"^[0-9a-f]{64}$"  # sha256 of a blob
MAX_ROUND = 2**31 - 1  # rounds and attempts are 32-bit columns
MAX_UNIX_S = 1e11  # year ~5000: any real clock reading
MAX_DURATION_S = 1e7  # ~4 months: any real training interval
MAX_STEPS = 10**7
MAX_TOKENS = 10**15
MAX_POWER_W = 1e7
MAX_ENERGY_WH = 1e9
MAX_INTENSITY_G_PER_KWH = 1e5
MAX_LOSS = 1e6
# money: one fund claim, and a run's whole escrow, stay far below 2**63 so that sums of rewards,
# slashes and payouts fit a 64-bit column however they are split
MAX_FUND_UNITS = 10**15
MAX_ESCROW_UNITS = 10**18


def describe_errors(errors: list[Any], limit: int = 5) -> str:
    """Pydantic errors as one line naming each field, safe to echo: the offending input is left
    out (it may be huge or not encodable) and names are escaped."""

    def safe(x: object) -> str:
        return str(x)[:64].encode("utf-8", "backslashreplace").decode()

    parts = [
        f"{'.'.join(safe(p) for p in e.get('loc', ())) or 'body'}: {safe(e.get('msg', ''))}"
        for e in errors[:limit]
    ]
    return "; ".join(parts) + (f"; and {len(errors) - limit} more" if len(errors) > limit else "")


def printable(text: str) -> str:
    """`text` if it has no control characters (lone surrogates are refused by pydantic already),
    so that it can be stored, logged and echoed back safely."""
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise ValueError("must not contain control characters or lone surrogates")
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(printable)]
Name = Annotated[str, Field(max_length=64), AfterValidator(printable)]
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]
AssignmentId = Annotated[str, Field(pattern=ASSIGNMENT_ID_PATTERN)]
UnixTime = Annotated[float, Field(ge=0, le=MAX_UNIX_S)]
Loss = Annotated[float, Field(ge=-MAX_LOSS, le=MAX_LOSS)]
SignedW = Annotated[float, Field(ge=-MAX_POWER_W, le=MAX_POWER_W)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=MAX_JSON_BYTES)


class Hardware(_Msg):
    cpu: Text = "unknown"
    cores: int = Field(default=1, ge=1, le=1 << 16)
    memory_gb: float = Field(default=0, ge=0, le=1e7)
    gpu: Text | None = None
    torch: Text = ""
    device: Text = "cpu"  # what it trains on: cpu, cuda/<model>, mps
    device_memory_gb: float = Field(default=0, ge=0, le=1e7)


class RegisterRequest(_Msg):
    hardware: Hardware = Hardware()
    region: Name | None = None
    probe_tokens_per_s: float = Field(gt=0, le=1e12, description="measured on the reference GPT")
    probe_numel: int = Field(gt=0, le=10**13, description="parameters of the reference GPT")
    max_threads: int = Field(default=1, ge=1, le=1024)
    name: Name | None = None


class Empty(_Msg):
    """The body of a signed request that carries nothing (leave, assignment): empty or {}."""


# a node's heartbeat interval until (or unless) its hub tells it another
DEFAULT_HEARTBEAT_S = 3.0
# the longest long-poll for work (`wait_s`): a node long-polls as long as its heartbeat interval
# when the hub paces that above the node's own wait (hub/pacing.py advertises at most 60 s)
MAX_LONG_POLL_S = 60.0
# how often the hub may ask a node to send a heartbeat: never faster than once a second, never
# rarer than every 10 minutes (hub/pacing.py advertises 3 to 60 s)
MIN_HEARTBEAT_S = 1.0
MAX_HEARTBEAT_S = 600.0
HeartbeatSeconds = Annotated[
    float,
    Field(
        ge=MIN_HEARTBEAT_S,
        le=MAX_HEARTBEAT_S,
        description="seconds between the node's heartbeats, counted from its last answer from "
        "the hub (any signed request counts as a sign of life); the hub scales it with the "
        "number of live nodes",
    ),
]


class RegisterResponse(_Msg):
    node_id: str
    # absent from hubs that do not pace heartbeats: the node then beats every 3 s regardless
    heartbeat_s: HeartbeatSeconds | None = None


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

    assignment_id: AssignmentId
    reason: Annotated[
        str, Field(min_length=1, max_length=MAX_REASON_CHARS), AfterValidator(printable)
    ]


class RunStateRequest(_Msg):
    """The sponsor pauses, resumes or stops its run (POST /v1/runs/{id}/state)."""

    event: Literal["pause", "resume", "stop"]
    reason: Annotated[str, Field(max_length=MAX_REASON_CHARS), AfterValidator(printable)] = ""


class ContributionMeta(_Msg):
    """Claims a node makes about its contribution; stored in the blob's safetensors metadata."""

    assignment_id: AssignmentId
    codec: Name
    steps: int = Field(ge=1, le=MAX_STEPS)
    tokens: int = Field(ge=1, le=MAX_TOKENS)
    loss_first: Loss
    loss_last: Loss
    loss_mean: Loss
    train_time_s: float = Field(ge=0, le=MAX_DURATION_S)
    threads: int = Field(ge=1, le=1024)
    # the device class it trained on (replays compare like with like) and its micro-batch size
    device: Text = "cpu"
    micro_batch_size: int | None = Field(default=None, ge=1, le=1 << 20)
    energy_wh: float | None = Field(default=None, ge=0, le=MAX_ENERGY_WH)
    power_w: float | None = Field(default=None, ge=0, le=MAX_POWER_W)
    energy_method: Name | None = None
    region: Name | None = None
    # the node's own view (energy/accounting.py): grid intensity over the training interval and
    # the share of the energy its own PV/battery covered; the hub prefers its own signal
    intensity_g_per_kwh: float | None = Field(default=None, ge=0, le=MAX_INTENSITY_G_PER_KWH)
    local_surplus_share: float | None = Field(default=None, ge=0, le=1)
    # the node's signed ledger claim over all of the above (trust/claims.py); it goes on the
    # hub's ledger as the node signed it. Optional: a node without one is recorded by the hub only
    claim: dict[Name, Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=16
    )


class SecAggAdvertisement(_Msg):
    """A contribution under secure aggregation (POST .../secagg/advertise): the node's claims and
    its two round public keys (X25519, base64); the update itself comes masked, later."""

    meta: ContributionMeta
    cipher_key: str = Field(max_length=64, description="base64 of a 32-byte X25519 key")
    mask_key: str = Field(max_length=64, description="base64 of a 32-byte X25519 key")


class SecAggTaskRequest(_Msg):
    """Which contribution the node asks about (POST .../secagg/task)."""

    assignment_id: AssignmentId


class SecAggStageMessage(BaseModel):
    """A JSON answer to a SecAgg stage (POST .../secagg/{round}/{attempt}/{share|unmask});
    `privacy/secagg.py` encodes and checks the body. `masked` answers are raw bytes."""

    type: Literal["ShareKeys", "UnmaskShares"]
    body: dict[str, Any]


class SignedClaimBody(_Msg):
    """A ledger claim signed by its author (POST .../fund, .../payout-address)."""

    kind: Name
    payload_json: str = Field(max_length=8192)
    author: str = Field(pattern=r"^[0-9a-f]{64}$", description="Ed25519 public key, hex")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="Ed25519 signature, hex")


class ContributionAck(_Msg):
    contribution_id: str
    accepted: bool
    bytes_up: int


class NodeStatus(StrEnum):
    """What a node is doing: what its heartbeats say, stored as `nodes.status` on the hub."""

    IDLE = "idle"  # registered; waiting for work or between assignments
    TRAINING = "training"  # holds an assignment (the hub sets it when it assigns one)
    UPLOADING = "uploading"  # sending its contribution
    PAUSED = "paused"  # its own energy policy says not now (node/energy.py)
    LEFT = "left"  # it said goodbye (POST /nodes/leave); only the hub sets it, never a heartbeat


class Liveness(StrEnum):
    """How a run's status shows a node (derived, never stored)."""

    LIVE = "live"  # heard from within the hub's liveness_s
    SILENT = "silent"  # not heard from since; it may come back
    GONE = "gone"  # it said it left


class HeartbeatRequest(_Msg):
    status: Literal[
        NodeStatus.IDLE, NodeStatus.TRAINING, NodeStatus.UPLOADING, NodeStatus.PAUSED
    ] = NodeStatus.IDLE
    run_id: RunId | None = None


class HeartbeatResponse(_Msg):
    """The answer to a heartbeat: the interval the node should use from now on."""

    ok: bool = True
    heartbeat_s: HeartbeatSeconds | None = None


MAX_FORECAST_POINTS = 600


class EnergyReport(_Msg):
    """A node's energy state and outlook (POST /v1/nodes/energy): may it run now and why not,
    its draw, and its forecasts on one time grid (unix s), for the hub's energy policy."""

    run_id: RunId | None = None  # the run it is working on
    region: Name | None = None
    available: bool = True
    reasons: list[Text] = Field(default_factory=list, max_length=16)
    at_s: UnixTime  # the node's clock when it decided
    power_w: float = Field(gt=0, le=MAX_POWER_W)  # draw of its training (measured once trained)
    intensity_g_per_kwh: float | None = Field(default=None, ge=0, le=MAX_INTENSITY_G_PER_KWH)
    price_per_kwh: float | None = Field(default=None, ge=-1e6, le=1e6)
    surplus_w: SignedW | None = None  # PV - household now (W)
    battery_available_wh: float = Field(default=0.0, ge=0, le=MAX_ENERGY_WH)
    intensity_forecast: list[
        tuple[UnixTime, Annotated[float, Field(ge=0, le=MAX_INTENSITY_G_PER_KWH)]]
    ] = Field(default_factory=list, max_length=MAX_FORECAST_POINTS)
    surplus_forecast_w: list[tuple[UnixTime, SignedW]] | None = Field(
        default=None, max_length=MAX_FORECAST_POINTS
    )
    availability_forecast: list[tuple[UnixTime, bool]] | None = Field(
        default=None, max_length=MAX_FORECAST_POINTS
    )
    signal: Text = ""  # which provider the node reads


class Refusal(StrEnum):
    """Why the hub refused a request: the `reason` of every error body, so that a client acts on
    a code, never on the wording of `detail`."""

    MALFORMED = "malformed"  # 400/422: the request does not parse or breaks a bound
    TOO_LARGE = "too_large"  # 413
    UNAUTHENTICATED = "unauthenticated"  # 401: unsigned, bad signature, clock skew
    REPLAYED_REQUEST = "replayed_request"  # 409: a nonce seen before
    NOT_REGISTERED = "not_registered"  # 403: sign up first
    FORBIDDEN = "forbidden"  # 403: not yours (another node's assignment, ...)
    NOT_SPONSOR = "not_sponsor"  # 403: not on the hub's sponsor list, or not this run's sponsor
    NOT_INVITED = "not_invited"  # 403: the hub admits only its invited node keys (--node-invites)
    EXCLUDED = "excluded"  # 403: reputation excludes this node
    NOT_FOUND = "not_found"  # 404
    STALE = "stale"  # 409: the round or stage moved on
    DUPLICATE = "duplicate"  # 409: already stored (a retried upload: treat as accepted)
    CONFLICT = "conflict"  # 409: contradicts the run (keys reused, not a SecAgg run, ...)
    FALSE_CLAIM = "false_claim"  # 400: steps or tokens that cannot be true (a strike)
    BAD_CLAIM = "bad_claim"  # 400/403: the node's signed claim is malformed or forged
    ENERGY_FLOOR = "energy_floor"  # 400: less energy than the work needs
    REPLAYED_UPDATE = "replayed_update"  # 409: an update seen in an earlier round
    INVALID_CONFIG = "invalid_config"  # 422: run settings refused
    # 409: the run's stored settings no longer validate (a plugin they name is gone): the run
    # is stalled and answers nothing until its operator fixes or stops it
    UNREADABLE_SETTINGS = "unreadable_settings"
    OVER_MEMORY = "over_memory"  # 422: the run's estimated memory exceeds the hub's budget
    QUOTA = "quota"  # 429: this identity has too many runs (active or this hour), or its
    # pushed datasets and weights would exceed its byte quota (--max-dataset-mb-per-identity)
    # 413: pushed datasets and weights would exceed the hub's --max-dataset-mb
    STORAGE_FULL = "storage_full"
    RATE_LIMITED = "rate_limited"  # 429: too many requests from this key; see Retry-After
    # 429: too many new node identities from this network this hour, or too many live ones
    # that have not worked yet (hub/registration.py); see Retry-After
    REGISTRATION_LIMITED = "registration_limited"
    # 429: too many unsigned reads (status, reports, ledger, dashboard) already wait for the
    # hub's few threads for them; see Retry-After
    BUSY = "busy"
    UNAVAILABLE = "unavailable"  # 5xx: the hub cannot serve it now (storage)


MAX_DATASET_BLOBS = 200_001  # a manifest's shards (train + val, at most 100,000 each) + tokenizer


class DatasetOfferResponse(_Msg):
    """The hub's answer to a dataset offer (POST /v1/datasets): the blobs it still lacks (upload
    each to /v1/datasets/{manifest}/blobs/{digest}, then offer again), or, once it has every
    one, the name a run's `data.dataset` may use (`manifest:<sha256>`)."""

    manifest: Annotated[str, Field(pattern=DIGEST_PATTERN)]
    missing: list[Annotated[str, Field(pattern=DIGEST_PATTERN)]] = Field(
        max_length=MAX_DATASET_BLOBS
    )
    missing_bytes: int = Field(ge=0, le=1 << 62)
    dataset: Annotated[str, Field(pattern=r"^manifest:[0-9a-f]{64}$")] | None = None


class WeightsAck(_Msg):
    """Pushed weights were checked and stored (POST /v1/weights): the name a run's
    `model.init_weights` uses, and what the vector holds."""

    weights: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    numel: int = Field(gt=0, le=1 << 62)
    bytes: int = Field(ge=0, le=1 << 62)


MAX_WEIGHT_PARTS = 1 << 16  # parts of one pushed weights blob (at 64 MiB each: 4 TiB)


class WeightsOffer(_Msg):
    """Weights too large for one request, offered in parts (POST /v1/weights/offer): the whole
    blob's sha256 and size, and the sha256 of each part, in order; every part but the last
    holds `part_bytes` bytes."""

    sha256: Annotated[str, Field(pattern=DIGEST_PATTERN)]
    bytes: int = Field(gt=0, le=1 << 46)
    part_bytes: int = Field(gt=0, le=1 << 36)
    parts: list[Annotated[str, Field(pattern=DIGEST_PATTERN)]] = Field(
        min_length=1, max_length=MAX_WEIGHT_PARTS
    )

    @model_validator(mode="after")
    def _parts_cover_the_bytes(self) -> WeightsOffer:
        needed = -(-self.bytes // self.part_bytes)
        if len(self.parts) != needed:
            raise ValueError(
                f"{self.bytes} bytes in parts of {self.part_bytes} are {needed} parts, "
                f"not {len(self.parts)}"
            )
        return self

    def part_size(self, index: int) -> int:
        """Bytes of part `index` (the last one holds the rest)."""
        return min(self.part_bytes, self.bytes - index * self.part_bytes)


class WeightsOfferResponse(_Msg):
    """The parts the hub still lacks of offered weights (upload each to
    /v1/weights/{sha256}/parts/{index}, then offer again), or, once it has them all and has
    checked the whole, `ack` naming them for `model.init_weights`."""

    weights: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    missing: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_WEIGHT_PARTS)
    ack: WeightsAck | None = None


class WeightsPartAck(_Msg):
    """One part of offered weights was checked and stored."""

    index: int = Field(ge=0, lt=MAX_WEIGHT_PARTS)
    bytes: int = Field(ge=0, le=1 << 36)


class DatasetBlobAck(_Msg):
    """A pushed tokenizer or shard was checked and stored."""

    digest: Annotated[str, Field(pattern=DIGEST_PATTERN)]
    bytes: int = Field(ge=0, le=1 << 62)


class Problem(_Msg):
    """The body of every error response."""

    detail: str
    reason: Refusal
