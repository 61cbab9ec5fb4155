"""Aggregators: known answers, reference implementations, robustness to attackers, bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.train.aggregate import (
    AGGREGATORS,
    AggregationError,
    EncodedRows,
    MultiKrum,
    aggregate_by_columns,
    make_aggregator,
)
from gridswarm.train.attacks import apply_attack
from gridswarm.train.codecs import make_codec, span_decoding
from tests.examples import examples

torch.set_num_threads(1)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- known answers


def test_weighted_mean_known_answer() -> None:
    out = make_aggregator("mean")(t([[1, 2], [3, 4]]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(out, torch.tensor([2.5, 3.5]))


def test_median_odd_and_even() -> None:
    med = make_aggregator("median")
    assert torch.equal(med(t([[1, -1], [5, 7], [2, 0]])), torch.tensor([2.0, 0.0]))
    assert torch.equal(med(t([[1], [2], [3], [10]])), torch.tensor([2.5]))


def test_median_matches_torch_on_many_columns() -> None:
    x = torch.randn(9, 5000, generator=torch.Generator().manual_seed(0))
    out = make_aggregator("median")(x)
    assert torch.equal(out, x.median(dim=0).values)  # odd n: torch's median is the true median


def test_trimmed_mean_known_answer() -> None:
    column = t([[v] for v in [10, 1, 9, 2, 3, 4, 5, 6, 7, 8]])
    out = make_aggregator("trimmed-mean", trim_fraction=0.2)(column)
    assert out.item() == pytest.approx(5.5)  # drops 1, 2, 9, 10
    big = torch.randn(13, 4097, generator=torch.Generator().manual_seed(1))
    ref = big.sort(dim=0).values[2:11].mean(dim=0)
    assert torch.allclose(make_aggregator("trimmed-mean", trim_fraction=0.2)(big), ref, atol=1e-6)


def test_trimmed_mean_zero_trim_is_mean() -> None:
    x = torch.randn(4, 10)
    out = make_aggregator("trimmed-mean", trim_fraction=0.1)(x)  # floor(0.4) = 0 trimmed
    assert torch.allclose(out, x.mean(dim=0))


def test_krum_scores_match_brute_force() -> None:
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(2)).double().float()
    f = 2
    scores = MultiKrum(f=f).scores(x)
    for i in range(9):
        d = sorted(float((x[i] - x[j]).pow(2).sum()) for j in range(9) if j != i)
        assert scores[i].item() == pytest.approx(sum(d[: 9 - f - 2]), rel=1e-5)


def test_krum_m1_picks_a_cluster_member() -> None:
    cluster = t([[0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1], [0.05, 0.05]])
    x = torch.cat([cluster, t([[50, 50], [-40, 3]])])
    out = make_aggregator("krum", f=2, m=1)(x)
    assert torch.equal(out, cluster[4])  # the most central point of the cluster


def test_geometric_median_known_answers() -> None:
    gm = make_aggregator("geometric-median")
    # Collinear points: the geometric median is the (1-D) median.
    assert gm(t([[0.0], [1.0], [10.0]])).item() == pytest.approx(1.0, abs=1e-4)
    # Equilateral triangle: the centroid (Fermat point).
    tri = t([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]])
    assert torch.allclose(gm(tri), tri.mean(dim=0), atol=1e-4)


def test_geometric_median_matches_reference_weiszfeld() -> None:
    x = torch.randn(15, 6, generator=torch.Generator().manual_seed(3)) + 3.0
    x[:3] *= 40.0
    z = x.double().mean(dim=0)
    for _ in range(2000):  # plain Weiszfeld on coordinates
        w = 1.0 / (x.double() - z).norm(dim=1).clamp_min(1e-12)
        z = (w[:, None] * x.double()).sum(dim=0) / w.sum()
    out = make_aggregator("geometric-median", max_iter=500, tol=0.0)(x)
    assert torch.allclose(out.double(), z, atol=1e-4)


def test_centered_clip_matches_reference() -> None:
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(4))
    x[:2] += 30.0
    tau, iters = 0.7, 3
    dists = torch.cdist(x.double(), x.double()).sum(dim=1)
    v = x[dists.argmin()].double()
    for _ in range(iters):
        diff = x.double() - v
        scale = (tau / diff.norm(dim=1)).clamp(max=1.0)
        v = v + (scale[:, None] * diff).mean(dim=0)
    out = make_aggregator("centered-clip", tau=tau, iters=iters)(x)
    assert torch.allclose(out.double(), v, atol=1e-5)


def test_centered_clip_huge_tau_is_mean() -> None:
    x = torch.randn(6, 8)
    out = make_aggregator("centered-clip", tau=1e9, iters=1)(x)
    assert torch.allclose(out, x.mean(dim=0), atol=1e-5)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_identical_rows_give_that_row(name: str) -> None:
    row = torch.randn(300)
    out = make_aggregator(name)(row.expand(7, -1).clone())
    assert torch.allclose(out, row, atol=1e-5)


def test_large_common_offset_does_not_cancel_distances() -> None:
    # Honest updates share a large component; spread is 1e-6 of it. Float32 distances without
    # centring would be rounding noise and Krum could not tell the outlier.
    g = torch.Generator().manual_seed(5)
    honest = 1000.0 + 1e-3 * torch.randn(10, 20_000, generator=g)
    outlier = honest.mean(dim=0, keepdim=True) + 0.05
    x = torch.cat([honest, outlier])
    scores = MultiKrum(f=1).scores(x)
    assert int(scores.argmax()) == 10


# --------------------------------------------------------------------------- robustness


def _honest(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("attack", ["sign-flip", "scaling", "noise", "ipm"])
@pytest.mark.parametrize(
    "name", ["median", "trimmed-mean", "krum", "geometric-median", "centered-clip"]
)
def test_robust_rules_stay_near_honest_mean(name: str, attack: str) -> None:
    honest = _honest(16, 2000, seed=6)
    opts = {"sign-flip": {"scale": 4.0}, "scaling": {"scale": 100.0}, "ipm": {"epsilon": 50.0}}
    opts = opts.get(attack, {})
    bad = apply_attack(attack, honest, n_attackers=4, rng_seed=7, **opts)
    x = torch.cat([honest, bad])
    target = honest.mean(dim=0)
    spread = (honest - target).norm(dim=1).mean()  # one honest update's distance to the mean
    robust_err = (make_aggregator(name)(x) - target).norm()
    mean_err = (make_aggregator("mean")(x) - target).norm()
    assert robust_err < 0.5 * spread, (name, attack, robust_err, spread)
    assert mean_err > 3 * spread  # the attack does break the plain mean


def test_nan_rows_and_zero_weights_are_left_out() -> None:
    x = t([[1, 1], [3, 3], [float("nan"), 0], [100, 100]])
    out = make_aggregator("mean")(x, torch.tensor([1.0, 1.0, 5.0, 0.0]))
    assert torch.equal(out, torch.tensor([2.0, 2.0]))


def test_robust_rules_ignore_claimed_weights() -> None:
    x = t([[0], [0.1], [-0.1], [0.05], [100]])
    inflated = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e6])
    assert abs(make_aggregator("median")(x, inflated).item()) < 0.2
    assert make_aggregator("mean")(x, inflated).item() > 99.0


# --------------------------------------------------------------------------- bad input


def test_make_aggregator_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'kurm'"):
        make_aggregator("kurm")
    with pytest.raises(ValueError, match=r"no option\(s\) \['beta'\]"):
        make_aggregator("trimmed-mean", beta=0.1)
    with pytest.raises(ValueError, match="trim_fraction"):
        make_aggregator("trimmed-mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="tau"):
        make_aggregator("centered-clip", tau=-1.0)
    with pytest.raises(ValueError, match="none"):
        make_aggregator("mean", f=1)


def test_bad_updates_raise() -> None:
    mean = make_aggregator("mean")
    with pytest.raises(AggregationError, match="2-D"):
        mean(torch.zeros(5))
    with pytest.raises(AggregationError, match="float32"):
        mean(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(AggregationError, match=r"shape \[2\]"):
        mean(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(AggregationError, match=">= 0"):
        mean(torch.zeros(2, 3), torch.tensor([1.0, -1.0]))
    with pytest.raises(AggregationError, match="no update"):
        mean(torch.full((2, 3), float("inf")))
    with pytest.raises(AggregationError, match="2f \\+ 3"):
        make_aggregator("krum", f=3)(torch.zeros(6, 3))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_permutation_invariant_and_translation_equivariant(name: str) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(11, 257, generator=g)
    agg = make_aggregator(name)
    out = agg(x)
    perm = torch.randperm(11, generator=g)
    assert torch.allclose(agg(x[perm]), out, atol=1e-5)
    shift = torch.randn(257, generator=g)
    assert torch.allclose(agg(x + shift), out + shift, atol=1e-4)


@settings(max_examples=examples(120), deadline=None)
@given(
    rule=st.sampled_from(["mean", "median", "trimmed-mean"]),
    codec_name=st.sampled_from(["fp32", "fp16", "int8", "int4"]),
    block_size=st.sampled_from([2, 8, 32]),
    n=st.integers(1, 9),
    numel=st.integers(1, 500),
    columns=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_coordinatewise_rules_by_column_blocks_are_the_stacked_rules_bit_for_bit(
    rule, codec_name, block_size, n, numel, columns, seed
):
    """The hub's close aggregates the mean, median and trimmed mean a block of columns at a
    time from the uploads' payloads (`EncodedRows`): exactly the bits of the rule over the
    stacked decoded rows, whatever the codec, the block width and the weights (zeros too). The
    mean is a product per block of its own `columns` (BLAS sums a column in an order that
    depends on the matrix's width: 8 rows of 1 column and of 22 differ in the last bit here)."""
    gen = torch.Generator().manual_seed(seed)
    codec = make_codec(codec_name, block_size)
    payloads = [codec.encode(torch.randn(numel, generator=gen)) for _ in range(n)]
    weights = torch.randint(0, 4, (n,), generator=gen).float()
    weights[0] = 1.0  # at least one row counts
    aggregator = make_aggregator(rule)
    align = span_decoding(codec)
    if rule == "mean":  # its product's own column blocks, small here as a model's are at scale
        aggregator.columns = max(1, columns // align) * align
    stacked = torch.stack([codec.decode(p, numel) for p in payloads])
    want = aggregator(stacked, weights)
    rows = [partial(codec.decode_span, p, numel) for p in payloads]
    got = aggregate_by_columns(aggregator, rows, weights, numel, align=align, columns=columns)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(
        EncodedRows(codec, list(payloads), numel).aggregate(aggregator, weights).view(torch.int32),
        want.view(torch.int32),
    )


def test_a_rule_that_needs_whole_rows_gets_the_stacked_rows():
    """Krum compares whole updates: it is never given column blocks."""
    codec = make_codec("int8", 4)
    payloads = [codec.encode(torch.randn(64)) for _ in range(5)]
    krum = make_aggregator("krum")
    assert not krum.coordinatewise
    with pytest.raises(AggregationError, match="not coordinate-wise"):
        aggregate_by_columns(krum, [], torch.ones(5), 64)
    stacked = torch.stack([codec.decode(p, 64) for p in payloads])
    got = EncodedRows(codec, payloads, 64).aggregate(krum, torch.ones(5))
    assert torch.equal(got, krum(stacked, torch.ones(5)))
