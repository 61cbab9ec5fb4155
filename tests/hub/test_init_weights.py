"""A run that starts from a model the sponsor has (hub/weights.py, gridswarm/initfrom.py): a
folder `run export` wrote is turned into the hub's flat vector, pushed (`POST /v1/weights`) and
named by `model.init_weights`; version 0 is then that model (same vector, same held-out loss)
and one round lowers its loss. Every refusal (wrong length, non-finite, unpushed, another
blob's digest, another sponsor's, oversize, not a sponsor, quota, hub cap) stores neither a row
nor a blob. In process: the real app on SQLite, real signatures."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from gridswarm.blobs import sha256_hex
from gridswarm.config import parse_run_config
from gridswarm.export import RUN_FILE, export_theta
from gridswarm.hub.service import HubSettings
from gridswarm.identity import HEADER_KEY, Identity
from gridswarm.initfrom import InitFrom, InitFromError, prepare_init, push_weights
from gridswarm.protocol import API, Refusal, WeightsAck, WeightsOffer, WeightsOfferResponse
from gridswarm.train.dataset import dataset_tokenizer
from gridswarm.train.params import flatten, pack, pack_vector, unpack_vector
from tests.conftest import tiny_run
from tests.hub.harness import Hub, contribution, train_round

SHAKESPEARE = Path(__file__).resolve().parents[2] / "src/gridswarm/data/tinyshakespeare.txt"
TRAIN = {"seq_len": 32, "batch_size": 4, "inner_steps": 4, "min_inner_steps": 2}
ROUND = {"deadline_s": 60, "quorum": 1, "min_nodes": 1}


def run_settings(**overrides: object) -> dict:
    return tiny_run(**{"train": TRAIN, "round": ROUND, "budget": {"rounds": 3}, **overrides})


def init_settings(**overrides: object) -> dict:
    """RUN.toml for `--init-from`: no [model] (the folder's)."""
    settings = run_settings(**overrides)
    del settings["model"]
    return settings


def write_toml(path: Path, settings: dict) -> Path:
    """`settings` (tables of scalars and inline tables) as TOML; JSON scalars are TOML's."""

    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for section, fields in settings.items():
        if isinstance(fields, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def new_hub(root: Path, settings: HubSettings | None = None, **app_options: object) -> Hub:
    root.mkdir(parents=True)
    return Hub(root, settings, **app_options)


def refused(r, status: int, reason: Refusal) -> None:
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason.value, r.text


def state(hub: Hub) -> tuple[dict, int]:
    return hub.snapshot(), hub.blob_bytes()


def version(hub: Hub, run_id: str) -> tuple[torch.Tensor, float]:
    latest = hub.get(f"{API}/runs/{run_id}/versions/latest").json()
    return unpack_vector(hub.service.blobs.get(latest["weights_blob"])), latest["val_loss"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, float]:
    """A built-in GPT run trained one round, its version 1 exported (`run export`'s folder),
    that version's vector and held-out loss."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("source")
    hub = new_hub(root / "hub")
    sponsor = Identity.generate()
    run_id = hub.create_run(sponsor, run_settings())
    assert train_round(hub, run_id)["version"] == 1
    theta, loss = version(hub, run_id)
    cfg = parse_run_config(hub.get(f"{API}/runs/{run_id}").json()["config"])
    out = root / "model"
    export_theta(cfg, theta, out, {"run_id": run_id}, dataset_tokenizer(cfg.data.dataset))
    return out, theta, loss


def hf_folder(exported_folder: Path, tmp_path: Path) -> Path:
    """The export as any Hugging Face folder: without gridswarm's own `gridswarm.json`."""
    folder = tmp_path / "hf"
    shutil.copytree(exported_folder, folder)
    (folder / RUN_FILE).unlink()
    return folder


def push(hub: Hub, who: Identity, blob: bytes) -> dict:
    r = hub.post(who, f"{API}/weights", blob)
    assert r.status_code == 200, r.text
    return r.json()


def create_from(hub: Hub, who: Identity, init: InitFrom, weights: str):
    config = {**init.config, "model": {**init.config["model"], "init_weights": weights}}
    return hub.post(who, f"{API}/runs", {"config": config})


def test_a_hugging_face_folder_starts_the_run_at_its_weights_and_a_round_lowers_the_loss(
    exported, tmp_path
):
    from transformers import AutoModelForCausalLM

    source, _, source_loss = exported
    folder = hf_folder(source, tmp_path)
    init = prepare_init(write_toml(tmp_path / "run.toml", init_settings(seed=8)), folder)
    model = init.config["model"]
    assert model["kind"] == "hf" and model["architecture"] == "gpt2"
    assert "vocab_size" not in model["hf_config"] and model["hf_config"]["n_layer"] == 1
    assert any("same vocabulary" in line for line in init.checked), init.checked
    expected = flatten(AutoModelForCausalLM.from_pretrained(folder))
    assert torch.equal(init.theta, expected)

    hub = new_hub(tmp_path / "hub")
    sponsor = Identity.generate()
    ack = push(hub, sponsor, init.blob())
    assert ack["weights"] == f"sha256:{sha256_hex(init.blob())}"
    assert ack["numel"] == expected.numel()
    r = create_from(hub, sponsor, init, ack["weights"])
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    theta0, loss0 = version(hub, run_id)
    assert torch.equal(theta0, expected)  # version 0 is the folder's model, bit for bit
    assert loss0 == pytest.approx(source_loss, rel=1e-4)  # GPT-2 computes the GPT's logits
    status = train_round(hub, run_id)
    assert status["version"] == 1
    assert version(hub, run_id)[1] < loss0


def test_a_gridswarm_export_of_the_builtin_gpt_is_the_builtin_gpt_again(exported, tmp_path):
    source, theta, source_loss = exported
    # RUN.toml's [model] may name the model, when it agrees with the folder
    init = prepare_init(write_toml(tmp_path / "run.toml", run_settings(seed=9)), source)
    assert init.config["model"] == {"kind": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32}
    assert torch.equal(init.theta, theta)  # the source run's version 1, bit for bit
    hub = new_hub(tmp_path / "hub")
    sponsor = Identity.generate()
    weights = push(hub, sponsor, init.blob())["weights"]
    again = push(hub, sponsor, init.blob())  # the same bytes again: free, the same name
    assert again["weights"] == weights
    r = create_from(hub, sponsor, init, weights)
    assert r.status_code == 200, r.text
    theta0, loss0 = version(hub, r.json()["run_id"])
    assert torch.equal(theta0, theta)
    assert loss0 == pytest.approx(source_loss, rel=1e-6)


def test_create_run_refuses_weights_it_must_not_use(exported, tmp_path):
    source, theta, _ = exported
    init = prepare_init(write_toml(tmp_path / "run.toml", init_settings()), source)
    hub = new_hub(tmp_path / "hub")
    sponsor, other = Identity.generate(), Identity.generate()
    short = push(hub, sponsor, pack_vector(theta[:-1]))["weights"]
    theirs = push(hub, other, init.blob())["weights"]
    # a contribution blob the hub holds (a node's upload to a plain run)
    run_id = hub.create_run(sponsor, run_settings())
    node = Identity.generate()
    hub.register(node)
    a = hub.assignment(node, run_id)
    body = contribution(a, hub.numel(run_id), 32 * 4)
    assert hub.post(node, f"{API}/runs/{run_id}/contributions", body).status_code == 200
    contribution_digest = sha256_hex(body)
    assert hub.service.blobs.has(contribution_digest)
    before = state(hub)
    for weights in (
        short,  # pushed, but one value short of the model
        f"sha256:{contribution_digest}",  # a blob the hub holds that is no pushed weights
        f"sha256:{'ab' * 32}",  # nothing at all
        theirs,  # another sponsor's push
    ):
        refused(create_from(hub, sponsor, init, weights), 422, Refusal.INVALID_CONFIG)
        assert state(hub) == before, weights
    bad = create_from(hub, sponsor, init, "sha256:XYZ")
    refused(bad, 422, Refusal.INVALID_CONFIG)  # the pattern
    assert state(hub) == before


def test_malformed_weights_are_refused_and_nothing_is_stored(tmp_path):
    hub = new_hub(tmp_path / "hub")
    sponsor = Identity.generate()
    before = state(hub)
    theta = torch.randn(100)
    nan = theta.clone()
    nan[17] = float("nan")
    for body in (
        pack_vector(nan),
        pack({"theta": theta, "more": theta.clone()}),
        pack({"weights": theta}),
        pack({"theta": theta.to(torch.float16)}),
        pack({"theta": theta.view(10, 10)}),
        pack({"theta": torch.zeros(0)}),
        b"not safetensors",
        pack_vector(theta)[:-4],
    ):
        r = hub.post(sponsor, f"{API}/weights", body)
        refused(r, 422, Refusal.MALFORMED)
        assert state(hub) == before
    r = hub.post(sponsor, f"{API}/weights", pack_vector(nan))
    assert "not finite (at index 17)" in r.json()["detail"]


def test_size_sponsor_quota_and_cap_refuse_before_anything_is_stored(tmp_path):
    blob = pack_vector(torch.randn(1000))
    sponsor = Identity.generate()
    hub = new_hub(tmp_path / "small", max_upload_bytes=len(blob) - 1)
    before = state(hub)
    refused(hub.post(sponsor, f"{API}/weights", blob), 413, Refusal.TOO_LARGE)
    assert state(hub) == before

    listed = HubSettings(sponsors=frozenset({sponsor.public_key.hex()}))
    hub = new_hub(tmp_path / "listed", listed)
    before = state(hub)
    refused(hub.post(Identity.generate(), f"{API}/weights", blob), 403, Refusal.NOT_SPONSOR)
    refused(hub.http.post(f"{API}/weights", content=blob), 401, Refusal.UNAUTHENTICATED)
    assert state(hub) == before
    push(hub, sponsor, blob)

    quota = HubSettings(max_dataset_bytes_per_identity=len(blob) + 10, max_dataset_bytes=1 << 30)
    hub = new_hub(tmp_path / "quota", quota)
    push(hub, sponsor, blob)
    before = state(hub)
    other_blob = pack_vector(torch.randn(1000))
    refused(hub.post(sponsor, f"{API}/weights", other_blob), 429, Refusal.QUOTA)
    # decided from Content-Length and the key the headers name, before the body is read (and
    # so before its signature could be checked: this one has none)
    unsigned = {HEADER_KEY: sponsor.public_key.hex()}
    r = hub.http.post(f"{API}/weights", content=other_blob, headers=unsigned)
    refused(r, 429, Refusal.QUOTA)
    assert state(hub) == before
    push(hub, Identity.generate(), other_blob)  # another identity's own quota

    cap = dataclasses.replace(quota, max_dataset_bytes=2 * len(blob) + 10)
    hub = new_hub(tmp_path / "cap", cap)
    push(hub, Identity.generate(), blob)
    push(hub, Identity.generate(), other_blob)
    before = state(hub)
    third = pack_vector(torch.randn(1000))
    refused(hub.post(Identity.generate(), f"{API}/weights", third), 413, Refusal.STORAGE_FULL)
    refused(hub.http.post(f"{API}/weights", content=third), 413, Refusal.STORAGE_FULL)  # unread
    assert state(hub) == before


def test_the_cli_side_names_the_first_mismatch(exported, tmp_path):
    source, _, _ = exported
    folder = hf_folder(source, tmp_path)
    toml = tmp_path / "run.toml"

    def fails(settings: dict, where: Path, words: str) -> None:
        with pytest.raises(InitFromError, match=words):
            prepare_init(write_toml(toml, settings), where)

    fails(run_settings(model={"kind": "hf", "architecture": "llama"}), folder, "architecture")
    fails(run_settings(model={"kind": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32}), folder,
          "model.kind")  # fmt: skip
    with_toml_model = init_settings()
    with_toml_model["model"] = {"kind": "hf", "architecture": "gpt2", "hf_config": {"n_embd": 64}}
    fails(with_toml_model, folder, "hf_config.n_embd")
    fails(init_settings(train={**TRAIN, "seq_len": 64}), folder, "seq_len 64 exceeds the 32")

    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = "transformer.h.0.mlp.c_fc.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    fails(init_settings(), folder, f"no tensor '{name}'")
    save_file({**tensors, name: torch.zeros(7)}, weights)
    fails(init_settings(), folder, f"'{name}' has shape \\(7,\\)")
    save_file({**tensors, "extra.weight": torch.zeros(2)}, weights)
    fails(init_settings(), folder, "tensor 'extra.weight'")
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][3] = float("inf")
    save_file(bad, weights)
    fails(init_settings(), folder, f"'{name}' .* not finite")
    save_file(tensors, weights)
    (folder / "tokenizer.json").write_text(
        (folder / "tokenizer.json").read_text().replace('"a":', '"a_":', 1)
    )
    fails(init_settings(), folder, "differs from the run's dataset's tokenizer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": 300}))
    fails(init_settings(), folder, "has vocab_size 300, the run's dataset 'tinyshakespeare'")


