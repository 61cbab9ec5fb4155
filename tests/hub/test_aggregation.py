"""The round's aggregation as a pure decider (`hub/aggregation.aggregate_round`): the plain
aggregator's bits, DP-FedAvg's clipping and record, the SecAgg sum's denominator and aggregate
blob; it reads and writes only through the functions it is handed (no session, no lock)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from gridswarm.config import RunConfig, SecAggSettings, parse_run_config
from gridswarm.hub.aggregation import PrivacyRecord, SecAggSum, aggregate_round
from gridswarm.privacy.live import tokens_ref
from gridswarm.train.aggregate import EncodedRows, make_aggregator
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack, pack_vector, unpack, unpack_vector
from tests.conftest import tiny_run

NUMEL = 512


class Blobs(dict):
    """Content-addressed bytes in memory."""

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self[digest] = data
        return digest


def nothing(_: object) -> object:
    raise AssertionError("no blob I/O expected")


def encoded(cfg: RunConfig, rows: torch.Tensor) -> EncodedRows:
    """`rows` through the up-codec, as the hub decodes them."""
    codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
    payloads = [unpack(pack(codec.encode(row)))[0] for row in rows]
    return EncodedRows(codec, payloads, rows.shape[1])


def with_privacy(**privacy: object) -> RunConfig:
    cfg = parse_run_config(tiny_run())
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update=privacy)})


def test_without_privacy_it_is_the_runs_aggregator_and_records_nothing() -> None:
    cfg = parse_run_config(tiny_run())
    torch.manual_seed(0)
    rows = torch.randn(3, NUMEL)
    weights = torch.tensor([1.0, 2.0, 3.0])
    got = aggregate_round(cfg, [1, 2, 3], encoded(cfg, rows), weights, None, nothing, nothing)
    aggregator = make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
    assert torch.equal(got.pseudo_gradient, encoded(cfg, rows).aggregate(aggregator, weights))
    assert got.record == PrivacyRecord()


def test_dp_clips_each_update_and_records_how_many_were_clipped() -> None:
    dp = parse_run_config(tiny_run(privacy={"dp": {"clip_norm": 1.0}})).privacy.dp
    cfg = with_privacy(dp=dp)
    torch.manual_seed(1)
    rows = torch.randn(4, NUMEL) * 0.01
    rows[1] *= 1e4  # two rows far above the clip norm
    rows[3] *= 1e4
    got = aggregate_round(cfg, [5] * 4, encoded(cfg, rows), torch.ones(4), None, nothing, nothing)
    assert got.record == PrivacyRecord(dp_nodes=4, dp_clipped=2)
    assert got.pseudo_gradient.shape == (NUMEL,)
    assert torch.isfinite(got.pseudo_gradient).all()


def test_secagg_divides_the_recovered_sum_and_stores_the_aggregate() -> None:
    cfg = with_privacy(secagg=SecAggSettings())
    blobs = Blobs()
    total = torch.arange(NUMEL, dtype=torch.float32)
    secagg = SecAggSum(blobs.put(pack_vector(total)), participants=3)
    tokens = [tokens_ref(cfg), tokens_ref(cfg) // 2]
    got = aggregate_round(cfg, tokens, None, None, secagg, blobs.__getitem__, blobs.put)
    assert torch.equal(got.pseudo_gradient, total / 1.5)  # the survivors' weight, no DP
    assert got.record.dp_nodes is None
    stored = got.record.secagg_aggregate_blob
    assert torch.equal(unpack_vector(blobs[stored]), got.pseudo_gradient)


def test_secagg_with_dp_divides_by_the_participants_and_records_the_round() -> None:
    dp = parse_run_config(tiny_run(privacy={"dp": {"clip_norm": 1.0}})).privacy.dp
    cfg = with_privacy(secagg=SecAggSettings(), dp=dp.model_copy(update={"noise": "distributed"}))
    blobs = Blobs()
    total = torch.ones(NUMEL)
    secagg = SecAggSum(blobs.put(pack_vector(total)), participants=4)
    got = aggregate_round(cfg, [1, 1, 1], None, None, secagg, blobs.__getitem__, blobs.put)
    assert torch.equal(got.pseudo_gradient, total / 4)  # no central noise: distributed
    assert got.record.dp_nodes == 3 and got.record.dp_clipped is None


def test_a_round_without_its_inputs_is_refused() -> None:
    plain = parse_run_config(tiny_run())
    with pytest.raises(ValueError, match="uploads"):
        aggregate_round(plain, [1], None, None, None, nothing, nothing)
    with pytest.raises(ValueError, match="recovered sum"):
        aggregate_round(
            with_privacy(secagg=SecAggSettings()), [1], None, None, None, nothing, nothing
        )
