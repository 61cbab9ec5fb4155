"""The new version a round's close publishes, computed from the round's accepted uploads.

`compute_version` is the numerical part of a close: decode the uploads (a block of columns at a
time where the aggregator allows it, `train/aggregate.EncodedRows`), aggregate them into the
pseudo-gradient, take the outer Nesterov step with the down-codec and its error feedback
(`train/outer.outer_update_`), pack the four new blobs and evaluate the new weights on the
held-out data. It touches no database and holds no lock: what it reads and writes goes through
the functions it is given (the blob store's get and put, the run's aggregation and evaluation),
so the ticker (hub/ticker.py) can run it outside the hub's lock (`_prepare_close`) or under it
(`_close`), and the aggregation (`hub/aggregation.py` `aggregate_round`, pure) can be the plain
aggregator, DP-FedAvg or the SecAgg sum (no upload is read: `uploads` is None); what it records
for privacy (`PrivacyRecord`: the DP round's accounting facts) rides on the `NewVersion`, for
the close's transaction to write.

`CloseInputs` is everything else it needs, read by the ticker from the run, its round and the
base version; `NewVersion` is what it publishes (its blobs already stored) and the key it was
computed from, which decides whether a version computed outside the lock may be taken under it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.aggregation import Aggregated, PrivacyRecord, SecAggSum
from gridswarm.train.aggregate import EncodedRows
from gridswarm.train.codecs import make_codec
from gridswarm.train.outer import outer_update_
from gridswarm.train.params import pack, pack_vector, unpack, unpack_vector

Aggregate = Callable[[EncodedRows | None, torch.Tensor | None], Aggregated]
"""The round's pseudo-gradient and privacy record from its decoded uploads and their token
weights (both None under SecAgg): `aggregation.aggregate_round` bound to the run's settings."""


@dataclass(frozen=True)
class NewVersion:
    """What a close publishes (its blobs already stored), and what it was computed from."""

    key: tuple
    number: int
    weights_blob: str
    delta_blob: str
    momentum_blob: str
    error_feedback_blob: str
    val_loss: float
    privacy: PrivacyRecord  # what the close writes for privacy (`HubPrivacy.record_close`)

    def columns(self) -> dict[str, object]:
        """The `versions` columns it fills."""
        return {k: v for k, v in asdict(self).items() if k not in ("key", "privacy")}


@dataclass(frozen=True)
class CloseInputs:
    """What one close computes its new version from, besides the blobs it reads.

    `key`: the round, attempt, base version and accepted contributions it is computed from, and
    the SecAgg sum (`version_key`); `model_numel`: the whole flat model's values; `fragment`: the
    [start, end) the round syncs (Streaming DiLoCo) or None for the whole vector; `number`: the
    new version's; `uploads`: (blob digest, tokens) of each accepted contribution, in the
    aggregation's order; `base_*_blob`: the base version's blobs (momentum and error feedback
    None before the first outer step)."""

    key: tuple
    run_id: str
    cfg: RunConfig
    model_numel: int
    fragment: tuple[int, int] | None
    number: int
    uploads: tuple[tuple[str, int], ...]
    base_weights_blob: str
    base_momentum_blob: str | None
    base_error_feedback_blob: str | None


def version_key(
    run: m.Run,
    rnd: m.Round,
    base: m.Version,
    contributions: list[m.Contribution],
    secagg: SecAggSum | None,
) -> tuple:
    """What a new version is computed from (under SecAgg the recovered sum's blob too): a
    version computed outside the lock is taken under it only when this is the same there."""
    sum_blob = None if secagg is None else secagg.sum_blob
    return (
        run.id,
        rnd.number,
        rnd.attempt,
        base.number,
        tuple(c.id for c in contributions),
        sum_blob,
    )


def close_inputs(
    key: tuple,
    run: m.Run,
    rnd: m.Round,
    cfg: RunConfig,
    base: m.Version,
    contributions: list[m.Contribution],
    fragment: tuple[int, int] | None,
) -> CloseInputs:
    """The `CloseInputs` of closing `rnd` of `run` on `base` with `contributions` (`key`: their
    `version_key`)."""
    return CloseInputs(
        key=key,
        run_id=run.id,
        cfg=cfg,
        model_numel=run.numel,
        fragment=fragment,
        number=rnd.base_version + 1,
        uploads=tuple((c.id, c.tokens) for c in contributions),
        base_weights_blob=base.weights_blob,
        base_momentum_blob=base.momentum_blob,
        base_error_feedback_blob=base.error_feedback_blob,
    )


def compute_version(
    inputs: CloseInputs,
    aggregate: Aggregate,
    evaluate: Callable[[torch.Tensor], float],
    read: Callable[[str], bytes],
    write: Callable[[bytes], str],
) -> NewVersion:
    """The new version of a close: uploads decoded (`read` of each upload's blob) and
    aggregated (`aggregate`), the outer step on the base version's vectors (`read` after the
    aggregate, so the uploads and the model are not all held at once), the four blobs packed
    and stored (`write`, which answers the digest; before any row names them) and the new
    weights evaluated (`evaluate`: the held-out loss)."""
    cfg, fragment = inputs.cfg, inputs.fragment
    uploads = weights = None  # under SecAgg only the recovered sum exists
    numel = inputs.model_numel if fragment is None else fragment[1] - fragment[0]
    if not cfg.privacy.secagg:
        # the payloads, decoded as the aggregation needs them (a block of columns at a time
        # for the mean, median and trimmed mean: train/aggregate.py `EncodedRows`)
        codec = make_codec(cfg.comm.codec, cfg.comm.block_size)
        payloads = [unpack(read(digest))[0] for digest, _ in inputs.uploads]
        uploads = EncodedRows(codec, payloads, numel)
        weights = torch.tensor([float(tokens) for _, tokens in inputs.uploads])
    # plain aggregator, DP-FedAvg (clip + noise) or the SecAgg sum: hub/aggregation.py
    aggregated = aggregate(uploads, weights)
    pseudo_gradient, record = aggregated.pseudo_gradient, aggregated.record
    del uploads, aggregated  # the round's uploads, not needed past the aggregate
    theta = unpack_vector(read(inputs.base_weights_blob))
    momentum = unpack_vector(read(inputs.base_momentum_blob)) if inputs.base_momentum_blob else None
    residual = (
        unpack_vector(read(inputs.base_error_feedback_blob))
        if inputs.base_error_feedback_blob
        else None
    )
    # in place on the vectors just read: the step adds a few pieces, not a few models
    out = outer_update_(
        theta,
        pseudo_gradient,
        momentum,
        residual,
        lr=cfg.train.outer_lr,
        mu=cfg.train.outer_momentum,
        codec_down=cfg.comm.codec_down,
        block_size=cfg.comm.block_size,
        fragment=fragment,
    )
    del theta, momentum, residual, pseudo_gradient  # the outer step's inputs, before packing
    theta_new, encoded = out.theta, out.delta
    number = inputs.number
    delta_meta: dict[str, object] = {
        "codec": cfg.comm.codec_down,
        "numel": inputs.model_numel,
        "to": number,
    }
    if fragment is not None:
        delta_meta["fragment"] = list(fragment)  # the delta holds this slice only
    return NewVersion(
        key=inputs.key,
        number=number,
        weights_blob=write(pack_vector(theta_new, {"run_id": inputs.run_id, "version": number})),
        delta_blob=write(pack(encoded, delta_meta)),
        momentum_blob=write(pack_vector(out.momentum)),
        error_feedback_blob=write(pack_vector(out.residual)),
        val_loss=evaluate(theta_new),
        privacy=record,
    )