def test_the_route_is_in_the_openapi_document_and_the_migration_downgrades(tmp_path):
    doc = new_hub(tmp_path / "hub").get("/openapi.json").json()
    op = doc["paths"][f"{API}/weights"]["post"]
    assert "application/octet-stream" in op["requestBody"]["content"]
    assert {"401", "403", "413", "422", "429"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/WeightsAck"
    )
    offer_op = doc["paths"][f"{API}/weights/offer"]["post"]
    schema = offer_op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/WeightsOffer")
    assert "WeightsOffer" in doc["components"]["schemas"]
    part_op = doc["paths"][f"{API}/weights/{{sha256}}/parts/{{index}}"]["post"]
    assert "application/octet-stream" in part_op["requestBody"]["content"]
    for each in (offer_op, part_op):
        assert {"401", "403", "404", "413", "422", "429"} <= set(each["responses"])

    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    from gridswarm.db import Base
    from gridswarm.hub.server import alembic

    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    alembic(engine, "upgrade", "head")
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "pushed_weights" in repr(d)] == []
    alembic(engine, "downgrade", "0010_datasets")
    assert "pushed_weights" not in inspect(engine).get_table_names()


def test_a_pushed_dataset_is_checked_through_the_hub_when_it_serves_its_manifest(
    exported, tmp_path
):
    from gridswarm.blobs import BlobError
    from gridswarm.train.dataset import MANIFEST, TOKENIZER_FILE, parse_manifest, prepare

    text = tmp_path / "small.txt"
    text.write_bytes(SHAKESPEARE.read_bytes()[:20_000])
    prepared = tmp_path / "ds"
    _, digest = prepare([text], "bytes", prepared, shard_tokens=4096, show_progress=False)
    manifest = parse_manifest((prepared / MANIFEST).read_bytes())
    files = {digest: prepared / MANIFEST, manifest.tokenizer.sha256: prepared / TOKENIZER_FILE}
    folder = hf_folder(exported[0], tmp_path)
    shutil.copy(prepared / TOKENIZER_FILE, folder / TOKENIZER_FILE)  # the dataset's own file
    toml = write_toml(tmp_path / "run.toml", init_settings(data={"dataset": f"manifest:{digest}"}))

    init = prepare_init(toml, folder, lambda d: files[d].read_bytes())
    assert f"dataset manifest:{digest}: vocabulary 256" in init.checked
    assert any("the dataset's own (sha256" in line for line in init.checked), init.checked

    def not_served(d: str) -> bytes:  # no run uses the pushed dataset yet: 404
        raise BlobError(f"blob {d}: the hub answered 404")

    init = prepare_init(toml, folder, not_served)
    assert any("manifest not readable here" in line for line in init.checked), init.checked
    assert any("vocab_size 256: the hub checks it" in line for line in init.checked)
    assert any("256 tokens; the dataset's tokenizer not readable" in x for x in init.checked)


