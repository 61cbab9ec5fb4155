"""Settings of a run, read from TOML and validated with pydantic.

Every field has a default that makes a small run work; an invalid value raises `ConfigError`
with the dotted name of the field, so `gridswarm run create run.toml` can say exactly what to fix.
Every number is finite and bounded (a run config comes from any identity that may create runs):
the bounds are generous for real runs and keep arithmetic and columns from overflowing; how much
memory a run may take is decided separately, from the whole config (`train/memory.py`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gridswarm.protocol import MAX_FUND_UNITS, describe_errors, printable


def _registered_codec(name: str) -> str:
    """A codec name known to the codec registry (built in or a `gridswarm.codecs` plugin)."""
    from gridswarm.train.codecs import CODECS  # imports torch: only when a run is validated

    CODECS.get(name)  # UnknownPlugin (a ValueError) lists the known names
    return name


CodecName = Annotated[str, Field(max_length=64), AfterValidator(_registered_codec)]
MAX_COUNT = 10**9  # steps, rounds, nodes, ... : no real run comes near
MAX_TOKENS = 10**15
MAX_SECONDS = 1e9  # ~30 years
MAX_HF_CONFIG_KEYS = 64


def is_dropout_field(name: str, value: object) -> bool:
    """A transformers config field that is a dropout probability above 0 (`resid_pdrop`,
    `attention_dropout`, `hidden_dropout_prob`, ...). Runs train without dropout: the hub audits
    a contribution by replaying its training bit for bit (train/local.py), and dropout draws
    random masks."""
    named = "dropout" in name or name.endswith("pdrop")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return named and number and value > 0


INIT_WEIGHTS_PREFIX = "sha256:"  # model.init_weights names pushed weights by their sha256
INIT_WEIGHTS_PATTERN = r"^sha256:[0-9a-f]{64}$"
PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PositiveFloat = Annotated[float, Field(gt=0, le=1e9)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
Rate = Annotated[float, Field(gt=0, le=1e3)]  # learning rates, multipliers
ShortText = Annotated[str, Field(max_length=128), AfterValidator(printable)]


class ConfigError(ValueError):
    """A settings file or dict is invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Which network to train. `kind="gpt"` is the built-in GPT; `kind="hf"` builds any
    Hugging Face causal-LM architecture from a config (random init, nothing downloaded)."""

    kind: Literal["gpt", "hf"] = "gpt"
    n_layer: Annotated[int, Field(gt=0, le=1024)] = 2
    n_head: Annotated[int, Field(gt=0, le=1024)] = 4
    n_embd: Annotated[int, Field(gt=0, le=1 << 16)] = 128
    # For kind="hf": the transformers model_type (e.g. "llama", "gpt2") and its config fields.
    architecture: ShortText | None = None
    hf_config: dict[ShortText, Any] = Field(default_factory=dict, max_length=MAX_HF_CONFIG_KEYS)
    # Start from weights the sponsor pushed (`gridswarm run create --init-from DIR`, hub/weights.py)
    # instead of a random init: `sha256:<hex>` of the pushed flat fp32 vector, version 0's weights.
    init_weights: Annotated[str, Field(pattern=INIT_WEIGHTS_PATTERN)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.kind == "hf" and not self.architecture:
            raise ValueError("architecture is required when kind = 'hf' (e.g. 'llama', 'gpt2')")
        dropout = sorted(k for k, v in self.hf_config.items() if is_dropout_field(k, v))
        if dropout:
            raise ValueError(
                f"hf_config {', '.join(dropout)}: dropout must be 0 (audits replay a node's "
                "training bit for bit; the architecture's default dropout is set to 0 too)"
            )
        return self


class DataConfig(_Strict):
    """Where the training text comes from. `dataset = "tinyshakespeare"` is bundled; a path to a
    text file or a folder of .txt files trains byte-level; a folder written by `gridswarm data
    prepare` (or `manifest:<sha256>` of one the hub holds) trains on its token shards with its
    tokenizer (train/dataset.py)."""

    dataset: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(printable)] = (
        "tinyshakespeare"
    )
    # "shared": the hub names the slice each node trains on (replayable);
    # "local": each node trains on its own files (`gridswarm node --data PATH`), which never
    # leave it (federated mode). The hub then never reads node data: `dataset` names the PUBLIC
    # text whose held-out split (last val_fraction) the hub evaluates on.
    data: Literal["shared", "local"] = "shared"
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    eval_batches: Annotated[int, Field(gt=0, le=1024)] = 8
    # prepared datasets: shards one node's slice draws its windows from (and needs to fetch)
    slice_shards: Annotated[int, Field(gt=0, le=64)] = 2


class TrainConfig(_Strict):
    """DiLoCo settings: inner AdamW on each node, outer Nesterov SGD on the hub."""

    seq_len: Annotated[int, Field(gt=0, le=1 << 20)] = 64
    batch_size: Annotated[int, Field(gt=0, le=1 << 20)] = 16
    inner_steps: Annotated[int, Field(gt=0, le=10**7)] = 50
    min_inner_steps: Annotated[int, Field(gt=0, le=10**7)] = 5
    inner_lr: Rate = 3e-3
    inner_weight_decay: Annotated[float, Field(ge=0, le=1e3)] = 0.1
    # the inner AdamW starts fresh every round (replayable); warming it up avoids noisy first steps
    inner_warmup_steps: Annotated[int, Field(ge=0, le=10**7)] = 10
    # the inner lr over the whole run (train/schedule.py), the warm-up multiplied in:
    # "constant" keeps inner_lr; "cosine" decays it to min_lr_ratio * inner_lr at the run's
    # last step (round * inner_steps + step over budget.rounds * inner_steps: needs budget.rounds)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    outer_lr: Rate = 0.7
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    grad_clip: Annotated[float, Field(ge=0, le=1e9)] = 1.0
    # samples per forward/backward; gradients are accumulated up to batch_size (None: whole
    # batch). A node may halve it to fit its memory: the result equals the full batch up to
    # float rounding, and the node reports what it used so a replay uses the same
    micro_batch_size: Annotated[int, Field(gt=0, le=1 << 20)] | None = None
    activation_checkpointing: bool = False  # recompute activations in backward: less memory
    # keep each node's inner AdamW (moments and step count, so the warm-up runs once) across
    # rounds instead of building a fresh one every round; the weights still restart from the
    # published version. Rounds then continue one optimizer instead of restarting it every H
    # steps (bench/results/communication_sweep_quick.md). Nodes hold state between rounds as
    # in Streaming DiLoCo (the same node path), so contributions are not replay-audited
    keep_inner_optimizer: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})"
            )
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
    block_size: Annotated[int, Field(gt=0, le=1 << 24)] = 256
    # Streaming DiLoCo (train/fragments.py, train/streaming.py): round r syncs only fragment
    # r % fragments of the parameters; nodes keep their local weights and inner AdamW across
    # rounds. 1 = classic DiLoCo (every round syncs everything, nodes start fresh).
    fragments: Annotated[int, Field(ge=1, le=64)] = 1
    # upload and fetch the next version in the background while training ahead on the next
    # round's data; on merge local <- overlap_mix * local + (1 - overlap_mix) * global
    overlap: bool = False
    overlap_mix: Annotated[float, Field(ge=0, lt=1)] = 0.5

    @property
    def streaming(self) -> bool:
        """True when nodes keep state across rounds (fragments > 1 or overlap)."""
        return self.fragments > 1 or self.overlap


class RoundConfig(_Strict):
    """When a round closes and who may join it."""

    deadline_s: Seconds = 60.0
    quorum: Annotated[int, Field(gt=0, le=1 << 20)] = 1
    min_nodes: Annotated[int, Field(gt=0, le=1 << 20)] = 1
    max_nodes: Annotated[int, Field(gt=0, le=1 << 20)] = 64
    # at most ceil(share x max_nodes) of a round's places go to nodes that have never worked on
    # this hub (trust/policy.py `newcomer_places`); 1.0: no cap. It must leave a round of
    # newcomers alone able to open and close (>= min_nodes and quorum), so a new hub starts
    max_newcomer_share: Annotated[float, Field(ge=0, le=1)] = 1.0
    aggregator: ShortText = "mean"
    aggregator_options: dict[ShortText, Any] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _check(self) -> RoundConfig:
        from gridswarm.train.aggregate import make_aggregator  # the registry, plugins included

        make_aggregator(self.aggregator, **self.aggregator_options)  # ValueError names the problem
        if self.quorum > self.max_nodes:
            raise ValueError(f"quorum ({self.quorum}) exceeds max_nodes ({self.max_nodes})")
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) exceeds max_nodes ({self.max_nodes})")
        from gridswarm.trust.policy import newcomer_places  # imports this module

        places = newcomer_places(self.max_newcomer_share, self.max_nodes)
        needed = max(self.min_nodes, self.quorum)
        if places < needed:  # no round could open and close on a hub where none has worked
            raise ValueError(f"max_newcomer_share: {places} < min_nodes/quorum {needed}")
        return self


class BudgetConfig(_Strict):
    """When the run ends: after `rounds` outer steps or `tokens` trained, whichever comes first."""

    rounds: PositiveInt | None = 20
    tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] | None = None

    @model_validator(mode="after")
    def _check(self) -> BudgetConfig:
        if self.rounds is None and self.tokens is None:
            raise ValueError("set rounds or tokens (or both)")
        return self


class SecAggSettings(_Strict):
    """Secure aggregation (SecAgg+, docs/privacy.md): the hub learns only the sum of updates."""

    neighbours: Annotated[int, Field(gt=0, le=1 << 20)] = 10  # k: even; k >= participants - 1
    max_dropouts: Annotated[int, Field(ge=0, le=1 << 20)] = 1  # t: nodes that may vanish
    # R: without DP each coordinate is clipped to [-R, R] before 32-bit quantisation
    clip_range: PositiveFloat = 1.0
    stage_timeout_s: Seconds = 30.0  # a stage waits this long for slow participants

    @model_validator(mode="after")
    def _check(self) -> SecAggSettings:
        if self.neighbours % 2:
            raise ValueError(f"neighbours must be even (k/2 on each side), got {self.neighbours}")
        if 2 * self.max_dropouts >= self.neighbours + 1:
            raise ValueError(
                f"max_dropouts ({self.max_dropouts}) must stay below (neighbours + 1) / 2 "
                f"= {(self.neighbours + 1) / 2} so the share threshold is a strict majority"
            )
        return self


class DPSettings(_Strict):
    """Node-level differential privacy (DP-FedAvg): clip each update, add Gaussian noise."""

    clip_norm: PositiveFloat = 1.0  # C: L2 bound on each node's pseudo-gradient
    noise_multiplier: PositiveFloat = 1.0  # z: noise std on the sum is z * C
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    epsilon_budget: PositiveFloat = 10.0  # the run finishes before a round would pass it
    # central: the hub adds the noise (trusted hub); distributed: each node adds its share
    # before secure aggregation (requires privacy.secagg)
    noise: Literal["central", "distributed"] = "central"
    # q = nodes per round / population; keep 1 unless nodes are sampled at random
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"


class PrivacyConfig(_Strict):
    """Secure aggregation and differential privacy; both off by default. `secagg = true` /
    `dp = true` turn one on with default settings, a [privacy.secagg] / [privacy.dp] table
    sets them."""

    secagg: SecAggSettings | None = None
    dp: DPSettings | None = None

    @field_validator("secagg", "dp", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value


def check_streaming(cfg: RunConfig) -> None:
    """Refuse combinations that nodes keeping state across rounds (Streaming DiLoCo:
    comm.fragments > 1 or comm.overlap; or train.keep_inner_optimizer) cannot honour: the field
    that conflicts comes first in the message."""
    if not cfg.keeps_node_state:
        return
    if cfg.comm.fragments > 1:
        what = f"comm.fragments = {cfg.comm.fragments}"
    else:
        what = "comm.overlap" if cfg.comm.overlap else "train.keep_inner_optimizer"
    if cfg.privacy.secagg or cfg.privacy.dp:
        raise ValueError(
            f"privacy.secagg / privacy.dp cannot run with {what}: their sums, clipping and "
            f"accounting are over whole-model updates"
        )
    if cfg.data.data == "local":
        raise ValueError(f"data.data = 'local' (federated) is not supported with {what}")
    if cfg.comm.error_feedback:
        why = (
            "its residual is per whole-model upload, fragment uploads would mix fragments"
            if cfg.comm.fragments > 1
            else "the node's kept-state round (node/streaming_round.py) does not apply it"
        )
        raise ValueError(f"comm.error_feedback cannot run with {what}: {why}")


def check_privacy(cfg: RunConfig) -> None:
    """Refuse combinations that secure aggregation or DP cannot honour; names the field."""
    p, rnd = cfg.privacy, cfg.round
    if (p.secagg or p.dp) and rnd.aggregator != "mean":
        what = "privacy.secagg (the hub sees only the sum)" if p.secagg else "privacy.dp"
        raise ValueError(
            f"round.aggregator = {rnd.aggregator!r} cannot run with {what}: robust rules need "
            f"individual updates; use 'mean' (clipping bounds each node's influence instead)"
        )
    if p.dp and p.dp.noise == "distributed" and not p.secagg:
        raise ValueError(
            "privacy.dp.noise = 'distributed' needs privacy.secagg: without it the hub sees each "
            "node's update with only its small share of the noise; use 'central'"
        )
    if p.secagg and cfg.comm.error_feedback:
        raise ValueError(
            "comm.error_feedback has no effect under privacy.secagg: uploads are masked 32-bit "
            "words, not codec-compressed; set it to false"
        )
    if p.secagg:
        if rnd.quorum < 2:
            raise ValueError(
                f"round.quorum must be >= 2 under privacy.secagg (a sum of one update is that "
                f"update), got {rnd.quorum}"
            )
        degree = min(p.secagg.neighbours, rnd.quorum - 1)
        if 2 * p.secagg.max_dropouts >= degree + 1:
            raise ValueError(
                f"privacy.secagg.max_dropouts = {p.secagg.max_dropouts} is too many for a round of "
                f"round.quorum = {rnd.quorum} nodes ({degree} neighbours each): at most "
                f"{degree // 2}; raise the quorum or lower max_dropouts"
            )


def check_schedule(cfg: RunConfig) -> None:
    """Refuse a decaying inner lr schedule without a round budget: the schedule runs over
    `budget.rounds * train.inner_steps` steps (train/schedule.py), and a token budget alone
    does not say how many steps a node will train (it depends on how many nodes join)."""
    if cfg.train.lr_schedule != "constant" and cfg.budget.rounds is None:
        raise ValueError(
            f"train.lr_schedule = {cfg.train.lr_schedule!r} needs budget.rounds: the schedule "
            f"decays over budget.rounds * train.inner_steps steps (a token budget alone does "
            f"not fix how many steps a node trains); set budget.rounds or use 'constant'"
        )


class EnergyConfig(_Strict):
    """Hub-side energy scheduling (docs/energy.md): `agnostic` (today's behaviour: everyone
    available runs as much as speed allows), `greedy-green` (the cleanest nodes now, at the pace
    the deadline needs) or `forecast` (also shift work in time within the deadline). The two
    green policies need `deadline_s` here and a token target (`budget.tokens`)."""

    policy: ShortText = "agnostic"  # or a registered plugin's name
    deadline_s: Seconds | None = None  # budget.tokens due this long after the run starts
    round_overhead_s: Annotated[float, Field(ge=0, le=MAX_SECONDS)] = 2.0  # sync time per round
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.1  # spare pace / future-capacity discount
    reserve_rounds: Count = 1  # plan to finish this many rounds early
    default_intensity_g_per_kwh: Annotated[float, Field(ge=0, le=1e5)] = 475.0  # no signal
    forecast_horizon_s: Annotated[float, Field(gt=0, le=3e7)] = 172800.0  # hub's own signals

    @model_validator(mode="after")
    def _check(self) -> EnergyConfig:
        from gridswarm.energy.policy import HUB_POLICIES  # built-ins and plugins

        if HUB_POLICIES.get(self.policy).needs_token_target and self.deadline_s is None:
            raise ValueError(f"deadline_s is required with policy {self.policy!r}")
        return self


class TrustConfig(_Strict):
    """Verification and rewards in live rounds (docs/ledger.md). The defaults audit every
    newcomer's first contributions by replay (cheap for small models), score usefulness, and pay
    only what the sponsor funded (`gridswarm run fund`): an unfunded run trains with a pool of 0.

    Audit rate: p = clamp(safety_factor * cost_fraction / (1 + forfeit), audit_min_rate,
    audit_max_rate) with the forfeit (in rounds of reward) from reputation; newcomers (fewer than
    `newcomer_audits` clean audits) get audit_max_rate. `audit_max_rate = 0` turns audits off.
    """

    audit_min_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    audit_max_rate: Annotated[float, Field(ge=0, le=1)] = 1.0
    newcomer_audits: Count = 2
    cost_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3  # c / R: cost of honest work
    safety_factor: Annotated[float, Field(ge=1, le=1e6)] = 2.0
    reputation_value_rounds: Annotated[float, Field(ge=0, le=1e9)] = 20.0  # K: worth K rounds
    usefulness: bool = True  # score each contribution by the held-out loss change it causes
    harm_tolerance_nats: PositiveFloat = 1.0  # reject one that raises held-out loss by more
    energy_min_fraction: Annotated[float, Field(ge=0, le=1)] = 0.02  # of the meter model's Wh
    reward_per_round_units: Annotated[int, Field(gt=0, le=MAX_FUND_UNITS)] | None = None
    low_carbon_bonus: Annotated[float, Field(ge=0, le=10)] = 0.0
    reference_intensity_g_per_kwh: Annotated[float, Field(gt=0, le=1e5)] = 400.0
    forfeit_on_strike: bool = True  # a caught node also loses its unclaimed rewards
    # replay comparison (trust/tolerance.py): "auto" is bit-exact for CPU work and within
    # max(k × the largest distance between honest reruns, floor) for GPU work
    replay_match: Literal["auto", "exact", "tolerance"] = "auto"
    replay_tolerance_k: Annotated[float, Field(ge=1, le=1000)] = 4.0
    replay_tolerance_floor: Annotated[float, Field(ge=0, le=0.1)] = 1e-6

    @model_validator(mode="after")
    def _check(self) -> TrustConfig:
        if self.audit_min_rate > self.audit_max_rate:
            raise ValueError(
                f"audit_min_rate ({self.audit_min_rate}) exceeds audit_max_rate "
                f"({self.audit_max_rate})"
            )
        return self


class RunConfig(_Strict):
    """Everything a run needs; the hub stores it as JSON with the run."""

    name: ShortText = "run"
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] = 0
    # each table built when a run is (not when this module is imported: the round's check
    # loads the aggregator registry, and with it torch, which a CLI command may never need)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    round: RoundConfig = Field(default_factory=RoundConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)

    @model_validator(mode="after")
    def _check_privacy(self) -> RunConfig:
        check_privacy(self)
        check_streaming(self)
        check_schedule(self)
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.train.seq_len * self.train.batch_size

    @property
    def keeps_node_state(self) -> bool:
        """True when nodes keep state across rounds (`train/streaming.LocalState`): Streaming
        DiLoCo (`comm.streaming`) or a kept inner optimizer (`train.keep_inner_optimizer`)."""
        return self.comm.streaming or self.train.keep_inner_optimizer


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a dict (from TOML or JSON) into a RunConfig, or raise ConfigError naming fields."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid run settings: {describe_errors(exc.errors(), 10)}") from exc


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run.toml."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_run_config(data)
