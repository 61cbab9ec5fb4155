"""A sponsor pushes a prepared dataset to a hub it does not run (hub/datasets.py): offer, upload
only what is missing, `manifest:<sha256>`, a run on it that trains a round with a node that
fetched only its shards; every refusal (quota, hub cap, size, hash, content, no offer, unsigned,
not a sponsor) stores neither a blob nor a row. In process: the real app on SQLite, real
signatures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gridswarm.blobs import LocalBlobStore, sha256_hex
from gridswarm.hub.datasets import MAX_OFFER_BYTES
from gridswarm.hub.service import HubSettings
from gridswarm.identity import Identity
from gridswarm.protocol import API, Refusal
from gridswarm.train.dataset import (
    MANIFEST,
    TOKENIZER_FILE,
    BlobSource,
    DatasetOffer,
    parse_manifest,
    prepare,
)
from tests.conftest import tiny_run
from tests.hub.harness import Hub, train_round

SHAKESPEARE = Path(__file__).resolve().parents[2] / "src/gridswarm/data/tinyshakespeare.txt"
MIB = 1 << 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small bytes-tokenised dataset: 9 train shards of 4,096 tokens and a val shard."""
    src = tmp_path_factory.mktemp("src") / "small.txt"
    src.write_bytes(SHAKESPEARE.read_bytes()[:40_000])
    out = tmp_path_factory.mktemp("ds") / "small"
    _, digest = prepare([src], "bytes", out, shard_tokens=4096, show_progress=False)
    return out, digest


def offer_body(folder: Path) -> bytes:
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    size = (folder / TOKENIZER_FILE).stat().st_size
    return DatasetOffer(manifest=manifest, tokenizer_bytes=size).model_dump_json().encode()


def files_by_digest(folder: Path) -> dict[str, Path]:
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    files = {s.sha256: folder / s.file for s in manifest.shards()}
    files[manifest.tokenizer.sha256] = folder / TOKENIZER_FILE
    return files


def offer(hub: Hub, who: Identity, folder: Path) -> dict:
    r = hub.post(who, f"{API}/datasets", offer_body(folder))
    assert r.status_code == 200, r.text
    return r.json()


def upload(hub: Hub, who: Identity, manifest: str, digest: str, data: bytes):
    return hub.post(who, f"{API}/datasets/{manifest}/blobs/{digest}", data)


def push(hub: Hub, who: Identity, folder: Path) -> str:
    answer = offer(hub, who, folder)
    files = files_by_digest(folder)
    for digest in answer["missing"]:
        r = upload(hub, who, answer["manifest"], digest, files[digest].read_bytes())
        assert r.status_code == 200, r.text
    final = offer(hub, who, folder)
    assert final["missing"] == [] and final["dataset"] is not None
    return final["dataset"]


