"""A round's pseudo-gradient from its accepted uploads: the plain aggregator, DP-FedAvg, or the
SecAgg sum. A pure decider: settings, uploads and the SecAgg sum in; the pseudo-gradient and what
the close must record out (`Aggregated`). It holds no session and takes no lock, so a close can
compute it beside the requests (`Ticker._prepare_close`) and write its record afterwards,
under the lock, in the transaction that publishes the version (`HubPrivacy.record_close`).

- no privacy settings: the run's aggregator (registry, `train/aggregate.py`), by blocks of
  columns where that gives the same bits (`EncodedRows.aggregate`);
- DP, central noise, no SecAgg: clip each decoded pseudo-gradient to C, add N(0, (zC)^2) to the
  sum, divide by the number of contributions (`dp_fedavg`); the record names how many nodes
  were summed and how many clipped, for the accountant's row;
- SecAgg: only the sum of the survivors' masked vectors exists (`SecAggSum`, read from the
  round's session by the caller); it is divided by their total token weight (no DP) or by the
  round's participant count (DP; plus central noise if asked), and stored as the session's
  aggregate blob (`write`), which the record names.

A DP close computed beside the requests and then discarded (a late upload changed the round)
released nothing: its noise draw is never published, and only the close that commits writes
its accounting row, so each published round is accounted exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gridswarm.config import RunConfig
from gridswarm.privacy.dp import clip_updates, dp_fedavg, gaussian_noise
from gridswarm.privacy.live import sum_denominator
from gridswarm.train.aggregate import EncodedRows, make_aggregator
from gridswarm.train.params import pack_vector, unpack_vector


@dataclass(frozen=True)
class SecAggSum:
    """What a SecAgg round's aggregation reads from its session: the recovered sum's blob and
    the number of the round's participants (DP-FedAvg's fixed denominator)."""

    sum_blob: str
    participants: int


@dataclass(frozen=True)
class PrivacyRecord:
    """What a close writes for privacy besides its version (`HubPrivacy.record_close`):
    `dp_nodes` / `dp_clipped` for the accountant's row of a DP round (clipped None under
    SecAgg: the hub never sees one node's norm), `secagg_aggregate_blob` for the session."""

    dp_nodes: int | None = None
    dp_clipped: int | None = None
    secagg_aggregate_blob: str | None = None


@dataclass(frozen=True)
class Aggregated:
    """A round's pseudo-gradient and its privacy record."""

    pseudo_gradient: torch.Tensor
    record: PrivacyRecord


def aggregate_round(
    cfg: RunConfig,
    tokens: Sequence[int],
    uploads: EncodedRows | None,
    weights: torch.Tensor | None,
    secagg: SecAggSum | None,
    read: Callable[[str], bytes],
    write: Callable[[bytes], str],
) -> Aggregated:
    """The round's pseudo-gradient from its decoded `uploads` and their token `weights` (both
    None under SecAgg, whose `secagg` sum is read with `read`); `tokens`: each accepted
    contribution's tokens, in the uploads' order."""
    dp = cfg.privacy.dp
    if cfg.privacy.secagg:
        if secagg is None:
            raise ValueError("a SecAgg round is aggregated from its recovered sum")
        total = unpack_vector(read(secagg.sum_blob))
        if dp is not None and dp.noise == "central":
            total = total + gaussian_noise(total.shape[0], dp.noise_multiplier * dp.clip_norm)
        result = total / sum_denominator(cfg, list(tokens), secagg.participants)
        blob = write(pack_vector(result, {"secagg": "aggregate"}))
        nodes = len(tokens) if dp is not None else None
        return Aggregated(result, PrivacyRecord(dp_nodes=nodes, secagg_aggregate_blob=blob))
    if uploads is None or weights is None:
        raise ValueError("a round without SecAgg is aggregated from its uploads")
    if dp is None:
        aggregator = make_aggregator(cfg.round.aggregator, **cfg.round.aggregator_options)
        return Aggregated(uploads.aggregate(aggregator, weights), PrivacyRecord())
    updates = uploads.stacked()  # clipping needs each whole row's norm
    _, norms = clip_updates(updates, dp.clip_norm)
    result = dp_fedavg(updates, dp.clip_norm, dp.noise_multiplier, len(updates))
    clipped = int((norms > dp.clip_norm).sum())
    return Aggregated(result, PrivacyRecord(dp_nodes=len(updates), dp_clipped=clipped))
