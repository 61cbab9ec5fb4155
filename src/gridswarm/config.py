"""Settings of a run, read from TOML and validated with pydantic.

Every field has a default that makes a small run work; an invalid value raises `ConfigError`
with the dotted name of the field, so `gridswarm run create run.toml` can say exactly what to fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CodecName = Literal["fp32", "fp16", "int8", "int4"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """A settings file or dict is invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which network to train. `kind="gpt"` is the built-in GPT; `kind="hf"` builds any
    Hugging Face causal-LM architecture from a config (random init, nothing downloaded)."""

    kind: Literal["gpt", "hf"] = "gpt"
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    # For kind="hf": the transformers model_type (e.g. "llama", "gpt2") and its config fields.
    architecture: str | None = None
    hf_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.kind == "hf" and not self.architecture:
            raise ValueError("architecture is required when kind = 'hf' (e.g. 'llama', 'gpt2')")
        return self


class DataConfig(_Strict):
    """Where the training text comes from. `dataset = "tinyshakespeare"` is bundled;
    any other value is a path to a text file or a folder of .txt files."""

    dataset: str = "tinyshakespeare"
    # "shared": the hub names the slice each node trains on (replayable);
    # "local": each node trains on its own files, which never leave it (federated mode).
    data: Literal["shared", "local"] = "shared"
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    eval_batches: PositiveInt = 8


class TrainConfig(_Strict):
    """DiLoCo settings: inner AdamW on each node, outer Nesterov SGD on the hub."""

    seq_len: PositiveInt = 64
    batch_size: PositiveInt = 16
    inner_steps: PositiveInt = 50
    min_inner_steps: PositiveInt = 5
    inner_lr: PositiveFloat = 3e-3
    inner_weight_decay: Annotated[float, Field(ge=0)] = 0.1
    # the inner AdamW starts fresh every round (replayable); warming it up avoids noisy first steps
    inner_warmup_steps: Annotated[int, Field(ge=0)] = 10
    outer_lr: PositiveFloat = 0.7
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    grad_clip: Annotated[float, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_inner_steps > self.inner_steps:
            raise ValueError(
                f"min_inner_steps ({self.min_inner_steps}) exceeds inner_steps ({self.inner_steps})"
            )
        return self


class CommConfig(_Strict):
    """How pseudo-gradients travel up and model updates travel down."""

    codec: CodecName = "int8"
    codec_down: CodecName = "int8"
    error_feedback: bool = False
    block_size: PositiveInt = 256


class RoundConfig(_Strict):
    """When a round closes and who may join it."""

    deadline_s: PositiveFloat = 60.0
    quorum: PositiveInt = 1
    min_nodes: PositiveInt = 1
    max_nodes: PositiveInt = 64
    aggregator: str = "mean"
    aggregator_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RoundConfig:
        if self.quorum > self.max_nodes:
            raise ValueError(f"quorum ({self.quorum}) exceeds max_nodes ({self.max_nodes})")
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) exceeds max_nodes ({self.max_nodes})")
        return self


class BudgetConfig(_Strict):
    """When the run ends: after `rounds` outer steps or `tokens` trained, whichever comes first."""

    rounds: PositiveInt | None = 20
    tokens: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> BudgetConfig:
        if self.rounds is None and self.tokens is None:
            raise ValueError("set rounds or tokens (or both)")
        return self


class RunConfig(_Strict):
    """Everything a run needs; the hub stores it as JSON with the run."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    comm: CommConfig = CommConfig()
    round: RoundConfig = RoundConfig()
    budget: BudgetConfig = BudgetConfig()

    @property
    def tokens_per_step(self) -> int:
        return self.train.seq_len * self.train.batch_size


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a dict (from TOML or JSON) into a RunConfig, or raise ConfigError naming fields."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid run settings: {_format_errors(exc)}") from exc


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run.toml."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_run_config(data)
