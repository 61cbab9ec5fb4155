"""The hub's tables. Everything needed to continue a run lives here or in the blob store before
the hub acknowledges it, so the hub process itself holds no state worth losing."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column, validates

from gridswarm.config import RunConfig
from gridswarm.db import Base
from gridswarm.hub.errors import UnreadableSettings
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.states import (
    ASSIGNMENT_MOVES,
    ASSIGNMENT_START,
    CONTRIBUTION_MOVES,
    CONTRIBUTION_START,
    ROUND_MOVES,
    ROUND_START,
    AssignmentStatus,
    ContributionStatus,
    RoundStatus,
    checked_move,
)
from gridswarm.protocol import NodeStatus


class Status(TypeDecorator):
    """A status column: stored as its word in a String(16), as it always was (no migration),
    and read back as the member of `enum`. Writing a word that is not a member raises, so a
    status the state machines do not know never reaches the database."""

    impl = String(16)
    cache_ok = True  # `enum` is a class: hashable, part of the statement cache key

    def __init__(self, enum: type[StrEnum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum(value)


@lru_cache(maxsize=1024)
def _parse_settings(config_json: str) -> RunConfig:
    return RunConfig.model_validate_json(config_json)  # frozen: safe to share between callers


def stored_settings(run_id: str, config_json: str) -> RunConfig:
    """A run's settings as stored, parsed once per process (every request and tick reads them);
    `UnreadableSettings` (409) when they no longer validate. Failures are not cached."""
    try:
        return _parse_settings(config_json)
    except ValidationError as exc:
        raise UnreadableSettings(run_id, exc) from exc


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    config_json: Mapped[str] = mapped_column(Text)
    sponsor_key: Mapped[str] = mapped_column(String(64))
    # active | paused | stalled | stopped | finished (hub/lifecycle.py)
    status: Mapped[RunState] = mapped_column(Status(RunState), default=RunState.ACTIVE)
    numel: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=0)  # newest model version
    round: Mapped[int] = mapped_column(Integer, default=0)  # current (open) round
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # 0008_lifecycle: why the run is in its status (stop/stall reason) and since when
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    status_changed_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    def settings(self) -> RunConfig:
        """This run's settings (`stored_settings`)."""
        return stored_settings(self.id, self.config_json)


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (
        Index("ix_nodes_last_seen", "last_seen_at"),
        Index("ix_nodes_register_net", "register_net", "registered_at"),  # per network (0009)
    )
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hardware_json: Mapped[str] = mapped_column(Text)
    region: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # parameter-tokens per second on the reference model: a model-independent speed estimate
    probe_rate: Mapped[float] = mapped_column(Float)
    max_threads: Mapped[int] = mapped_column(Integer, default=1)
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    status: Mapped[NodeStatus] = mapped_column(Status(NodeStatus), default=NodeStatus.IDLE)
    # the node's last EnergyReport (protocol.py) + when the hub received it (hub/energy.py)
    energy_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the client network its first registration came from (IPv4 /24, IPv6 /64), for the bound
    # on new identities per network (hub/registration.py); None for nodes from before 0009
    register_net: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Version(Base):
    """A model version: full weights, and the encoded update from the previous version."""

    __tablename__ = "versions"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    weights_blob: Mapped[str] = mapped_column(String(64), index=True)
    delta_blob: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    momentum_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_feedback_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    val_loss: Mapped[float] = mapped_column(Float)
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class Round(Base):
    __tablename__ = "rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_version: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[RoundStatus] = mapped_column(Status(RoundStatus), default=RoundStatus.PENDING)
    opened_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    close_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)

    @validates("status")
    def _move(self, _key: str, new: RoundStatus) -> RoundStatus:
        return checked_move("round", ROUND_MOVES, ROUND_START, self.status, RoundStatus(new))


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        Index("ix_assignments_round", "run_id", "round", "status"),
        Index("ix_assignments_node", "run_id", "round", "node_id"),  # a node's place (0007)
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    base_version: Mapped[int] = mapped_column(Integer)
    inner_steps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    # an AssignmentStatus (hub/states.py: its states and transitions)
    status: Mapped[AssignmentStatus] = mapped_column(
        Status(AssignmentStatus), default=AssignmentStatus.ASSIGNED
    )

    @validates("status")
    def _move(self, _key: str, new: AssignmentStatus) -> AssignmentStatus:
        return checked_move(
            "assignment", ASSIGNMENT_MOVES, ASSIGNMENT_START, self.status, AssignmentStatus(new)
        )


