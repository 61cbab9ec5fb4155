"""The hub's tables. Everything needed to continue a run lives here or in the blob store before
the hub acknowledges it, so the hub process itself holds no state worth losing."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gridswarm.db import Base


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    config_json: Mapped[str] = mapped_column(Text)
    sponsor_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | finished
    numel: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=0)  # newest model version
    round: Mapped[int] = mapped_column(Integer, default=0)  # current (open) round
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Node(Base):
    __tablename__ = "nodes"
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
    status: Mapped[str] = mapped_column(String(16), default="idle")


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
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | open | closed
    opened_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    close_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_round", "run_id", "round", "status"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    base_version: Mapped[int] = mapped_column(Integer)
    inner_steps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    # assigned -> submitted | missed (deadline/node lost) | released (node left) | late
    status: Mapped[str] = mapped_column(String(16), default="assigned")


class Contribution(Base):
    __tablename__ = "contributions"
    __table_args__ = (
        UniqueConstraint("assignment_id"),
        Index("ix_contributions_round", "run_id", "round"),
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
    status: Mapped[str] = mapped_column(String(16), default="accepted")
    created_at: Mapped[float] = mapped_column(Float)


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
