"""The sponsor's side of starting a run from a model it has (`gridswarm run create RUN.toml
--init-from DIR`; the hub's side and its checks: hub/weights.py).

DIR is a Hugging Face model folder (`config.json` + `*.safetensors`, maybe a `tokenizer.json`),
or a folder `gridswarm run export` wrote. Nothing is downloaded. Here, on the sponsor's machine:

1. the run's model is set from DIR's `config.json`: `model.kind = "hf"`, `architecture` = its
   `model_type`, `hf_config` = its fields (bookkeeping fields and `vocab_size`, which a run
   takes from its dataset, left out; dropout probabilities set to 0, since the hub audits
   contributions by replaying them bit for bit). A gridswarm export of the built-in GPT (its
   `gridswarm.json` says `kind = "gpt"`) becomes the built-in GPT again. RUN.toml may leave
   `[model]` out; a field it names must agree with DIR (one line naming the first that does
   not);
2. the model is built exactly as a node builds it (`train/model.py` `build_model`, the run's
   seq_len, seed and dataset vocabulary), DIR's safetensors are loaded into it with strict
   checks (every parameter present, no unknown tensor, every shape equal, floating point and
   finite: one line naming the first that is not), and flattened into the hub's fp32 vector in
   the model's parameter order (`train/params.py`, the layout of a version blob);
3. a `tokenizer.json` in DIR is compared with the run's dataset's tokenizer: the same file
   (sha256), or else the same vocabulary (every token with the same id); at least the size
   when the dataset's tokenizer cannot be read here. What was checked is reported.

The CLI then pushes the vector (`POST /v1/weights`; above `PART_BYTES` offered in parts,
`POST /v1/weights/offer` and `/v1/weights/{sha256}/parts/{i}`, resumable) and creates the run
with `model.init_weights = "sha256:<hex>"`.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from gridswarm.blobs import sha256_hex
from gridswarm.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    is_dropout_field,
    parse_run_config,
)
from gridswarm.protocol import WeightsAck, WeightsOffer
from gridswarm.train.dataset import (
    MANIFEST_PREFIX,
    MAX_TOKENIZER_BYTES,
    DirSource,
    is_prepared,
    manifest_ref,
    parse_manifest,
)
from gridswarm.train.model import GPT, HFCausalLM, build_model
from gridswarm.train.params import flatten, pack_vector
from gridswarm.train.tokenizer import TOKENIZER_FILE, VOCAB_SIZE, byte_tokenizer

if TYPE_CHECKING:
    from gridswarm.node.client import HubClient

CONFIG_FILE = "config.json"
RUN_FILE = "gridswarm.json"  # written by `gridswarm run export` (export.py)
MAX_CONFIG_BYTES = 1 << 20  # a model's config.json (a few KiB in practice)
# config.json fields that are bookkeeping, not the architecture, or that a run sets itself
DROPPED_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
DROPPED_FIELDS |= {"vocab_size"}  # the run's dataset's (hub and nodes set it: train/model.py)
PART_BYTES = 64 << 20  # weights above this go in parts (the hub's upload limit: 256 MiB)
HF_PREFIX = "hf."  # HFCausalLM's parameter names: "hf." + the transformers model's


class InitFromError(ValueError):
    """DIR cannot start this run; the message names the first thing that does not fit."""


Fetch = Callable[[str], bytes]  # a blob by sha256 from the hub, checked (HubClient.blob)


@dataclass(frozen=True)
class InitFrom:
    """A run config whose model is DIR's, the model's weights as the hub's flat fp32 vector,
    and what was checked (one line each, for the sponsor)."""

    config: dict[str, Any]
    theta: torch.Tensor
    checked: list[str] = field(default_factory=list)

    def blob(self) -> bytes:
        """The bytes `POST /v1/weights` takes: one `theta` vector, no metadata."""
        return pack_vector(self.theta)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path` (at most MAX_CONFIG_BYTES)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InitFromError(f"{path}: {what} over {MAX_CONFIG_BYTES} bytes")
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InitFromError(f"{path.parent} has no {path.name}: not a model folder") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InitFromError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise InitFromError(f"{path}: {what} is not a JSON object")
    return data


def model_of_folder(folder: Path) -> dict[str, Any]:
    """The run's `[model]` for the model in `folder` (see the module docstring)."""
    hf = read_json(folder / CONFIG_FILE, "config.json")
    exported = folder / RUN_FILE
    if exported.is_file():
        config = read_json(exported, RUN_FILE).get("config")
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and model.get("kind") == "gpt":
            gpt = {k: model[k] for k in ("n_layer", "n_head", "n_embd") if k in model}
            return {"kind": "gpt", **gpt}
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InitFromError(f"{folder / CONFIG_FILE} names no model_type")
    fields = {k: v for k, v in hf.items() if k not in DROPPED_FIELDS and not k.startswith("_")}
    return {"kind": "hf", "architecture": model_type, "hf_config": without_dropout(fields)}