class InProcessClient:
    """`HubClient`'s weights calls over the in-process hub (for `initfrom.push_weights`)."""

    def __init__(self, hub: Hub, who: Identity) -> None:
        self.hub, self.who, self.parts_sent = hub, who, []

    def push_weights(self, data: bytes) -> WeightsAck:
        return WeightsAck.model_validate(push(self.hub, self.who, data))

    def offer_weights(self, offer: WeightsOffer) -> WeightsOfferResponse:
        r = self.hub.post(self.who, f"{API}/weights/offer", offer.model_dump_json())
        assert r.status_code == 200, r.text
        return WeightsOfferResponse.model_validate(r.json())

    def upload_weights_part(self, sha256: str, index: int, data: bytes) -> None:
        r = self.hub.post(self.who, f"{API}/weights/{sha256}/parts/{index}", data)
        assert r.status_code == 200, r.text
        self.parts_sent.append(index)


def offer_of(blob: bytes, part_bytes: int) -> WeightsOffer:
    parts = [blob[i : i + part_bytes] for i in range(0, len(blob), part_bytes)]
    return WeightsOffer(
        sha256=sha256_hex(blob),
        bytes=len(blob),
        part_bytes=part_bytes,
        parts=[sha256_hex(p) for p in parts],
    )


def test_weights_in_parts_resume_and_start_a_run(exported, tmp_path):
    source, theta, _ = exported
    init = prepare_init(write_toml(tmp_path / "run.toml", init_settings()), source)
    blob = init.blob()
    part = len(blob) // 3 + 1  # three parts, the last one shorter
    hub = new_hub(tmp_path / "hub")
    sponsor = Identity.generate()
    client = InProcessClient(hub, sponsor)
    offer = offer_of(blob, part)
    first = client.offer_weights(offer)
    assert first.missing == [0, 1, 2] and first.ack is None
    client.upload_weights_part(offer.sha256, 1, blob[part : 2 * part])  # then cut off
    r = create_from(hub, sponsor, init, first.weights)  # not all parts in: not usable yet
    refused(r, 422, Refusal.INVALID_CONFIG)
    client.parts_sent.clear()
    ack = push_weights(client, blob, part_bytes=part)  # run again: resumes
    assert client.parts_sent == [0, 2]
    assert ack.weights == f"sha256:{sha256_hex(blob)}" and ack.numel == theta.numel()
    assert not hub.service.blobs.has(offer.sha256)  # kept as its parts
    r = create_from(hub, sponsor, init, ack.weights)
    assert r.status_code == 200, r.text
    assert torch.equal(version(hub, r.json()["run_id"])[0], theta)
    with hub.service.sessions() as s:
        from gridswarm.hub.store.datasets import offered_bytes

        assert offered_bytes(s, sponsor.public_key.hex()) == (len(blob), len(blob))  # once
    assert push_weights(client, blob, part_bytes=part) == ack  # again: nothing moves
    assert client.parts_sent == [0, 2]


