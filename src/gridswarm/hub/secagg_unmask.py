"""The unmask of a SecAgg round (SecAgg+ over the hub's pull-based API): the stored stage
messages replayed through `SecAggServer`, every masked input read and every mask removed, so
that only the sum of the survivors' updates is left. It is the heavy part of a SecAgg round
(a model-sized PRG stream per survivor and per pair with a dropped node), so it takes no
session and no lock: `hub/privacy.py` reads its inputs (`UnmaskInputs`) in a session, and the
ticker (hub/ticker.py `_prepare_close`) computes it beside the requests, or, when what it was
computed from changed meanwhile, `HubPrivacy.advance_secagg` computes it again under the lock.

`UnmaskOutcome` is what the round engine's next event is built from (`SecAggRecovered` or
`SecAggFailed`), with the recovered sum's blob already stored (blobs before any row names them)
and the key it was computed from (`unmask_key`): an outcome is taken under the lock only when
that key is still the round's. Within one attempt a session's config and its advertise, share
and masked messages no longer change once it is at the unmask stage (a stage takes only its own
answers, and a failure deletes them all and starts the next attempt), so the key is the round,
the attempt and the unmask answers received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gridswarm.privacy.secagg import (
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    SecAggServer,
    decode_message,
)
from gridswarm.train.params import pack_vector

UnmaskKey = tuple[str, int, int, tuple[tuple[str, str], ...]]
"""(run id, round number, attempt, the sorted (node id, stored body) of each unmask answer)."""


def unmask_key(
    run_id: str, round_number: int, attempt: int, unmask: Mapping[str, str]
) -> UnmaskKey:
    """What an unmask is computed from, as far as it can still change at the unmask stage: an
    outcome computed outside the lock is taken under it only when this is the same there."""
    return (run_id, round_number, attempt, tuple(sorted(unmask.items())))


@dataclass(frozen=True)
class UnmaskInputs:
    """A SecAgg session's stored stage messages (node id -> stored body; a masked input's body
    is its blob's digest), read in one session for the unmask."""

    key: UnmaskKey
    config: SecAggConfig
    advertise: Mapping[str, str]
    shares: Mapping[str, str]
    masked: Mapping[str, str]
    unmask: Mapping[str, str]


@dataclass(frozen=True)
class UnmaskOutcome:
    """An unmask's result: the sum recovered (`sum_blob` stored; `survivors` in it, `dropped`:
    the participants it was recovered without) or the `error` that ended it (`SecAggError`)."""

    key: UnmaskKey
    participants: int  # the config's nodes (DP-FedAvg's denominator under SecAgg)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    sum_blob: str | None = None
    error: str | None = None


def unmask_sum(inputs: UnmaskInputs, read: Callable[[str], bytes]) -> SecAggResult:
    """Replay the stored messages through `SecAggServer` and remove every mask (`read`: a
    masked input's blob by its digest). Raises `SecAggError` when the sum cannot be recovered
    (too many dropouts, a share that fails its commitment)."""
    config = inputs.config
    server = SecAggServer(config)
    adv = inputs.advertise
    server.collect_keys(decode_message(adv[n].encode()) for n in config.node_ids if n in adv)
    server.collect_shares(decode_message(b.encode()) for b in inputs.shares.values())
    server.collect_masked(MaskedInput(nid, read(digest)) for nid, digest in inputs.masked.items())
    return server.collect_unmask(decode_message(b.encode()) for b in inputs.unmask.values())


def unmask_outcome(
    inputs: UnmaskInputs, read: Callable[[str], bytes], write: Callable[[bytes], str]
) -> UnmaskOutcome:
    """The unmask (`unmask_sum`) as an outcome: the recovered sum packed and stored (`write`
    answers its digest), or the `SecAggError` that ended it."""
    participants = len(inputs.config.node_ids)
    try:
        result = unmask_sum(inputs, read)
    except SecAggError as exc:
        return UnmaskOutcome(inputs.key, participants, error=str(exc))
    sum_blob = write(pack_vector(result.total, {"secagg": "sum"}))
    return UnmaskOutcome(
        inputs.key, participants, result.survivors, result.dropped, sum_blob=sum_blob
    )
