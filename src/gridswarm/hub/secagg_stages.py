"""The pure rule of secure aggregation's stages (SecAgg+ over the hub's pull-based API): when a
stage moves on, waits, or fails. No SQL, no crypto: the round engine (`hub/engine.py`
`SecAggProgress`) composes it, and `hub/privacy.py` gathers the facts it reads.

    share -> mask -> unmask -> done

A stage advances when every expected node answered, or when the missing ones are lost (no
heartbeat) or its timeout passed and at most t nodes are missing in all; with more than t it
fails (the round is retrained with fresh keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# the stage a session moves to once the current one advanced ("done": the sum is recovered)
NEXT_STAGE = {"share": "mask", "mask": "unmask", "unmask": "done"}


class StageAction(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    FAIL = "fail"


@dataclass(frozen=True)
class StageProgress:
    """Where one SecAgg stage stands: who should answer, who did, who is gone."""

    stage: str  # share | mask | unmask
    n_nodes: int  # participants in the round's SecAggConfig
    max_dropouts: int  # t
    expected: frozenset[str]  # nodes that may still answer this stage
    answered: frozenset[str]
    lost: frozenset[str]  # expected nodes not heard from within the liveness window
    deadline_at: float


def decide_stage(p: StageProgress, now_s: float) -> tuple[StageAction, str | None]:
    """WAIT, ADVANCE to the next stage, or FAIL (with the reason) when more than t of the
    round's nodes are (or must end up) missing."""
    missing = p.expected - p.answered
    absent = p.n_nodes - len(p.answered)  # includes nodes that dropped at earlier stages
    best_case = p.n_nodes - len(p.answered | (missing - p.lost))

    def failure(count: int) -> tuple[StageAction, str]:
        return StageAction.FAIL, (
            f"secure aggregation failed at the {p.stage} stage: {count} of {p.n_nodes} nodes "
            f"dropped out, the round tolerates privacy.secagg.max_dropouts = {p.max_dropouts}; "
            f"the round is re-planned (retrained with fresh keys)"
        )

    if best_case > p.max_dropouts:
        return failure(best_case)
    if not missing or now_s >= p.deadline_at or missing <= p.lost:
        return (StageAction.ADVANCE, None) if absent <= p.max_dropouts else failure(absent)
    return StageAction.WAIT, None