def fresh(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def refused(r, status: int, reason: Refusal) -> None:
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason.value, r.text


def unchanged(hub: Hub, before: tuple[dict, int]) -> None:
    """No row and no blob more than `before` (`hub.snapshot()`, `hub.blob_bytes()`)."""
    assert (hub.snapshot(), hub.blob_bytes()) == before


def state(hub: Hub) -> tuple[dict, int]:
    return hub.snapshot(), hub.blob_bytes()


def test_push_then_a_run_on_it_trains_a_round_from_the_shards_a_node_fetched(prepared, tmp_path):
    torch.set_num_threads(1)
    folder, digest = prepared
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    first = offer(hub, sponsor, folder)
    assert first["manifest"] == digest and first["dataset"] is None
    assert len(first["missing"]) == 11  # 9 train shards, 1 val shard, the tokenizer
    dataset = push(hub, sponsor, folder)
    assert dataset == f"manifest:{digest}"
    assert hub.service.blobs.get(digest) == (folder / MANIFEST).read_bytes()
    again = offer(hub, sponsor, folder)  # idempotent: nothing moves, nothing is charged again
    assert again["dataset"] == dataset and again["missing"] == []
    other = offer(hub, Identity.generate(), folder)  # another sponsor: already complete
    assert other["dataset"] == dataset and other["missing_bytes"] == 0

    config = tiny_run(
        data={"dataset": dataset, "slice_shards": 1},
        train={"seq_len": 32, "batch_size": 4, "inner_steps": 4, "min_inner_steps": 2},
        round={"deadline_s": 60, "quorum": 1, "min_nodes": 1},
        budget={"rounds": 1},
    )
    run_id = hub.create_run(sponsor, config)

    fetched: list[str] = []

    def fetch(d: str) -> bytes:  # the node's unsigned download of a public dataset blob
        fetched.append(d)
        r = hub.get(f"{API}/blobs/{d}")
        assert r.status_code == 200, r.text
        return r.content

    status = train_round(hub, run_id, BlobSource(LocalBlobStore(tmp_path / "node"), fetch))
    assert status["version"] == 1 and status["status"] == "finished", status
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    train_shards = {s.sha256 for s in manifest.train}
    assert fetched[0] == digest  # the manifest, then only the train shard its slice draws
    assert len(fetched) == 2 and fetched[1] in train_shards


def test_a_cut_off_push_resumes_with_only_the_missing_blobs(prepared, tmp_path):
    folder, _ = prepared
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    answer = offer(hub, sponsor, folder)
    files = files_by_digest(folder)
    for d in answer["missing"][:4]:
        assert upload(hub, sponsor, answer["manifest"], d, files[d].read_bytes()).status_code == 200
    resumed = offer(hub, sponsor, folder)
    assert resumed["missing"] == answer["missing"][4:]
    assert resumed["missing_bytes"] == sum(files[d].stat().st_size for d in resumed["missing"])
    before = state(hub)
    assert (
        upload(
            hub,
            sponsor,
            answer["manifest"],
            answer["missing"][0],
            files[answer["missing"][0]].read_bytes(),
        ).status_code
        == 200
    )  # a repeated upload: accepted, changes nothing
    unchanged(hub, before)
    other_size = json.loads(offer_body(folder)) | {"tokenizer_bytes": 12345}
    r = hub.post(sponsor, f"{API}/datasets", json.dumps(other_size).encode())
    refused(r, 409, Refusal.CONFLICT)  # the tokenizer's size is the first offer's
    unchanged(hub, before)
    push(hub, sponsor, folder)


def test_quota_and_hub_cap_refuse_before_anything_is_stored(prepared, tmp_path):
    folder, _ = prepared
    size = sum(p.stat().st_size for p in files_by_digest(folder).values())
    settings = HubSettings(max_dataset_bytes_per_identity=size - 1, max_dataset_bytes=2 * size)
    hub = Hub(fresh(tmp_path / "hub"), settings)
    before = state(hub)
    r = hub.post(Identity.generate(), f"{API}/datasets", offer_body(folder))
    refused(r, 429, Refusal.QUOTA)
    unchanged(hub, before)

    settings = dataclasses.replace(settings, max_dataset_bytes_per_identity=size)
    hub = Hub(fresh(tmp_path / "hub2"), dataclasses.replace(settings, max_dataset_bytes=size - 1))
    before = state(hub)
    r = hub.post(Identity.generate(), f"{API}/datasets", offer_body(folder))
    refused(r, 413, Refusal.STORAGE_FULL)
    unchanged(hub, before)


def test_the_cap_counts_every_identity_and_a_repeat_offer_is_free(prepared, tmp_path):
    folder, _ = prepared
    size = sum(p.stat().st_size for p in files_by_digest(folder).values())
    hub = Hub(fresh(tmp_path / "hub"), HubSettings(max_dataset_bytes=size + 10))
    a, b = Identity.generate(), Identity.generate()
    answer = offer(hub, a, folder)
    assert answer["missing_bytes"] == size
    assert offer(hub, a, folder)["missing_bytes"] == size  # offered again: not charged again
    # b's offer of the same dataset before a uploaded: b would upload it too, over the cap
    refused(hub.post(b, f"{API}/datasets", offer_body(folder)), 413, Refusal.STORAGE_FULL)


def test_non_sponsor_and_unsigned_are_refused(prepared, tmp_path):
    folder, _ = prepared
    sponsor = Identity.generate()
    hub = Hub(fresh(tmp_path / "hub"), HubSettings(sponsors=frozenset({sponsor.public_key.hex()})))
    before = state(hub)
    refused(
        hub.post(Identity.generate(), f"{API}/datasets", offer_body(folder)),
        403,
        Refusal.NOT_SPONSOR,
    )
    r = hub.http.post(f"{API}/datasets", content=offer_body(folder))
    refused(r, 401, Refusal.UNAUTHENTICATED)
    unchanged(hub, before)
    answer = offer(hub, sponsor, folder)
    digest = answer["missing"][0]
    data = files_by_digest(folder)[digest].read_bytes()
    before = state(hub)
    path = f"{API}/datasets/{answer['manifest']}/blobs/{digest}"
    refused(hub.http.post(path, content=data), 401, Refusal.UNAUTHENTICATED)
    refused(
        upload(hub, Identity.generate(), answer["manifest"], digest, data), 403, Refusal.NOT_SPONSOR
    )
    unchanged(hub, before)


def test_uploads_are_checked_against_the_offered_manifest(prepared, tmp_path):
    folder, digest = prepared
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    answer = offer(hub, sponsor, folder)
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    shard = manifest.train[0]
    data = (folder / shard.file).read_bytes()
    before = state(hub)

    def refuse(body: bytes, status: int, reason: Refusal, blob: str = shard.sha256, m=digest):
        refused(upload(hub, sponsor, m, blob, body), status, reason)
        unchanged(hub, before)

    refuse(data + b"\0\0", 413, Refusal.TOO_LARGE)  # longer than the manifest says: unread
    refuse(data[:-2], 422, Refusal.MALFORMED)  # shorter (and another hash)
    flipped = bytes([data[0] ^ 1]) + data[1:]
    refuse(flipped, 422, Refusal.MALFORMED)  # the right size, the wrong sha256
    refuse(data, 404, Refusal.NOT_FOUND, blob="a" * 64)  # not a blob of this dataset
    refuse(data, 404, Refusal.NOT_FOUND, m="b" * 64)  # no such offered dataset
    stranger = Identity.generate()  # a sponsor that did not offer it
    refused(upload(hub, stranger, digest, shard.sha256, data), 403, Refusal.FORBIDDEN)
    unchanged(hub, before)
    assert shard.sha256 in answer["missing"]  # still missing: nothing was stored


def test_token_ids_outside_the_vocabulary_and_a_wrong_tokenizer_are_refused(prepared, tmp_path):
    """A manifest that agrees with itself but lies about its shards: ids >= its vocabulary, and
    a tokenizer whose vocabulary is not the manifest's."""
    folder, _ = prepared
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    bad = np.full(manifest.train[0].tokens, 300, dtype=np.uint16).tobytes()  # >= 256
    train = [manifest.train[0].model_copy(update={"sha256": sha256_hex(bad)}), *manifest.train[1:]]
    small_vocab = manifest.tokenizer.model_copy(update={"vocab_size": 100})
    lying = manifest.model_copy(update={"train": train, "tokenizer": small_vocab})
    size = (folder / TOKENIZER_FILE).stat().st_size
    body = DatasetOffer(manifest=lying, tokenizer_bytes=size).model_dump_json().encode()
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    r = hub.post(sponsor, f"{API}/datasets", body)
    assert r.status_code == 200, r.text
    m = r.json()["manifest"]
    before = state(hub)
    r = upload(hub, sponsor, m, sha256_hex(bad), bad)
    refused(r, 422, Refusal.MALFORMED)
    assert "outside the vocabulary" in r.json()["detail"]
    unchanged(hub, before)
    # a real shard of the dataset holds letters (ids 97..122): outside a vocabulary of 100
    real = manifest.train[1]
    r = upload(hub, sponsor, m, real.sha256, (folder / real.file).read_bytes())
    refused(r, 422, Refusal.MALFORMED)
    r = upload(hub, sponsor, m, manifest.tokenizer.sha256, (folder / TOKENIZER_FILE).read_bytes())
    refused(r, 422, Refusal.MALFORMED)
    assert "vocabulary of 256" in r.json()["detail"]
    unchanged(hub, before)


def test_a_blob_checked_for_one_manifest_is_not_present_for_one_it_breaks(prepared, tmp_path):
    """The same shard bytes under a manifest with a smaller vocabulary are missing (and would
    be refused), not taken as present because the bytes are in the blob store."""
    folder, _ = prepared
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    push(hub, sponsor, folder)
    manifest = parse_manifest((folder / MANIFEST).read_bytes())
    lying = manifest.model_copy(
        update={"tokenizer": manifest.tokenizer.model_copy(update={"vocab_size": 100})}
    )
    body = DatasetOffer(manifest=lying, tokenizer_bytes=1000).model_dump_json().encode()
    r = hub.post(sponsor, f"{API}/datasets", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["missing"]) == len(manifest.digests())


def test_malformed_offers_are_refused(prepared, tmp_path):
    folder, _ = prepared
    hub = Hub(fresh(tmp_path / "hub"))
    sponsor = Identity.generate()
    good = json.loads(offer_body(folder))
    before = state(hub)
    cases = [
        {**good, "tokenizer_bytes": 0},
        {**good, "tokenizer_bytes": 1 << 40},
        {**good, "extra": 1},
        {**good, "manifest": {**good["manifest"], "tokens_train": 1}},  # not the sum
        {**good, "manifest": {**good["manifest"], "dtype": "float32"}},
        {**good, "manifest": {**good["manifest"], "train": []}},
        {**good, "manifest": {**good["manifest"], "shard_tokens": -1}},
        {**good, "manifest": {**good["manifest"], "tokens_val": float("nan")}},
    ]
    for case in cases:
        r = hub.post(sponsor, f"{API}/datasets", json.dumps(case).encode())
        refused(r, 422, Refusal.MALFORMED)
    r = hub.post(sponsor, f"{API}/datasets", b"x" * (MAX_OFFER_BYTES + 1))
    refused(r, 413, Refusal.TOO_LARGE)
    unchanged(hub, before)


def test_the_routes_are_in_the_openapi_document(tmp_path):
    doc = Hub(fresh(tmp_path / "hub")).get("/openapi.json").json()
    offer_op = doc["paths"][f"{API}/datasets"]["post"]
    assert offer_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/DatasetOffer"
    )
    blob_op = doc["paths"][f"{API}/datasets/{{manifest}}/blobs/{{digest}}"]["post"]
    assert "application/octet-stream" in blob_op["requestBody"]["content"]
    for op in (offer_op, blob_op):
        assert {"401", "403", "413", "422", "429"} <= set(op["responses"])
    assert "storage_full" in doc["components"]["schemas"]["Refusal"]["enum"]


def test_the_migration_matches_the_tables_and_downgrades(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    from gridswarm.db import Base
    from gridswarm.hub.server import alembic

    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    alembic(engine, "upgrade", "head")
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "pushed_" in repr(d)] == []
    alembic(engine, "downgrade", "0009_sybil")
    assert not {"pushed_datasets", "pushed_blobs"} & set(inspect(engine).get_table_names())