def without_dropout(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with every dropout probability 0: local training must replay bit for bit
    (train/local.py; the hub audits contributions by replaying them), and a checkpoint's
    config usually carries its pretraining dropout (GPT-2's 0.1)."""
    return {k: 0.0 if is_dropout_field(k, v) else v for k, v in fields.items()}


def merge_model(run: dict[str, Any], model: dict[str, Any], folder: Path) -> dict[str, Any]:
    """RUN.toml's settings with `model` as its `[model]`; InitFromError naming the first field
    RUN.toml's `[model]` sets otherwise (its extra hf_config fields are kept: the weights are
    checked against the model they build)."""
    given = run.get("model", {})
    if not isinstance(given, dict):
        raise InitFromError("RUN.toml's model must be a table")
    if "init_weights" in given:
        raise InitFromError("RUN.toml names model.init_weights: leave it out with --init-from")
    defaults = ModelConfig().model_dump()
    merged = dict(model)
    for key, value in given.items():
        if key == "hf_config" and isinstance(value, dict) and model["kind"] == "hf":
            fields = dict(model["hf_config"])
            for name, v in value.items():
                if name in fields and fields[name] != v:
                    raise InitFromError(
                        f"RUN.toml's model.hf_config.{name} = {v!r}, but {folder / CONFIG_FILE} "
                        f"says {fields[name]!r}: remove it or make it agree"
                    )
                fields[name] = v
            merged["hf_config"] = fields
            continue
        theirs = model.get(key, defaults.get(key))
        if theirs != value:
            raise InitFromError(
                f"RUN.toml's model.{key} = {value!r}, but {folder} holds a model with "
                f"{key} = {theirs!r}: remove [model] from RUN.toml or make it agree"
            )
    return {**run, "model": merged}


def dataset_vocab(cfg: RunConfig, fetch: Fetch | None) -> tuple[int | None, str]:
    """The vocabulary size the run's model gets from its dataset, as a node builds it (None
    when a pushed manifest cannot be read here), and how it was found."""
    dataset = cfg.data.dataset
    if not is_prepared(dataset):
        return VOCAB_SIZE, f"byte-level dataset {dataset!r}: vocabulary {VOCAB_SIZE}"
    try:
        digest = manifest_ref(dataset)
        if digest is None:
            vocab = DirSource(Path(dataset).expanduser()).manifest.vocab_size
        elif fetch is None:
            return None, f"{dataset}: no hub to read the manifest from"
        else:
            vocab = parse_manifest(fetch(digest)).vocab_size
    except Exception as exc:  # a manifest the hub does not serve yet (no run uses it), ...
        return None, f"{dataset}: manifest not readable here ({type(exc).__name__}: {exc})"[:300]
    return vocab, f"dataset {dataset}: vocabulary {vocab}"


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder` (a sharded checkpoint's too), by
    name; InitFromError on none, an unreadable file, or a name in two files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InitFromError(f"{folder} has no *.safetensors file (only safetensors is read)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InitFromError(f"{path}: not a safetensors file: {exc}") from exc
        for name, tensor in loaded.items():
            if name in tensors:
                raise InitFromError(f"{path}: tensor {name!r} is also in another file")
            tensors[name] = tensor
    return tensors


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy `tensors` into `model`'s parameters: every parameter present (tied ones once),
    every shape equal, floating point and finite, and no tensor the model lacks (its tied
    aliases and buffers excepted). InitFromError naming the first mismatch."""
    prefix = HF_PREFIX if isinstance(model, HFCausalLM) else ""
    params = {n.removeprefix(prefix): p for n, p in model.named_parameters()}
    state = {n.removeprefix(prefix): t for n, t in model.state_dict(keep_vars=True).items()}
    for name, p in params.items():
        if name not in tensors:
            raise InitFromError(
                f"{folder} has no tensor {name!r}, which the model built from its config has"
            )
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise InitFromError(
                f"tensor {name!r} has shape {tuple(t.shape)} in {folder}, the model built from "
                f"its config needs {tuple(p.shape)}"
            )
        if not t.is_floating_point():
            raise InitFromError(f"tensor {name!r} in {folder} is {t.dtype}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise InitFromError(f"tensor {name!r} in {folder} holds a value that is not finite")
    for name, t in tensors.items():
        if name not in state:
            raise InitFromError(
                f"{folder} has tensor {name!r}, which the model built from its config lacks"
            )
        if name not in params:  # a tied alias or a buffer: the same shape at least
            target = state[name]
            if tuple(t.shape) != tuple(target.shape):
                raise InitFromError(
                    f"tensor {name!r} has shape {tuple(t.shape)} in {folder}, the model built "
                    f"from its config needs {tuple(target.shape)}"
                )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(torch.float32))


def gpt_tensors(tensors: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """A gridswarm export of the built-in GPT (a GPT-2 folder, export.py `gpt_to_hf`) back in
    the built-in GPT's names and shapes (GPT-2's Conv1D weights transposed back); tensors that
    do not map keep their names, so the strict check names them."""
    out, rest = {}, dict(tensors)
    rest.pop("lm_head.weight", None)  # tied to the embedding
    for src, dst in (("wte", "wte"), ("wpe", "wpe"), ("ln_f", "ln_f")):
        for kind in ("weight", "bias"):
            name = f"transformer.{src}.{kind}"
            if name in rest:
                out[f"{dst}.{kind}"] = rest.pop(name)
    names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj"}
    names |= {"mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}
    for i in range(n_layer):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                name = f"transformer.h.{i}.{src}.{kind}"
                if name not in rest:
                    continue
                t = rest.pop(name)
                linear = kind == "weight" and not src.startswith("ln")
                out[f"blocks.{i}.{dst}.{kind}"] = t.t().contiguous() if linear else t
    return out | rest


def check_tokenizer(folder: Path, cfg: RunConfig, vocab: int | None, fetch: Fetch | None) -> str:
    """Compare DIR's tokenizer.json with the run's dataset's; what was checked, in words
    (InitFromError when they disagree)."""
    from tokenizers import Tokenizer

    from gridswarm.train.dataset import dataset_tokenizer

    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return f"{folder} has no {TOKENIZER_FILE}: tokenizer not checked"
    data = path.read_bytes()
    if len(data) > MAX_TOKENIZER_BYTES:
        raise InitFromError(f"{path}: over {MAX_TOKENIZER_BYTES} bytes")
    try:
        mine = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers library's errors are plain Exceptions
        raise InitFromError(f"{path}: not a tokenizer: {exc}"[:300]) from exc
    size = mine.get_vocab_size()
    if vocab is not None and size > vocab:
        raise InitFromError(
            f"{path} has {size} tokens, the run's dataset a vocabulary of {vocab}: "
            f"it is not the tokenizer the dataset was prepared with"
        )
    digest = manifest_ref(cfg.data.dataset)
    try:
        if cfg.data.dataset.startswith(MANIFEST_PREFIX) and fetch is not None and digest:
            theirs_sha = parse_manifest(fetch(digest)).tokenizer.sha256
            if theirs_sha == sha256_hex(data):
                return f"{TOKENIZER_FILE}: the dataset's own (sha256 {theirs_sha[:12]}…)"
        theirs = (
            byte_tokenizer()
            if not is_prepared(cfg.data.dataset)
            else dataset_tokenizer(cfg.data.dataset, fetch)
        )
    except Exception as exc:  # DatasetError, a hub that does not serve the manifest yet, ...
        if vocab is None:
            return f"{TOKENIZER_FILE}: {size} tokens; the dataset's tokenizer not readable here"
        return f"{TOKENIZER_FILE}: {size} tokens, within the dataset's {vocab} ({exc})"[:300]
    a, b = mine.get_vocab(with_added_tokens=True), theirs.get_vocab(with_added_tokens=True)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[0]
        raise InitFromError(
            f"{path} differs from the run's dataset's tokenizer ({len(a)} and {len(b)} tokens; "
            f"first difference: token {diff[0]!r} id {diff[1]})"
        )
    return f"{TOKENIZER_FILE}: the same vocabulary as the dataset's ({len(a)} tokens, same ids)"


def prepare_init(run_toml: Path, folder: Path, fetch: Fetch | None = None) -> InitFrom:
    """RUN.toml's settings with DIR's model, and DIR's weights as the run's flat vector (see
    the module docstring); `fetch` reads a `manifest:<sha256>` dataset's blobs from the hub."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise InitFromError(f"{folder} is not a folder")
    try:
        run = tomllib.loads(Path(run_toml).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{run_toml}: not valid TOML: {exc}") from exc
    model = model_of_folder(folder)
    settings = merge_model(run, model, folder)
    cfg = parse_run_config(settings)
    checked = []
    raw = read_json(folder / CONFIG_FILE, "config.json")
    zeroed = sorted(k for k, v in raw.items() if is_dropout_field(k, v))
    if model["kind"] == "hf" and zeroed:
        checked.append(f"dropout set to 0 (training must replay exactly): {', '.join(zeroed)}")
    vocab, how = dataset_vocab(cfg, fetch)
    known = vocab  # the dataset's own vocabulary, when it could be read here
    checked.append(how)
    hf_vocab = raw.get("vocab_size")
    if vocab is None:
        if not isinstance(hf_vocab, int) or isinstance(hf_vocab, bool) or hf_vocab <= 0:
            raise InitFromError(
                f"cannot tell the vocabulary of {cfg.data.dataset!r} here, and "
                f"{folder / CONFIG_FILE} names no vocab_size"
            )
        vocab = hf_vocab
        checked.append(f"model built with {CONFIG_FILE}'s vocab_size {vocab}: the hub checks it")
    elif hf_vocab is not None and hf_vocab != vocab:
        raise InitFromError(
            f"{folder / CONFIG_FILE} has vocab_size {hf_vocab}, the run's dataset "
            f"{cfg.data.dataset!r} a vocabulary of {vocab}"
        )
    positions = [cfg.model.hf_config.get(k) for k in ("n_positions", "max_position_embeddings")]
    positions = [p for p in positions if isinstance(p, int) and not isinstance(p, bool)]
    if model["kind"] == "hf" and positions and cfg.train.seq_len > positions[0]:
        raise InitFromError(
            f"train.seq_len {cfg.train.seq_len} exceeds the {positions[0]} positions of the "
            f"model in {folder}"
        )
    try:
        built = build_model(cfg.model, cfg.train.seq_len, cfg.seed, vocab)
    except ValueError as exc:
        raise InitFromError(f"{folder}: cannot build its model: {exc}"[:500]) from exc
    tensors = read_safetensors(folder)
    if isinstance(built, GPT):
        tensors = gpt_tensors(tensors, cfg.model.n_layer)
    load_strict(built, tensors, folder)
    theta = flatten(built)
    checked.append(
        f"{len(tensors)} tensors loaded strictly into {cfg.model.kind} "
        f"{cfg.model.architecture or ''} ({theta.numel():,} parameters)".replace("  ", " ")
    )
    checked.append(check_tokenizer(folder, cfg, known, fetch))
    return InitFrom(settings, theta, checked)


def push_weights(
    client: HubClient,
    blob: bytes,
    part_bytes: int = PART_BYTES,
    on_part: Callable[[int], None] = lambda size: None,
) -> WeightsAck:
    """Push weights (`InitFrom.blob()`): in one request up to `part_bytes`, else offered in
    parts of `part_bytes` and only the parts the hub lacks uploaded (`on_part(bytes)` after
    each), so a push that was cut off and run again resumes. The hub's refusals raise
    `HubRequestError`; InitFromError if the hub does not end with the whole."""
    if len(blob) <= part_bytes:
        return client.push_weights(blob)
    parts = [blob[i : i + part_bytes] for i in range(0, len(blob), part_bytes)]
    offer = WeightsOffer(
        sha256=sha256_hex(blob),
        bytes=len(blob),
        part_bytes=part_bytes,
        parts=[sha256_hex(p) for p in parts],
    )
    answer = client.offer_weights(offer)
    for index in answer.missing:
        client.upload_weights_part(offer.sha256, index, parts[index])
        on_part(len(parts[index]))
    final = client.offer_weights(offer)
    if final.ack is None:
        raise InitFromError(f"the hub still lacks {len(final.missing)} parts after the upload")
    return final.ack