class Contribution(Base):
    __tablename__ = "contributions"
    __table_args__ = (
        UniqueConstraint("assignment_id"),
        Index("ix_contributions_round", "run_id", "round"),
        Index("ix_contributions_node", "run_id", "node_id", "round"),  # its speed (0007)
        Index("ix_contributions_created", "run_id", "created_at"),  # the newest (0007)
        Index("ix_contributions_worker", "node_id", "status"),  # has it worked? (0009)
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the blob
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    round: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    assignment_id: Mapped[str] = mapped_column(ForeignKey("assignments.id"))
    base_version: Mapped[int] = mapped_column(Integer)
    codec: Mapped[str] = mapped_column(String(16))
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    loss_first: Mapped[float] = mapped_column(Float)
    loss_last: Mapped[float] = mapped_column(Float)
    train_time_s: Mapped[float] = mapped_column(Float)
    threads: Mapped[int] = mapped_column(Integer)
    energy_wh: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    region: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # carbon accounting at submit (hub/energy.py): grid intensity at region and time, where it
    # came from ("hub" signal or the "node"'s report), emissions, share met by local surplus
    intensity_g_per_kwh: Mapped[float | None] = mapped_column(Float, nullable=True)
    intensity_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    emissions_g: Mapped[float | None] = mapped_column(Float, nullable=True)
    local_surplus_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[ContributionStatus] = mapped_column(
        Status(ContributionStatus), default=ContributionStatus.ACCEPTED
    )
    # trust (0004_trust): what verification concluded; NULL until the round is screened
    update_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    claim_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # node's ledger claim
    audit_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    audited: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    audit_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    loss_drop: Mapped[float | None] = mapped_column(Float, nullable=True)  # alone, held-out
    usefulness: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_units: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    verdict_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    @validates("status")
    def _move(self, _key: str, new: ContributionStatus) -> ContributionStatus:
        return checked_move(
            "contribution",
            CONTRIBUTION_MOVES,
            CONTRIBUTION_START,
            self.status,
            ContributionStatus(new),
        )

    @classmethod
    def accepted(
        cls,
        digest: str,
        assignment: Assignment,
        claims: dict[str, Any],
        bytes_up: int,
        created_at: float,
        **columns: Any,
    ) -> Contribution:
        """The row of an accepted upload: the node's claims that are columns, then `columns`
        (hub-side figures such as carbon, which win over the node's), then what the hub knows."""
        names = _contribution_columns()
        fields = {k: v for k, v in claims.items() if k in names} | columns
        return cls(
            **fields
            | {
                "id": digest,
                "run_id": assignment.run_id,
                "round": assignment.round,
                "node_id": assignment.node_id,
                "assignment_id": assignment.id,
                "base_version": assignment.base_version,
                "bytes_up": bytes_up,
                "status": ContributionStatus.ACCEPTED,
                "created_at": created_at,
            }
        )


@lru_cache(maxsize=1)
def _contribution_columns() -> frozenset[str]:
    """The contributions table's column names, listed once (every accepted upload asks)."""
    return frozenset(Contribution.__table__.columns.keys())


class Download(Base):
    """Bytes a node pulled (model weights or deltas), for communication accounting."""

    __tablename__ = "downloads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    node_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    blob: Mapped[str] = mapped_column(String(64))
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class Nonce(Base):
    """Nonces of recent signed requests: a request whose nonce is here is a replay."""

    __tablename__ = "nonces"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    seen_at: Mapped[float] = mapped_column(Float, index=True)


class PrivacyRound(Base):
    """Differential-privacy accounting of one closed round: the noise it used and the epsilon
    spent by the run after it (recomputed from these rows after a restart)."""

    __tablename__ = "privacy_rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    clip_norm: Mapped[float] = mapped_column(Float)
    nodes: Mapped[int] = mapped_column(Integer)
    clipped: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None under SecAgg
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class PrivacyRun(Base):
    """Why a run was stopped by its privacy settings (epsilon budget)."""

    __tablename__ = "privacy_runs"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    stop_reason: Mapped[str] = mapped_column(Text)
    stopped_at: Mapped[float] = mapped_column(Float)


class SecAggSession(Base):
    """The secure-aggregation stages of one round (one row per round; a failed attempt is
    retrained and reuses the row, keeping the last failure's reason)."""

    __tablename__ = "secagg_sessions"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))  # share | mask | unmask | done | failed
    config_json: Mapped[str] = mapped_column(Text)  # the SecAggConfig (encode_message)
    stage_deadline_at: Mapped[float] = mapped_column(Float)
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    survivors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dropped: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sum_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)  # unmasked sum
    aggregate_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[str | None] = mapped_column(Text, nullable=True)


