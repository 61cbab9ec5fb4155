"""Exporting a run's model to a folder, and loading it back to sample text.

Built-in GPT runs are written as `model.safetensors` + `gridswarm.json`; Hugging Face runs are
written with `save_pretrained`, so `AutoModelForCausalLM.from_pretrained(folder)` loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gridswarm.config import RunConfig
from gridswarm.train.model import GPT, HFCausalLM, build_model, generate
from gridswarm.train.params import assign_flat, named_tensors, unpack_vector
from gridswarm.train.tokenizer import decode, encode

RUN_FILE = "gridswarm.json"


def export_theta(cfg: RunConfig, theta: torch.Tensor, out: Path, info: dict) -> Path:
    """Write weights `theta` of a model built from `cfg` into folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model, cfg.train.seq_len, cfg.seed)
    assign_flat(model, theta)
    if isinstance(model, HFCausalLM):
        model.hf.save_pretrained(out)
    else:
        save_file(named_tensors(model, theta), out / "model.safetensors")
    (out / RUN_FILE).write_text(
        json.dumps({"config": cfg.model_dump(mode="json"), **info}, indent=2)
    )
    return out


def export_run(client, status: dict, out: Path) -> Path:
    """Download the newest version of a run (by its status dict) and export it."""
    from gridswarm.protocol import API

    cfg = RunConfig.model_validate(status["config"])
    versions = client.request(
        "GET", f"{API}/runs/{status['id']}/versions/latest", signed=False
    ).json()
    theta = unpack_vector(client.blob(versions["weights_blob"]))
    info = {"run_id": status["id"], "version": versions["number"], "val_loss": versions["val_loss"]}
    return export_theta(cfg, theta, out, info)


def load_exported(folder: Path) -> tuple[torch.nn.Module, RunConfig]:
    """The model saved in `folder` by `export_theta`, ready for inference."""
    info = json.loads((folder / RUN_FILE).read_text())
    cfg = RunConfig.model_validate(info["config"])
    if cfg.model.kind == "hf":
        from transformers import AutoModelForCausalLM

        return HFCausalLM(AutoModelForCausalLM.from_pretrained(folder)), cfg
    model = build_model(cfg.model, cfg.train.seq_len, cfg.seed)
    assert isinstance(model, GPT)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    return model, cfg


def sample_text(folder: Path, prompt: str, tokens: int, temperature: float, seed: int) -> str:
    model, cfg = load_exported(folder)
    torch.manual_seed(seed)
    idx = encode(prompt or "\n").long()[None, :]
    out = generate(model, idx, tokens, cfg.train.seq_len, temperature)
    return decode(out[0])