def test_parts_are_checked_against_the_offer(exported, tmp_path):
    theta = exported[1]
    blob = pack_vector(theta)
    part = len(blob) // 2 + 1
    offer = offer_of(blob, part)
    hub = new_hub(tmp_path / "hub", max_upload_bytes=part + 10)
    sponsor, other = Identity.generate(), Identity.generate()
    before = state(hub)
    path = f"{API}/weights/{offer.sha256}/parts/0"
    refused(hub.post(sponsor, path, blob[:part]), 404, Refusal.NOT_FOUND)  # nobody offered
    big = offer_of(blob, part + 11)
    refused(
        hub.post(sponsor, f"{API}/weights/offer", big.model_dump_json()), 413, Refusal.TOO_LARGE
    )
    miscounted = offer.model_dump() | {"parts": offer.parts[:1]}
    r = hub.post(sponsor, f"{API}/weights/offer", json.dumps(miscounted))
    refused(r, 422, Refusal.MALFORMED)
    assert state(hub) == before
    InProcessClient(hub, sponsor).offer_weights(offer)
    before = state(hub)
    refused(hub.post(other, path, blob[:part]), 403, Refusal.FORBIDDEN)  # not its offer
    refused(hub.post(sponsor, path, blob[: part + 1]), 413, Refusal.TOO_LARGE)  # unread
    flipped = bytes([blob[0] ^ 1]) + blob[1:part]
    refused(hub.post(sponsor, path, flipped), 422, Refusal.MALFORMED)
    refused(
        hub.post(sponsor, f"{API}/weights/{offer.sha256}/parts/2", b"x"), 404, Refusal.NOT_FOUND
    )
    assert state(hub) == before

    # parts that are what the offer says, but not one finite fp32 vector together
    nan = theta.clone()
    nan[5] = float("nan")
    bad = pack_vector(nan)
    client = InProcessClient(hub, sponsor)
    bad_offer = offer_of(bad, part)
    client.offer_weights(bad_offer)
    for i in range(2):
        client.upload_weights_part(bad_offer.sha256, i, bad[i * part : (i + 1) * part])
    r = hub.post(sponsor, f"{API}/weights/offer", bad_offer.model_dump_json())
    refused(r, 422, Refusal.MALFORMED)
    assert "not finite (at index 5)" in r.json()["detail"]


