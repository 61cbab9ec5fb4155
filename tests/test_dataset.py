"""Prepared datasets (train/dataset.py) and the Hugging Face export: prepare real files with HF
`datasets` + `tokenizers`, train on the shards, export, load with transformers."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gridswarm.blobs import LocalBlobStore
from gridswarm.cli import app
from gridswarm.config import parse_run_config
from gridswarm.export import export_theta, load_exported, sample_text
from gridswarm.train.dataset import (
    BlobSource,
    DatasetError,
    dataset_tokenizer,
    import_dataset,
    prepare,
    verify_folder,
)
from gridswarm.train.outer import nesterov_step
from gridswarm.train.tokenizer import byte_tokenizer, encode
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run

SHAKESPEARE = Path(__file__).resolve().parent.parent / "src/gridswarm/data/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "shakespeare"
    prepare([SHAKESPEARE], "bpe:512", out, shard_tokens=65_536, show_progress=False)
    return out


def test_byte_tokenizer_is_the_builtin_byte_mapping():
    text = "ROMEO: héllo wörld 🙂\n\n  x"
    tok = byte_tokenizer()
    assert tok.encode(text).ids == encode(text).tolist() == list(text.encode())
    assert tok.decode(list(text.encode())) == text
    assert tok.get_vocab_size() == 256


def test_prepared_tinyshakespeare_bpe_trains_exports_and_generates(shakespeare_bpe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = verify_folder(shakespeare_bpe)  # every shard and the tokenizer match the manifest
    manifest = source.manifest
    assert manifest.vocab_size == 512 and manifest.dtype == "uint16"
    assert manifest.tokenizer.kind == "bpe" and manifest.tokenizer.eos_id == 0
    assert len(manifest.train) > 2 and len(manifest.val) == 1
    assert all(s.tokens == 65_536 for s in manifest.train[:-1])
    ratio = SHAKESPEARE.stat().st_size / (manifest.tokens_train + manifest.tokens_val)
    assert ratio > 1.8  # BPE merges: well under one token per byte

    cfg = parse_run_config(tiny_run(data={"dataset": str(shakespeare_bpe)}))
    w = Workload.from_config(cfg)
    assert w.vocab_size == 512 and w.model.wte.num_embeddings == 512
    theta, momentum = w.initial_theta(), None
    start = w.evaluate(theta)
    for r in range(3):  # a small DiLoCo run: two nodes, outer Nesterov
        grads = [w.train(theta, r, f"n{i}", 15).pseudo_gradient for i in range(2)]
        step = nesterov_step(torch.stack(grads).mean(0), momentum, 0.7, 0.9)
        theta, momentum = theta - step.update, step.momentum
    end = w.evaluate(theta)
    assert end < start - 0.5

    tokenizer = dataset_tokenizer(cfg.data.dataset)  # read from the folder
    export_theta(cfg, theta, tmp_path, {"version": 3}, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok("ROMEO: my lord", return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode("ROMEO: my lord").ids
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, w.model(ids), atol=1e-5)
    out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 8
    assert hf_tok.decode(out[0]).startswith("ROMEO: my lord")
    assert sample_text(tmp_path, "ROMEO:", 10, 0.8, seed=0).startswith("ROMEO:")


def test_slices_fetch_only_their_shards_and_replay_bit_for_bit(shakespeare_bpe, tmp_path):
    hub_store = LocalBlobStore(tmp_path / "hub")
    manifest, digest = import_dataset(shakespeare_bpe, hub_store)
    fetched: list[str] = []

    def fetch(d: str) -> bytes:
        fetched.append(d)
        return hub_store.get(d)

    cfg = parse_run_config(tiny_run(data={"dataset": f"manifest:{digest}", "slice_shards": 1}))
    node = Workload.from_config(cfg, source=BlobSource(LocalBlobStore(tmp_path / "n"), fetch))
    hub = Workload.from_config(cfg, source=BlobSource(hub_store))
    theta = hub.initial_theta()
    first = node.train(theta, 2, "node-a", 5)
    assert fetched[0] == digest and len(fetched) == 2  # the manifest, then one train shard
    assert fetched[1] in {s.sha256 for s in manifest.train}
    replay = hub.train(theta.clone(), 2, "node-a", 5)
    assert torch.equal(first.pseudo_gradient, replay.pseudo_gradient)
    again = node.train(theta.clone(), 2, "node-a", 5)  # cached now: nothing more fetched
    assert torch.equal(first.pseudo_gradient, again.pseudo_gradient) and len(fetched) == 2

    corrupt = tmp_path / "n" / fetched[1][:2] / fetched[1][2:4] / fetched[1]
    corrupt.chmod(0o644)
    data = bytearray(corrupt.read_bytes())
    data[0] ^= 1
    corrupt.write_bytes(bytes(data))
    fresh = Workload.from_config(cfg, source=BlobSource(LocalBlobStore(tmp_path / "n"), fetch))
    with pytest.raises(DatasetError, match="corrupt"):
        fresh.train(theta, 2, "node-a", 5)


def test_jsonl_gz_and_parquet_sources_with_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document " * 20, "zweites Dokument – ü " * 20, "third " * 30]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[:1]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": docs[1], "other": 1}) + "\n")
    pq.write_table(pa.table({"body": docs[2:]}), tmp_path / "c.parquet")
    out = tmp_path / "out"
    manifest, _ = prepare(
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet"],
        "bytes",
        out,
        text_field="body",
        shard_tokens=300,
        show_progress=False,
    )
    flat = np.concatenate(
        [np.fromfile(out / s.file, dtype=np.uint16) for s in manifest.train + manifest.val]
    )
    assert bytes(flat.astype(np.uint8)) == "".join(d + "\n\n" for d in docs).encode()
    assert manifest.vocab_size == 256 and manifest.sources == ["a.jsonl", "b.jsonl.gz", "c.parquet"]

    shard = out / manifest.train[0].file
    shard.write_bytes(b"\x00" + shard.read_bytes()[1:])
    with pytest.raises(DatasetError, match="does not match its sha256"):
        verify_folder(out)


def test_a_given_large_tokenizer_writes_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    words = [f"w{(i * 7919) % 70_000}" for i in range(500)]
    (tmp_path / "a.txt").write_text(" ".join(words))
    out = tmp_path / "out"
    manifest, _ = prepare(
        [tmp_path / "a.txt"], str(tmp_path / "tokenizer.json"), out, show_progress=False
    )
    assert manifest.dtype == "uint32" and manifest.tokenizer.kind == "file"
    assert manifest.vocab_size == 70_000 and manifest.tokenizer.eos_id is None
    ids = np.concatenate([np.fromfile(out / s.file, dtype=np.uint32) for s in manifest.shards()])
    assert ids.tolist() == [vocab[w] for w in words]
    assert verify_folder(out).manifest == manifest


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: [str(p / "missing.txt")], "no such file"),
        (lambda p: [str(p / "x.csv")], "unknown extension"),
        (lambda p: [str(p / "empty.txt")], "empty corpus"),
        (lambda p: [str(p / "a.txt"), "--tokenizer", "bpe:100"], "outside 257"),
        (lambda p: [str(p / "a.txt"), "--tokenizer", "bpe:many"], "bpe:many"),
        (lambda p: [str(p / "rows.jsonl")], "no string field 'text'"),
        (lambda p: [str(p / "a.txt"), "--tokenizer", str(p / "x.csv")], "not a tokenizers"),
    ],
)
def test_prepare_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, make_args, message):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "rows.jsonl").write_text('{"content": "no text field"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "prepare", *make_args(tmp_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # rich wraps at the test terminal's width
    assert said.startswith("error:") and message in said and "Traceback" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no temporary folder


def test_byte_level_gpt_exports_to_transformers_and_samples(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = parse_run_config(tiny_run())
    w = Workload.from_config(cfg)
    theta = w.initial_theta()
    theta = theta - w.train(theta, 0, "n", 10).pseudo_gradient
    export_theta(cfg, theta, tmp_path, {"version": 1}, dataset_tokenizer(cfg.data.dataset))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("ROMEO: ü", return_tensors="pt").input_ids
    assert ids[0].tolist() == list("ROMEO: ü".encode())
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, w.model(ids), atol=1e-5)
    exported = load_exported(tmp_path)
    assert exported.tokenizer.get_vocab_size() == 256
    assert sample_text(tmp_path, "ROMEO:", 20, 0.8, seed=0).startswith("ROMEO:")


@pytest.mark.slow
def test_live_run_on_a_prepared_dataset(make_swarm, shakespeare_bpe, tmp_path):
    """The hub process imports the folder, nodes fetch only their shards over HTTP, each newcomer
    contribution is replayed bit for bit by the hub's audit, and the export loads in
    transformers with the run's tokenizer."""
    import httpx
    from sqlalchemy import select
    from sqlalchemy.orm import Session
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gridswarm.export import export_run
    from gridswarm.hub import models as m
    from gridswarm.hub.server import make_engine
    from gridswarm.hub.service import HubError, HubService
    from gridswarm.identity import Identity
    from gridswarm.node.client import HubClient, HubRequestError
    from tests.conftest import wait_for

    swarm = make_swarm()
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    tampered = tmp_path / "tampered"
    shutil.copytree(shakespeare_bpe, tampered)
    shard = tampered / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[::-1])
    with pytest.raises(HubRequestError, match="does not match its sha256"):
        sponsor.create_run(tiny_run(data={"dataset": str(tampered)}))
    assert not any(p.is_file() for p in (swarm.workdir / "blobs").rglob("*"))  # stored nothing
    for dataset, why in ((f"manifest:{'0' * 64}", "not in the blob store"), ("manifest:x", "sha")):
        with pytest.raises(HubRequestError, match=why):
            sponsor.create_run(tiny_run(data={"dataset": dataset}))

    config = tiny_run(
        data={"dataset": str(shakespeare_bpe), "slice_shards": 1},
        train={"seq_len": 32, "batch_size": 8, "inner_steps": 20, "min_inner_steps": 10},
        round={"deadline_s": 60, "quorum": 1, "min_nodes": 1},
        budget={"rounds": 2},
    )
    run_id = sponsor.create_run(config).run_id
    swarm.start_node("n0", run_id)
    status = wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s, 120, "the run"
    )
    source = verify_folder(shakespeare_bpe)
    assert status["config"]["data"]["dataset"] == f"manifest:{source.manifest_digest}"
    assert [n["contributions"] for n in status["nodes"]] == [2]
    with Session(make_engine(swarm.db_url)) as s:
        contributions = s.scalars(select(m.Contribution)).all()
    steps = [c.steps for c in contributions]
    # the outer Nesterov step may overshoot in round 2 of a one-node run: the best version counts
    assert min(status["val_loss"][1:]) < status["val_loss"][0] - 0.3, (status["val_loss"], steps)
    audited = [c for c in contributions if c.audited]  # newcomers: every one is replayed
    assert len(audited) == 2 and all(c.audit_passed for c in audited)

    shards = {s.sha256 for s in source.manifest.shards()}
    # of the dataset, the node holds the manifest and one shard per round (slice_shards = 1)
    cached = {p.name for p in (swarm.workdir / "n0" / "blobs").rglob("*") if p.is_file()}
    assert source.manifest_digest in cached
    assert 1 <= len(cached & shards) <= 2 < len(shards)

    out = export_run(sponsor, status, tmp_path / "model")
    hf, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok("KING:", return_tensors="pt").input_ids
    generated = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == ids.shape[1] + 5

    val_shard = source.manifest.val[0].sha256
    served = httpx.get(f"{swarm.url}/v1/blobs/{val_shard}").content
    assert served == source.path(val_shard).read_bytes()
    swarm.stop()  # a fresh hub (as after a restart) rebuilds what it serves from its runs
    fresh = HubService(make_engine(swarm.db_url), LocalBlobStore(swarm.workdir / "blobs"))
    assert fresh.downloads.span(val_shard, None, None).path.read_bytes() == served
    with pytest.raises(HubError, match="not a published"):
        fresh.downloads.span("0" * 64, None, None)
