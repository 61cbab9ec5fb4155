"""The close's numerical part (`hub/closing.compute_version`) on in-memory blobs: it reads the
uploads, then aggregates, and only then reads the base version (never the model and every
upload at once), stores the four blobs and evaluates last; its weights are the outer step of the
aggregate; under SecAgg it reads no upload, and a fragment's delta says which slice it holds;
the aggregation's privacy record rides on the new version."""

from __future__ import annotations

import hashlib

import torch

from gridswarm.config import RunConfig, SecAggSettings, parse_run_config
from gridswarm.hub.aggregation import Aggregated, PrivacyRecord
from gridswarm.hub.closing import CloseInputs, compute_version
from gridswarm.train.aggregate import EncodedRows, make_aggregator
from gridswarm.train.codecs import make_codec
from gridswarm.train.outer import outer_update
from gridswarm.train.params import pack, pack_vector, unpack, unpack_vector
from tests.conftest import tiny_run

NUMEL = 1000  # the flat model's values (the test's own; no model is built)


class Blobs:
    """A content-addressed store in memory that logs what is read and written, in order."""

    def __init__(self, log: list[str]) -> None:
        self.data: dict[str, bytes] = {}
        self.names: dict[str, str] = {}  # digest -> what the log calls it
        self.log = log

    def put(self, data: bytes, name: str = "") -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.data[digest] = data
        self.log.append(f"write {name}".strip())
        return digest

    def read(self, digest: str) -> bytes:
        self.log.append(f"read {self.names.get(digest, digest[:8])}")
        return self.data[digest]


def inputs(cfg: RunConfig, blobs: Blobs, fragment: tuple[int, int] | None = None) -> CloseInputs:
    """Two uploads (100 and 300 tokens) and a base version with momentum, stored in `blobs`."""
    torch.manual_seed(0)
    numel = NUMEL if fragment is None else fragment[1] - fragment[0]
    codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
    uploads = tuple(
        (blobs.put(pack(codec.encode(torch.randn(numel)))), tokens) for tokens in (100, 300)
    )
    base = [blobs.put(pack_vector(torch.randn(NUMEL))) for _ in range(2)]
    blobs.names = {uploads[0][0]: "upload", uploads[1][0]: "upload"} | dict.fromkeys(base, "base")
    blobs.log.clear()
    return CloseInputs(
        key=("run", 3, 0, 2, tuple(u[0] for u in uploads)),
        run_id="run",
        cfg=cfg,
        model_numel=NUMEL,
        fragment=fragment,
        number=3,
        uploads=uploads,
        base_weights_blob=base[0],
        base_momentum_blob=base[1],
        base_error_feedback_blob=None,
    )


def test_reads_uploads_then_aggregates_then_reads_the_base_and_steps() -> None:
    torch.set_num_threads(1)
    log: list[str] = []
    blobs = Blobs(log)
    cfg = parse_run_config(tiny_run())
    given = inputs(cfg, blobs)
    aggregator = make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
    aggregated: list[torch.Tensor] = []

    def aggregate(uploads: EncodedRows | None, weights: torch.Tensor | None) -> Aggregated:
        log.append("aggregate")
        assert uploads is not None and weights is not None and len(uploads) == 2
        assert weights.tolist() == [100.0, 300.0]
        aggregated.append(uploads.aggregate(aggregator, weights))
        return Aggregated(aggregated[0].clone(), PrivacyRecord())

    def evaluate(theta: torch.Tensor) -> float:
        log.append("evaluate")
        return float(theta.sum())

    new = compute_version(given, aggregate, evaluate, blobs.read, blobs.put)
    assert log == ["read upload"] * 2 + ["aggregate"] + ["read base"] * 2 + ["write"] * 4 + [
        "evaluate"
    ]
    theta = unpack_vector(blobs.data[given.base_weights_blob])
    momentum = unpack_vector(blobs.data[given.base_momentum_blob])
    expected = outer_update(
        theta,
        aggregated[0],
        momentum,
        None,
        lr=cfg.train.outer_lr,
        mu=cfg.train.outer_momentum,
        codec_down=cfg.comm.codec_down,
        block_size=cfg.comm.block_size,
    )
    weights, meta = unpack(blobs.data[new.weights_blob])
    assert torch.equal(weights["theta"], expected.theta)
    assert meta == {"run_id": "run", "version": 3}
    assert torch.equal(unpack_vector(blobs.data[new.momentum_blob]), expected.momentum)
    assert new.key == given.key and new.number == 3
    assert new.val_loss == float(expected.theta.sum())
    _, delta_meta = unpack(blobs.data[new.delta_blob])
    assert delta_meta == {"codec": cfg.comm.codec_down, "numel": NUMEL, "to": 3}
    assert set(new.columns()) == {
        "number",
        "weights_blob",
        "delta_blob",
        "momentum_blob",
        "error_feedback_blob",
        "val_loss",
    }


def test_secagg_reads_no_upload_and_a_fragment_is_named_in_its_delta() -> None:
    torch.set_num_threads(1)
    log: list[str] = []
    blobs = Blobs(log)
    cfg = parse_run_config(tiny_run())
    cfg = cfg.model_copy(
        update={"privacy": cfg.privacy.model_copy(update={"secagg": SecAggSettings()})}
    )
    fragment = (200, 600)
    given = inputs(cfg, blobs, fragment)
    seen: list[tuple[object, object]] = []

    record = PrivacyRecord(dp_nodes=2, secagg_aggregate_blob="ab" * 32)

    def aggregate(uploads: EncodedRows | None, weights: torch.Tensor | None) -> Aggregated:
        seen.append((uploads, weights))
        # the recovered sum, here a stand-in
        return Aggregated(torch.ones(fragment[1] - fragment[0]), record)

    new = compute_version(given, aggregate, lambda theta: 0.0, blobs.read, blobs.put)
    assert seen == [(None, None)]
    assert new.privacy == record  # for the close's transaction to write
    assert "read upload" not in log
    _, delta_meta = unpack(blobs.data[new.delta_blob])
    assert delta_meta == {
        "codec": cfg.comm.codec_down,
        "numel": NUMEL,
        "to": 3,
        "fragment": [200, 600],
    }
    theta = unpack_vector(blobs.data[new.weights_blob])
    base = unpack_vector(blobs.data[given.base_weights_blob])
    assert torch.equal(theta[:200], base[:200]) and torch.equal(theta[600:], base[600:])
    assert not torch.equal(theta[200:600], base[200:600])
