"""Exporting a run's model to a folder the Hugging Face ecosystem loads, and sampling from it.

The folder holds the model in transformers' layout (`config.json` + `model.safetensors`) and the
run's tokenizer (`tokenizer.json` + `tokenizer_config.json`), so
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load
and generate. The built-in GPT is written as a `GPT2LMHeadModel` with the same weights (its shape
is GPT-2's, with exact GELU); `kind = "hf"` models are saved as they are. `gridswarm.json` keeps
the run's settings and provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from gridswarm.config import RunConfig
from gridswarm.train.dataset import dataset_tokenizer
from gridswarm.train.model import GPT, HFCausalLM, build_model, generate
from gridswarm.train.params import assign_flat, unpack_vector
from gridswarm.train.tokenizer import TOKENIZER_FILE, eos_id, save_for_transformers

RUN_FILE = "gridswarm.json"


def _quiet_transformers() -> None:
    """No tqdm bars from save_pretrained/from_pretrained in the CLI's and the demo's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def gpt_to_hf(model: GPT, cfg: RunConfig, eos: int | None) -> torch.nn.Module:
    """The built-in GPT as a transformers `GPT2LMHeadModel` computing the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=model.wte.num_embeddings,
        n_positions=model.block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_inner=4 * m.n_embd,
        activation_function="gelu",  # nn.GELU() is exact GELU, not GPT-2's tanh approximation
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    ours = model.state_dict()
    state = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours["wpe.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
    }
    # GPT-2 stores its linear layers as Conv1D: (in, out), the transpose of nn.Linear's weight
    names = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
    names |= {"mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
    for i in range(m.n_layer):
        for src, dst in names.items():
            weight, bias = ours[f"blocks.{i}.{src}.weight"], ours[f"blocks.{i}.{src}.bias"]
            linear = not src.startswith("ln")
            state[f"transformer.h.{i}.{dst}.weight"] = weight.t().contiguous() if linear else weight
            state[f"transformer.h.{i}.{dst}.bias"] = bias
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GPT -> GPT-2 mapping is incomplete: {missing} {unexpected}")
    hf.tie_weights()
    return hf


def export_theta(
    cfg: RunConfig, theta: torch.Tensor, out: Path, info: dict, tokenizer: Tokenizer
) -> Path:
    """Write weights `theta` of the run's model and its `tokenizer` into folder `out`."""
    _quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size()
    model = build_model(cfg.model, cfg.train.seq_len, cfg.seed, vocab_size)
    assign_flat(model, theta)
    hf = model.hf if isinstance(model, HFCausalLM) else gpt_to_hf(model, cfg, eos_id(tokenizer))
    hf.save_pretrained(out)
    save_for_transformers(tokenizer, out)
    (out / RUN_FILE).write_text(
        json.dumps({"config": cfg.model_dump(mode="json"), **info}, indent=2)
    )
    return out


def export_run(client, status: dict, out: Path) -> Path:
    """Download the newest version of a run (by its status dict) and its tokenizer; export."""
    from gridswarm.protocol import API

    cfg = RunConfig.model_validate(status["config"])
    versions = client.request(
        "GET", f"{API}/runs/{status['id']}/versions/latest", signed=False
    ).json()
    theta = unpack_vector(client.blob(versions["weights_blob"]))
    tokenizer = dataset_tokenizer(cfg.data.dataset, client.blob)
    info = {"run_id": status["id"], "version": versions["number"], "val_loss": versions["val_loss"]}
    return export_theta(cfg, theta, out, info, tokenizer)


@dataclass(frozen=True)
class Exported:
    model: HFCausalLM
    cfg: RunConfig
    tokenizer: Tokenizer


def load_exported(folder: Path) -> Exported:
    """The model and tokenizer saved in `folder` by `export_theta`, ready for inference."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    info = json.loads((folder / RUN_FILE).read_text())
    hf = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    return Exported(HFCausalLM(hf), RunConfig.model_validate(info["config"]), tokenizer)


def sample_text(folder: Path, prompt: str, tokens: int, temperature: float, seed: int) -> str:
    """`tokens` new tokens after `prompt`, with the run's own tokenizer."""
    exported = load_exported(folder)
    torch.manual_seed(seed)
    idx = torch.tensor([exported.tokenizer.encode(prompt or "\n").ids or [0]])
    out = generate(exported.model, idx, tokens, exported.cfg.train.seq_len, temperature)
    return exported.tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
