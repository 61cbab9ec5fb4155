"""What a batch of uploads reads once, not once per upload.

`Uploads.store_uploads` (hub/uploads.py) decides a run's uploads in one transaction under the
run's lock (`RunBatcher` gathers them). Two of the facts each upload is judged on are the same
query for every upload of the batch:

- `EnergyWindow`: the run's newest contributions, from which the energy floor's fastest other
  node (`HubTrust.energy_facts`: the fastest tokens/s among the newest `ENERGY_WINDOW`
  contributions of the run's other nodes) is computed for each node of the batch;
- `ReplayIndex`: the run's earlier contributions that carry one of the batch's update digests
  (`HubTrust.screen_submission`'s replay check), in one `IN` query.

Each is read once per batch, when the first upload needs it (a batch refused before that
costs nothing), again after a refusal (which may have committed the batch's transaction), and
kept current as the batch's own uploads are stored (`add`, after each upload's savepoint is
released), so every upload is judged on what one query of its own would have read at that
moment. The answers equal the one-by-one queries' (tests/hub/test_upload_facts.py); where the
window cannot tell (it holds fewer than `ENERGY_WINDOW` rows of the node's others), the caller
asks the database for that node alone, as before.
(Before: two queries per upload under the lock, ~0.9 ms of hub CPU of an upload's ~6;
bench/results/hub_request_cost_batch.md.)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from . import models as m
from .store import upload_facts as store

ENERGY_WINDOW = 32  # the energy floor's fastest other: over the newest 32 of other nodes
WINDOW_SLACK = 32  # rows read beyond ENERGY_WINDOW, for the batch's nodes' own rows


@dataclass
class EnergyWindow:
    """The newest contributions of one run, newest first: (created_at, node_id, tokens/s or
    None when its train time is not positive). `complete`: these are all of the run's."""

    rows: list[tuple[float, str, float | None]]
    complete: bool

    @classmethod
    def read(cls, s: Session, run_id: str) -> EnergyWindow:
        """The run's newest ENERGY_WINDOW + WINDOW_SLACK contributions, in one query."""
        limit = ENERGY_WINDOW + WINDOW_SLACK
        found = store.newest_contributions(s, run_id, limit)
        rows = [(at, node, rate(tokens, time_s)) for at, node, tokens, time_s in found]
        return cls(rows, complete=len(rows) < limit)

    def fastest_other(self, node_id: str) -> tuple[bool, float | None]:
        """(known, the fastest tokens/s among the newest ENERGY_WINDOW contributions of nodes
        other than `node_id`); known is False when the window holds too few of them to tell
        (the caller then queries for this node alone)."""
        taken, fastest = 0, None
        for _at, node, speed in self.rows:
            if node == node_id:
                continue
            taken += 1
            if speed is not None and (fastest is None or speed > fastest):
                fastest = speed
            if taken == ENERGY_WINDOW:
                return True, fastest
        return self.complete, fastest

    def add(self, c: m.Contribution) -> None:
        """A contribution the batch just stored, in its place by `created_at` (one is left out
        when the window is partial and it is older than all of it: it is not among the
        newest)."""
        at = -c.created_at  # the rows are newest first: ascending in -created_at
        keys = [-row[0] for row in self.rows]
        place = bisect.bisect_right(keys, at)
        if place == len(self.rows) and not self.complete:
            return
        self.rows.insert(place, (c.created_at, c.node_id, rate(c.tokens, c.train_time_s)))


def rate(tokens: float, train_time_s: float) -> float | None:
    """Tokens per second of one contribution; None when its train time is not positive."""
    return tokens / train_time_s if train_time_s > 0 else None


@dataclass(frozen=True)
class Prior:
    """An earlier contribution of the run that carries a given update digest."""

    id: str
    node_id: str
    round: int


@dataclass
class ReplayIndex:
    """The run's contributions that carry one of a batch's update digests, by digest."""

    priors: dict[str, list[Prior]] = field(default_factory=dict)

    @classmethod
    def read(cls, s: Session, run_id: str, digests: list[str]) -> ReplayIndex:
        """The run's contributions whose update digest is one of `digests`, in one query."""
        index = cls()
        if not digests:
            return index
        rows = store.contributions_with_digests(s, run_id, digests)
        for digest, contribution_id, node_id, round_number in rows:
            prior = Prior(contribution_id, node_id, round_number)
            index.priors.setdefault(digest, []).append(prior)
        return index

    def replayed(self, digest: str, node_id: str, round_number: int) -> Prior | None:
        """The earlier contribution that makes an upload of `node_id` for round `round_number`
        with update `digest` a replay, or None: among the earliest round's contributions with
        that digest (the one-by-one check's `ORDER BY round LIMIT 1`), one of another round or
        of the same node."""
        priors = self.priors.get(digest)
        if not priors:
            return None
        first = min(p.round for p in priors)
        for prior in priors:
            if prior.round == first and (prior.round != round_number or prior.node_id == node_id):
                return prior
        return None

    def add(self, c: m.Contribution) -> None:
        """A contribution the batch just stored."""
        if c.update_sha256 is not None:
            self.priors.setdefault(c.update_sha256, []).append(Prior(c.id, c.node_id, c.round))


@dataclass
class UploadFacts:
    """A batch's `EnergyWindow` and `ReplayIndex`, each read when first needed. `digests`: the
    batch's non-zero update digests (an all-zero update may repeat: never looked up)."""

    run_id: str
    digests: list[str]
    _energy: EnergyWindow | None = None
    _replays: ReplayIndex | None = None

    def energy(self, s: Session) -> EnergyWindow:
        if self._energy is None:
            self._energy = EnergyWindow.read(s, self.run_id)
        return self._energy

    def replays(self, s: Session) -> ReplayIndex:
        if self._replays is None:
            self._replays = ReplayIndex.read(s, self.run_id, self.digests)
        return self._replays

    def forget(self) -> None:
        """Read both again when next needed: the batch's transaction was committed by a
        refusal (its strike, a MarkLate), and another replica may have stored since."""
        self._energy = self._replays = None

    def add(self, c: m.Contribution) -> None:
        """A contribution the batch stored (its savepoint released): later uploads see it."""
        if self._energy is not None:
            self._energy.add(c)
        if self._replays is not None:
            self._replays.add(c)