class SecAggMessage(Base):
    """One node's message of one SecAgg stage: keys, encrypted shares (opaque to the hub), the
    blob digest of its masked input, or its unmasking shares."""

    __tablename__ = "secagg_messages"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    # advertise | share | masked | unmask
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class TrustRound(Base):
    """The audit seed of one round: its sha256 is on the ledger when the round opens, the seed
    itself only once submissions have closed (kept secret here until then)."""

    __tablename__ = "trust_rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_seed: Mapped[str] = mapped_column(String(64))
    commitment: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[float] = mapped_column(Float)
    revealed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NodeReputation(Base):
    """A node's track record across runs (trust/reputation.py); `score` feeds selection and the
    audit rate. Every change is also on the ledger."""

    __tablename__ = "node_reputation"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    consecutive_valid: Mapped[int] = mapped_column(Integer, default=0)
    audits_passed: Mapped[int] = mapped_column(Integer, default=0)
    audits_failed: Mapped[int] = mapped_column(Integer, default=0)
    strikes: Mapped[int] = mapped_column(Integer, default=0)
    liveness: Mapped[float] = mapped_column(Float, default=1.0)
    usefulness: Mapped[float] = mapped_column(Float, default=0.5)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float)


class RunFailure(Base):
    """A node could not train its assignment (dataset missing, model does not fit, ...): what it
    reported. Enough of them with no round closed in between mark the run stalled."""

    __tablename__ = "run_failures"
    __table_args__ = (Index("ix_run_failures_run", "run_id", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    round: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class PushedDataset(Base):
    """A prepared dataset a sponsor offered (`gridswarm data push`, hub/datasets.py): its
    manifest, and the bytes this identity was allowed to upload for it (the blobs the hub lacked
    when it first offered it), which count against its quota and the hub's cap. `completed_at`:
    when every blob was there and the manifest blob was stored."""

    __tablename__ = "pushed_datasets"
    manifest_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    sponsor_key: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    manifest_json: Mapped[str] = mapped_column(Text)
    tokenizer_bytes: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PushedBlob(Base):
    """A tokenizer or token shard the hub checked on upload (hub/datasets.py) and stored: what
    it was found to be, so that another manifest naming the same bytes counts it as present
    only when it agrees (same dtype, ids within its vocabulary; the same vocabulary size)."""

    __tablename__ = "pushed_blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "shard" or "tokenizer"
    dtype: Mapped[str | None] = mapped_column(String(8), nullable=True)  # shards
    max_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # shards
    vocab_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # tokenizers
    eos_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # tokenizers
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class PushedWeights(Base):
    """Model weights a sponsor pushed to start runs from (`gridswarm run create --init-from`,
    hub/weights.py): a safetensors file of one flat fp32 vector, every value finite, named by
    its sha256; who pushed it, its length, and the bytes it counts against that identity's
    quota and the hub's cap (shared with pushed datasets). Pushed in one request, the blob is
    stored whole; offered in parts (`parts_json`: the `WeightsOffer`), its parts are stored
    and `numel` and `completed_at` are set once they all arrived and the whole was checked.
    A run's `model.init_weights` may name only a complete row of its own sponsor."""

    __tablename__ = "pushed_weights"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    sponsor_key: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    numel: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    parts_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PushedWeightPart(Base):
    """A part of offered weights (`PushedWeights.parts_json`) that this identity uploaded and
    the hub checked (its sha256 and size) and stored."""

    __tablename__ = "pushed_weight_parts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # the whole blob's
    sponsor_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    part_sha256: Mapped[str] = mapped_column(String(64))