def test_an_offer_over_the_quota_is_refused_before_anything_is_stored(tmp_path):
    blob = pack_vector(torch.randn(2000))
    quota = HubSettings(max_dataset_bytes_per_identity=len(blob) - 1)
    hub = new_hub(tmp_path / "hub", quota)
    before = state(hub)
    r = hub.post(
        Identity.generate(), f"{API}/weights/offer", offer_of(blob, 1000).model_dump_json()
    )
    refused(r, 429, Refusal.QUOTA)
    assert state(hub) == before


def test_a_wrong_length_is_refused_before_a_prepared_folder_is_imported(tmp_path):
    from gridswarm.train.dataset import prepare

    text = tmp_path / "data" / "small.txt"
    text.parent.mkdir()
    text.write_bytes(SHAKESPEARE.read_bytes()[:20_000])
    folder = tmp_path / "data" / "ds"
    prepare([text], "bytes", folder, shard_tokens=4096, show_progress=False)
    hub = new_hub(tmp_path / "hub", HubSettings(data_roots=(tmp_path / "data",)))
    sponsor = Identity.generate()
    config = run_settings(data={"dataset": str(folder)})
    numel = hub.numel(hub.create_run(Identity.generate(), run_settings()))
    weights = push(hub, sponsor, pack_vector(torch.zeros(numel + 1)))["weights"]
    before = state(hub)
    config["model"] = {**config["model"], "init_weights": weights}
    r = hub.post(sponsor, f"{API}/runs", {"config": config})
    refused(r, 422, Refusal.INVALID_CONFIG)
    assert f"{numel + 1:,} values" in r.json()["detail"]
    assert state(hub) == before  # the folder's shards were not imported
    config["model"]["init_weights"] = push(hub, sponsor, pack_vector(torch.zeros(numel)))["weights"]
    assert hub.post(sponsor, f"{API}/runs", {"config": config}).status_code == 200
