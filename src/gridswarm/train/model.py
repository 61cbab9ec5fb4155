"""The networks a run can train: a small built-in GPT, or any Hugging Face causal LM built from a
config (random init, no downloads). Both map token ids (B, T) to logits (B, T, V).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gridswarm.config import ModelConfig, is_dropout_field
from gridswarm.train.tokenizer import VOCAB_SIZE


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A pre-norm GPT-2 style decoder (nanoGPT's shape), weight-tied, no dropout so that local
    training is deterministic and can be replayed."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.block_size = block_size
        self.activation_checkpointing = False  # recompute each block in backward (less memory)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if self.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.ln_f(x))


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the same (B, T) -> logits interface."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.activation_checkpointing = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx).logits


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off (the GPT's blocks, or transformers' own)."""
    if isinstance(model, GPT):
        model.activation_checkpointing = enabled
    elif isinstance(model, HFCausalLM) and model.activation_checkpointing != enabled:
        if enabled:
            model.hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.hf.activation_checkpointing_disable()
        model.activation_checkpointing = enabled


def hf_config(cfg: ModelConfig, seq_len: int, vocab_size: int = VOCAB_SIZE):
    """The transformers config for `cfg`: the run's vocabulary and context length, the user's
    fields, and no dropout (`config.is_dropout_field`: a node's training must replay bit for bit,
    and an architecture's defaults may carry some)."""
    from transformers import AutoConfig

    fields = {**cfg.hf_config, "vocab_size": vocab_size}
    fields.setdefault("max_position_embeddings", max(seq_len, 128))
    if cfg.architecture == "gpt2":
        fields.setdefault("n_positions", fields.pop("max_position_embeddings"))
    try:
        config = AutoConfig.for_model(cfg.architecture, **fields)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"model.architecture {cfg.architecture!r}: {exc}") from exc
    for name, value in config.to_dict().items():  # the architecture's defaults (GPT-2's 0.1)
        if is_dropout_field(name, value):
            setattr(config, name, 0.0)
    return config


def build_model(
    cfg: ModelConfig, seq_len: int, seed: int, vocab_size: int = VOCAB_SIZE
) -> nn.Module:
    """A freshly initialised model; the same arguments always give the same weights.
    `vocab_size` is the run's tokenizer's (bytes: 256; prepared datasets: their manifest's)."""
    torch.manual_seed(seed)
    if cfg.kind == "gpt":
        return GPT(vocab_size, seq_len, cfg.n_layer, cfg.n_head, cfg.n_embd)
    from transformers import AutoModelForCausalLM

    return HFCausalLM(AutoModelForCausalLM.from_config(hf_config(cfg, seq_len, vocab_size)))


def vocab_size_of(model: nn.Module) -> int:
    """Token ids the model accepts."""
    if isinstance(model, HFCausalLM):
        return int(model.hf.config.vocab_size)
    return model.wte.num_embeddings


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, block_size: int, temperature: float
) -> torch.Tensor:
    """Sample `max_new_tokens` continuations of `idx` (B, T) autoregressively."""
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :]
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
