"""Heartbeat pacing: how often nodes must show they are alive, and how long silence may last.

A hub holding N live nodes that each send a heartbeat every 3 s answers N/3 heartbeats a second
before any work is done (at 1,000 nodes that was most of its requests and CPU,
bench/results/hub_load_replicas.md). So the hub tells every node the interval to use: 3 s
(`HEARTBEAT_MIN_S`, what nodes always did) while the swarm is small, growing with the number of
live nodes so that the whole swarm sends at most `budget_per_s` heartbeats a second, and never
above `HEARTBEAT_MAX_S`. Every signed request of a node counts as a sign of life (the hub notes
it when it authenticates the request), so a node beats only when it has had no answer from the
hub for one interval: a node long-polling or uploading needs no heartbeat beside it.

Liveness follows the interval: while it is the minimum, a node is lost after the operator's
`liveness_s` as before; above it, after `LIVENESS_BEATS` intervals (if longer). A node keeps
the interval it was told until its next heartbeat's answer, so the interval used for liveness is
the largest this hub advertised in the last `hold_s` seconds: a swarm that shrinks does not
make the nodes that were told a long interval look lost.

Pure bookkeeping, no database: the service feeds it the live-node count (one indexed count
every `COUNT_EVERY_S`, in the ticker) and asks it for the interval and the liveness window.
"""

from __future__ import annotations

import math
import threading

from gridswarm.protocol import DEFAULT_HEARTBEAT_S

HEARTBEAT_MIN_S = DEFAULT_HEARTBEAT_S  # the interval of a small swarm (what nodes always did)
HEARTBEAT_MAX_S = 60.0  # the longest interval the hub advertises
DEFAULT_BUDGET_PER_S = 100.0  # heartbeats a second the whole swarm may send (per hub)
LIVENESS_BEATS = 3.0  # a paced node is lost after this many intervals without a sign of life
COUNT_EVERY_S = 5.0  # how often the ticker recounts the live nodes
BUCKET_S = 10.0  # advertised intervals are remembered per bucket of this many seconds


def heartbeat_interval_s(live_nodes: int, budget_per_s: float) -> float:
    """Seconds between a node's heartbeats so that `live_nodes` send at most `budget_per_s` a
    second in all, within [HEARTBEAT_MIN_S, HEARTBEAT_MAX_S] (pure). A budget of 0 turns
    pacing off (always the minimum)."""
    if budget_per_s <= 0 or not math.isfinite(budget_per_s) or live_nodes <= 0:
        return HEARTBEAT_MIN_S
    return min(HEARTBEAT_MAX_S, max(HEARTBEAT_MIN_S, live_nodes / budget_per_s))


def liveness_for(interval_s: float, base_liveness_s: float) -> float:
    """How long a node told to beat every `interval_s` may stay silent before it is lost (pure):
    the operator's `base_liveness_s` at the minimum interval, else the longer of it and
    LIVENESS_BEATS intervals."""
    if interval_s <= HEARTBEAT_MIN_S:
        return base_liveness_s
    return max(base_liveness_s, LIVENESS_BEATS * interval_s)


class HeartbeatPacing:
    """The interval this hub advertises and the liveness window that goes with it.

    Thread-safe: request threads ask for the interval, the ticker updates the live count."""

    def __init__(self, base_liveness_s: float, budget_per_s: float = DEFAULT_BUDGET_PER_S) -> None:
        self.base_liveness_s = base_liveness_s
        self.budget_per_s = budget_per_s
        # a node told interval I is silent up to I after its last answer, and learns a new one
        # at its next beat: the longest interval told within this window bounds every silence
        self.hold_s = 2 * HEARTBEAT_MAX_S + base_liveness_s
        self._lock = threading.Lock()
        self.live_nodes = 0
        self.counted_at = -math.inf  # clock reading of the last count
        self._told: dict[int, float] = {}  # time bucket -> longest interval advertised in it

    def count_due(self, now: float) -> bool:
        """Whether the live nodes should be counted again (every COUNT_EVERY_S)."""
        return not (0 <= now - self.counted_at < COUNT_EVERY_S)

    def set_live(self, live_nodes: int, now: float) -> None:
        with self._lock:
            self.live_nodes, self.counted_at = max(0, int(live_nodes)), now

    def interval_s(self) -> float:
        """The interval for the current live count (not recorded as told)."""
        return heartbeat_interval_s(self.live_nodes, self.budget_per_s)

    def advertise(self, now: float) -> float:
        """The interval to tell a node now; remembered, so liveness allows for it."""
        interval = self.interval_s()
        if interval > HEARTBEAT_MIN_S:
            bucket = math.floor(now / BUCKET_S)
            with self._lock:
                if interval > self._told.get(bucket, 0.0):
                    self._told[bucket] = interval
        return interval

    def told_s(self, now: float) -> float:
        """The longest interval advertised within the last `hold_s` (at least the current)."""
        oldest = math.floor((now - self.hold_s) / BUCKET_S)
        with self._lock:
            for bucket in [b for b in self._told if b < oldest]:
                del self._told[bucket]
            told = max(self._told.values(), default=HEARTBEAT_MIN_S)
        return max(told, self.interval_s())

    def liveness_s(self, now: float) -> float:
        """How long a node may be silent now before it counts as lost."""
        return liveness_for(self.told_s(now), self.base_liveness_s)
