"""The trust rules of a live round (pure): who is audited, what is refused, who is selected, how
big the round's reward pool is. Data in, decisions out; the hub (hub/trust.py) does the I/O.

- Audit probability: `audit.audit_rate` with c/R = `cost_fraction`, no stake, and the node's
  reputation as the forfeit; newcomers and duplicated updates are always audited. It is zero when
  the hub cannot replay single contributions (`audit_skip_reason`).
- Energy floor: a contribution must report at least `energy_min_fraction` of what the meter's
  model path says its work drew at full load: threads × W per core × compute seconds, where the
  compute seconds are its train_time_s, or less if another node of the run was faster.
- Harm: a contribution that, applied alone to the base version, raises the held-out loss by more
  than `harm_tolerance_nats` is refused even unaudited.
- Selection: a node whose reputation weight is 0 (caught cheating) is excluded; when a round has
  fewer free slots than live candidates, nodes that have worked go first (a never-worked key is
  free to make), then better-reputed ones; and at most `round.max_newcomer_share` of a round's
  places go to never-worked nodes (`newcomer_places`, `newcomer_refusal`).
- Pool: the run's escrow spread over the rounds left (or a fixed amount per round), never more
  than the escrow holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gridswarm.trust.audit import AuditPolicy, audit_rate
from gridswarm.trust.reputation import Reputation, selection_weight

if TYPE_CHECKING:  # config.py asks `newcomer_places` while it validates: no import cycle
    from gridswarm.config import RunConfig, TrustConfig

EXCLUDED = "excluded: reputation 0 after a failed audit or a detected cheat"
NEWCOMER_PLACES_FULL = "waiting: the round's places for nodes that have not worked on this hub"
# float products such as 0.3 x 10 = 3.0000000000000004 must not round up to one more place;
# far above the float error of share x max_nodes for max_nodes <= 2**20
_SHARE_SLACK = 1e-9


def audit_policy(cfg: TrustConfig) -> AuditPolicy:
    return AuditPolicy(
        safety_factor=cfg.safety_factor,
        min_rate=cfg.audit_min_rate,
        newcomer_audits=cfg.newcomer_audits,
        reputation_value_rounds=cfg.reputation_value_rounds,
    )


def audit_probability(rep: Reputation, cfg: TrustConfig) -> float:
    """p for one contribution of a node with reputation `rep`, within the configured bounds.

    In reward units of one round (R = 1): cost c = cost_fraction, forfeit D = score × K, so
    p = safety × c / (1 + D), floored at audit_min_rate; newcomers get audit_max_rate.
    """
    if cfg.audit_max_rate == 0:
        return 0.0
    p = audit_rate(cfg.cost_fraction, 1.0, 0.0, rep, audit_policy(cfg))
    return min(cfg.audit_max_rate, max(cfg.audit_min_rate, p))


def secure_aggregation(cfg: RunConfig) -> bool:
    """True when the run aggregates under SecAgg (the hub never sees one node's update)."""
    privacy = getattr(cfg, "privacy", None)
    return getattr(privacy, "secagg", None) not in (None, False)


def audit_skip_reason(cfg: RunConfig) -> str | None:
    """Why contributions of this run cannot be replayed by the hub, or None when they can."""
    if secure_aggregation(cfg):
        return "secure aggregation: the hub sees only the sum, never one node's update"
    if cfg.data.data == "local":
        return "federated data: the node's data never leaves it, so the hub cannot replay"
    if cfg.comm.error_feedback:
        return "error feedback: the node's residual is private, so its encoding is not replayable"
    comm = getattr(cfg, "comm", None)
    if getattr(comm, "fragments", 1) > 1 or getattr(comm, "overlap", False):
        return "streaming: a node's local state persists across rounds"
    if getattr(getattr(cfg, "train", None), "keep_inner_optimizer", False):
        return "kept inner optimizer: a node's AdamW state persists across rounds"
    if cfg.trust.audit_max_rate == 0:
        return "audits turned off (trust.audit_max_rate = 0)"
    return None


def energy_floor_wh(threads: int, w_per_core: float, train_time_s: float) -> float:
    """The meter's model path at full load: threads × W per core × seconds, in Wh."""
    if threads < 1 or w_per_core < 0 or not math.isfinite(train_time_s) or train_time_s < 0:
        raise ValueError(
            f"bad energy model inputs: threads={threads}, w_per_core={w_per_core}, "
            f"train_time_s={train_time_s}"
        )
    return threads * w_per_core * train_time_s / 3600.0


def energy_floor_time_s(
    train_time_s: float, tokens: int, reference_tokens_per_s: float | None
) -> float:
    """Seconds of full-load compute the work must have taken: its claimed train_time_s, or less
    when another node of the run did tokens faster (a node that idles between steps, or waits
    for a shared core, computes for less than its wall time)."""
    if reference_tokens_per_s is None or reference_tokens_per_s <= 0:
        return train_time_s
    return min(train_time_s, tokens / reference_tokens_per_s)


def check_energy(
    energy_wh: float | None,
    threads: int,
    w_per_core: float,
    compute_s: float,
    min_fraction: float,
) -> str | None:
    """The reason to refuse an energy report below `min_fraction` of the model, else None.

    `compute_s` from `energy_floor_time_s`. The model's full-load figure overestimates a CPU
    that is not busy all the time (several threads on a small model, a shared machine), hence
    the tolerance; RAPL and NVML readings cover the whole package and come out higher.
    """
    if energy_wh is None or min_fraction == 0:
        return None
    model_wh = energy_floor_wh(threads, w_per_core, compute_s)
    floor_wh = min_fraction * model_wh
    if energy_wh < floor_wh:
        return (
            f"energy under-reported: {energy_wh:.6g} Wh claimed, but {threads} thread(s) x "
            f"{w_per_core:g} W/core x {compute_s:.3g} s of compute is {model_wh:.6g} Wh by the "
            f"meter model, and at least {min_fraction:.0%} of it ({floor_wh:.6g} Wh) is required"
        )
    return None


def check_harm(loss_drop: float, tolerance_nats: float) -> str | None:
    """The reason to refuse a contribution that raises the held-out loss too much, else None."""
    if not math.isfinite(loss_drop):
        return "harmful: applied alone it makes the held-out loss non-finite"
    if -loss_drop > tolerance_nats:
        return (
            f"harmful: applied alone it raises the held-out loss by {-loss_drop:.3f} nats "
            f"(tolerance {tolerance_nats:g})"
        )
    return None


def may_select(
    rep: Reputation,
    competitors: Sequence[Reputation],
    slots_left: int,
    worked: bool = True,
    competitors_worked: Sequence[bool] | None = None,
) -> str | None:
    """None if a node may take one of `slots_left` free places, else why not.

    `competitors`: reputations of the other live nodes without a place in this round yet;
    `worked` / `competitors_worked`: whether each has ever worked on this hub (hub/registration.py;
    all alike when not given). Nodes that have worked go first, then by reputation: a node
    identity that never worked (a key is free to make) never takes a place from one that has,
    even where their weights tie (audits off: every unaudited node weighs `newcomer_weight`) or
    the newcomer's floor weight is above a worked node's low score. Excluded nodes rank nowhere.
    """
    weight = selection_weight(rep)
    if weight <= 0:
        return EXCLUDED
    tiers = [worked] * len(competitors) if competitors_worked is None else competitors_worked
    better = 0
    worked_ahead = 0
    for other, other_worked in zip(competitors, tiers, strict=True):
        other_weight = selection_weight(other)
        if other_weight > 0 and (other_worked, other_weight) > (worked, weight):
            better += 1
            worked_ahead += other_worked and not worked
    if better >= slots_left:
        if worked_ahead:
            return (
                f"waiting: {better} node(s) that have worked on this hub or have higher "
                f"reputation for {slots_left} place(s)"
            )
        return f"waiting: {better} node(s) of higher reputation for {slots_left} place(s)"
    return None


def newcomer_places(share: float, max_nodes: int) -> int:
    """How many of a round's `max_nodes` places nodes that have never worked on this hub may
    hold together: ceil(share x max_nodes), so any share above 0 leaves newcomers at least one
    place (how a new node comes to have worked at all), and 1.0 is no cap. The share is the
    sponsor's `round.max_newcomer_share`; a share written in decimals gives the place count it
    reads as (0.3 of 10 is 3 places, not 4 from the float product)."""
    if not (math.isfinite(share) and 0 <= share <= 1) or max_nodes < 0:
        raise ValueError(f"bad newcomer cap inputs: share={share}, max_nodes={max_nodes}")
    return min(max_nodes, max(0, math.ceil(share * max_nodes - _SHARE_SLACK)))


def newcomer_refusal(worked: bool, newcomers_placed: int, places: int) -> str | None:
    """None if a node may take a place as far as the newcomer cap goes, else why it waits.

    `worked`: whether the node has worked on this hub (hub/registration.py `proven_nodes`);
    `newcomers_placed`: never-worked nodes holding a place in the round now; `places`:
    `newcomer_places`. A node that has worked is never refused by the cap; a never-worked one
    waits once the round's newcomer places are taken, as it waits for a full round (a place
    frees when a newcomer's assignment stops holding it: its work missed or released; the next
    round starts the count again)."""
    if worked or newcomers_placed < places:
        return None
    return (
        f"{NEWCOMER_PLACES_FULL} are taken ({newcomers_placed} of {places}, "
        f"round.max_newcomer_share)"
    )


def round_pool_units(available_units: int, per_round_units: int | None, rounds_left: int) -> int:
    """This round's reward pool: a fixed amount, or the escrow over the rounds left; never more
    than the escrow holds."""
    if available_units <= 0:
        return 0
    if per_round_units is not None:
        return min(per_round_units, available_units)
    return available_units // max(rounds_left, 1)
