"""How much memory a run takes, estimated from its config alone, before anything is allocated.

The hub refuses a run whose estimate exceeds its budget (`gridswarm hub --max-run-memory-mb`)
before it builds the model, so a config such as `model.n_layer = 1000, n_embd = 65536` or a huge
`train.batch_size` is a fast 422 instead of a hub killed by the kernel. The estimate counts fp32
values (4 bytes):

- parameters: exact for the built-in GPT (`train/model.py`); for a Hugging Face architecture, the
  embedding, attention and MLP matrices of its config (norms and biases left out);
- hub, per run: weights, outer momentum, error-feedback residual and the pseudo-gradient, plus
  one serialised vector being stored (5 vectors; the outer step runs in place, in pieces:
  `train/outer.py`), plus what it holds of up to `round.max_nodes` contributions while it
  aggregates (`upload_bytes_per_value`: each one's payload when the rule is taken a block of
  columns at a time, else its decoded fp32 row), plus one node's training for audit replays;
- node training: weights, gradients and AdamW's two moments (4 vectors), plus activations of one
  batch: per layer ~16 values per token per channel, one attention score matrix, and the logits
  with their softmax and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridswarm.config import RunConfig
from gridswarm.train.tokenizer import VOCAB_SIZE

FLOAT_BYTES = 4
HUB_VECTORS = 5  # weights, momentum, residual, pseudo-gradient, one vector being serialised
TRAIN_VECTORS = 4  # weights, gradients, AdamW exp_avg and exp_avg_sq
ACTIVATIONS_PER_CHANNEL = 16  # values kept per token, channel and layer for the backward pass
LOGIT_COPIES = 3  # logits, softmax, gradient
MIB = 1024 * 1024


class OverBudget(ValueError):
    """A run's estimated memory exceeds the hub's budget (the message says both)."""


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a transformer's memory."""

    vocab: int
    positions: int
    layers: int
    width: int
    heads: int
    mlp_width: int


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    node_bytes: int  # one node training one batch
    hub_bytes: int  # the hub's share of one run, audit replays included

    @property
    def hub_mib(self) -> float:
        return self.hub_bytes / MIB


def model_shape(cfg: RunConfig) -> Shape:
    """The transformer shape of `cfg.model`; ValueError if a Hugging Face config lacks sizes."""
    model, seq_len = cfg.model, cfg.train.seq_len
    if model.kind == "gpt":
        return Shape(
            VOCAB_SIZE, seq_len, model.n_layer, model.n_embd, model.n_head, 4 * model.n_embd
        )
    from gridswarm.train.model import hf_config

    try:  # a config object only, no weights; transformers validates the user's fields its way
        hf = hf_config(model, seq_len)
    except Exception as exc:
        raise ValueError(f"model.hf_config: {type(exc).__name__}: {exc}"[:500]) from exc

    def size(*names: str, default: int | None = None) -> int:
        for name in names:
            value = getattr(hf, name, None)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"model.hf_config: {name} must be a positive integer")
                return value
        if default is None:
            raise ValueError(f"model.hf_config: cannot tell the model's {names[0]}")
        return default

    width = size("hidden_size", "n_embd", "d_model")
    return Shape(
        vocab=size("vocab_size"),
        positions=size("max_position_embeddings", "n_positions", default=seq_len),
        layers=size("num_hidden_layers", "n_layer", "num_layers"),
        width=width,
        heads=size("num_attention_heads", "n_head", default=1),
        mlp_width=size("intermediate_size", "n_inner", "ffn_dim", default=4 * width),
    )


def count_parameters(shape: Shape, exact_gpt: bool) -> int:
    """Parameters of `shape`: exact for the built-in GPT (tied embeddings, biases, LayerNorms)."""
    v, p, n, c, f = shape.vocab, shape.positions, shape.layers, shape.width, shape.mlp_width
    if exact_gpt:
        per_block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        return v * c + p * c + n * per_block + 2 * c
    return 2 * v * c + p * c + n * (4 * c * c + 3 * c * f)


def upload_bytes_per_value(cfg: RunConfig) -> float:
    """Bytes per parameter the hub holds of each contribution while it aggregates a round
    (`train/aggregate.py` `EncodedRows`): its payload (int8 about 1, int4 about 0.5) for a
    coordinate-wise rule over a codec that decodes spans, without DP or SecAgg; else its
    decoded fp32 row (4)."""
    from gridswarm.train.aggregate import block_width, make_aggregator  # torch, lazily
    from gridswarm.train.codecs import make_codec, span_decoding

    rule = make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
    codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
    align = span_decoding(codec)
    private = cfg.privacy.dp is not None or cfg.privacy.secagg
    if private or not rule.coordinatewise or align is None or not block_width(rule, align):
        return float(FLOAT_BYTES)
    import torch

    sample = 1 << 14
    payload = codec.encode(torch.zeros(sample))
    return sum(t.numel() * t.element_size() for t in payload.values()) / sample


def estimate_memory(cfg: RunConfig) -> MemoryEstimate:
    """Bytes a run needs on a node and on the hub, from its config alone (see the module doc)."""
    shape = model_shape(cfg)
    params = count_parameters(shape, exact_gpt=cfg.model.kind == "gpt")
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    activations = FLOAT_BYTES * (
        batch * seq * (shape.layers * ACTIVATIONS_PER_CHANNEL * shape.width)
        + batch * shape.heads * seq * seq
        + LOGIT_COPIES * batch * seq * shape.vocab
    )
    node = FLOAT_BYTES * TRAIN_VECTORS * params + activations
    held = upload_bytes_per_value(cfg) * cfg.round.max_nodes * params
    hub = int(FLOAT_BYTES * HUB_VECTORS * params + held) + node
    return MemoryEstimate(params, node, hub)


def check_memory(cfg: RunConfig, budget_mib: float) -> MemoryEstimate:
    """The estimate, or OverBudget saying it and the budget when the run would not fit
    (ValueError when the model's shape cannot be told from its settings)."""
    estimate = estimate_memory(cfg)
    if estimate.hub_bytes > budget_mib * MIB:
        raise OverBudget(
            f"the run needs an estimated {estimate.hub_mib:,.0f} MiB on the hub "
            f"({estimate.parameters:,} parameters, {cfg.round.max_nodes} contributions per "
            f"round, batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens), over its budget "
            f"of {budget_mib:,.0f} MiB per run (gridswarm hub --max-run-memory-mb)"
        )
    return estimate
