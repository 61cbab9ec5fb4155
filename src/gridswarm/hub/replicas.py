"""What lets several hub processes (replicas) share one database: row locks, the ticker lease and
the watch that wakes long-polls for changes other replicas made.

- `lock_run` / `lock_runs`: `SELECT … FOR UPDATE` of runs' rows at the start of every transaction
  that changes a run's rounds, assignments or contributions, so replicas serialize per run (and a
  decision read under the lock cannot be stale). SQLite has no row locks and renders nothing: a
  single hub process there is serialized by the service's own lock and the database's one
  writer.
- `TickerLease`: only the replica holding a PostgreSQL session advisory lock runs the ticker's
  round work (screening, closing: the expensive part must not be done twice). The lock lives on
  one connection; when that process dies, PostgreSQL drops the connection and the lock, and the
  next replica to ask takes it over. A holder that hangs without dying (stopped, stuck) keeps
  its connection: when its lease connection has been silent for `stale_after_s`, the next
  replica to ask ends that database session (`pg_terminate_backend`), which frees the lock.
  Correctness never depends on the lease: a close still runs under the run's row lock and
  publishes only if the round is still the one it computed.
- `RoundWatch`: a long-poll sleeps on an in-process event; a close, replan or freed place made
  by another replica is seen here (a small signature per active run, read every tick) and wakes
  this replica's waiters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import NOT_ENDED, RunState
from gridswarm.hub.states import HOLDS_PLACE, RoundStatus
from gridswarm.protocol import NodeStatus

log = logging.getLogger("gridswarm.hub")

TICKER_LOCK_KEY = 0x67726964_7469636B & 0x7FFFFFFFFFFFFFFF  # "gridtick": the ticker lease
MIGRATION_LOCK_KEY = 0x67726964_6D696772  # "gridmigr": replicas starting at once migrate in turn
# a lease holder pings its lease connection every tick (0.25 s); one silent this long is hung. Long
# enough for the longest tick (a close's replay audits); taking over too early only means the
# round work is done twice for a while, never wrongly
TICKER_STALE_S = 120.0
# the session holding the ticker lease and how long its connection has been silent, in seconds
_LEASE_HOLDER = text(
    "SELECT l.pid, EXTRACT(EPOCH FROM clock_timestamp() - a.state_change) "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid = :hi AND l.objid = :lo"
)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def lock_run(s: Session, run_id: str) -> m.Run | None:
    """The run's row, locked until the transaction ends (fresh values, even if the session had
    loaded it before); None if there is no such run.

    `FOR NO KEY UPDATE`, the lock PostgreSQL itself takes to update a row without changing its
    key: two lockers of one run still queue (it conflicts with itself), but a plain insert of a
    row that references the run (a download counted, a nonce, a ledger entry) no longer waits
    for the lock holder: its foreign-key check takes `FOR KEY SHARE`, which `FOR UPDATE` blocks
    and this does not. Nothing here changes or deletes a run's id."""
    return s.scalars(
        select(m.Run)
        .where(m.Run.id == run_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).first()


def lock_runs(s: Session, run_ids: Iterable[str]) -> None:
    """Lock several runs' rows, always in id order, so two transactions that each need several
    never wait for each other in a cycle."""
    for run_id in sorted(set(run_ids)):
        lock_run(s, run_id)


class TickerLease:
    """Whether this process may run the ticker's round work: always on SQLite (one process),
    on PostgreSQL while it holds the session advisory lock `TICKER_LOCK_KEY` on its own
    connection. `held()` is asked every tick: it checks the connection still lives (a lost
    connection has lost the lock) and tries to take the lease when it is free."""

    def __init__(self, engine: Engine, stale_after_s: float = TICKER_STALE_S) -> None:
        self.engine = engine
        self.stale_after_s = stale_after_s
        self.single = is_sqlite(engine)
        self.conn: Connection | None = None
        self.terms = 0  # how many times this process took the lease (caches reload on a new one)

    def held(self) -> bool:
        if self.single:
            return True
        try:
            if self.conn is not None:
                self.conn.execute(text("SELECT 1"))
                return True
            conn = self.engine.connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": TICKER_LOCK_KEY})
            if got.scalar():
                conn.commit()  # the session lock outlives the transaction
                self.conn = conn
                self.terms += 1
                log.info("this hub replica runs the round ticker")
                return True
            conn.rollback()
            self._end_hung_holder(conn)
            conn.close()
            return False
        except SQLAlchemyError:
            self.release()
            return False

    def _end_hung_holder(self, conn: Connection) -> None:
        """End the lease holder's database session if its lease connection has been silent for
        `stale_after_s` (the process hangs but lives): its lock goes with it, and a replica takes
        the lease at a later tick. The hung process finds its connection gone when it wakes."""
        key = {"hi": TICKER_LOCK_KEY >> 32, "lo": TICKER_LOCK_KEY & 0xFFFFFFFF}
        holder = conn.execute(_LEASE_HOLDER, key).first()
        conn.rollback()
        if holder is None or holder[1] is None or float(holder[1]) < self.stale_after_s:
            return
        log.warning(
            "the ticker lease holder (database session %d) has been silent for %.0f s: ending "
            "its session so that another replica takes the lease",
            holder[0],
            float(holder[1]),
        )
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder[0]})
        conn.commit()

    def release(self) -> None:
        """Give the lease up (closing the connection releases the lock)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back to the pool with the lock held
                conn.close()
            except SQLAlchemyError:
                pass


class RoundWatch:
    """Per active run, a signature of what a waiting long-poll's answer depends on (run state,
    round, its status and attempt, places taken, live nodes); `changed` returns the runs whose
    signature moved since the last call. Two queries, whatever the number of nodes."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple] = {}

    def changed(self, s: Session, live_cutoff: float) -> list[str]:
        rows = s.execute(
            select(
                m.Run.id, m.Run.status, m.Run.round, m.Run.version, m.Round.status, m.Round.attempt
            )
            .join(m.Round, (m.Round.run_id == m.Run.id) & (m.Round.number == m.Run.round))
            .where(m.Run.status.in_(sorted(NOT_ENDED)))
        ).all()
        seats = dict(
            s.execute(
                select(m.Assignment.run_id, func.count())
                .join(
                    m.Run,
                    (m.Run.id == m.Assignment.run_id) & (m.Run.round == m.Assignment.round),
                )
                .where(
                    m.Run.status == RunState.ACTIVE, m.Assignment.status.in_(sorted(HOLDS_PLACE))
                )
                .group_by(m.Assignment.run_id)
            ).all()
        )
        live = s.scalar(
            select(func.count()).where(
                m.Node.last_seen_at >= live_cutoff, m.Node.status != NodeStatus.LEFT
            )
        )
        now = {}
        for run_id, *state in rows:
            pending = state[3] == RoundStatus.PENDING
            now[run_id] = (*state, seats.get(run_id, 0), live if pending else None)
        moved = [r for r, sig in now.items() if self.seen.get(r) not in (None, sig)]
        moved += [r for r in self.seen if r not in now]  # ended, or no longer listed
        self.seen = now
        return moved
