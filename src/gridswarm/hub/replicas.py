"""What lets several hub processes (replicas) share one database: row locks, the ticker lease and
the watch that wakes long-polls for changes other replicas made.

- `lock_run` / `lock_runs` (hub/store/locks.py): `SELECT … FOR UPDATE` of runs' rows at the
  start of every transaction that changes a run's rounds, assignments or contributions, so
  replicas serialize per run (and a decision read under the lock cannot be stale). SQLite has
  no row locks and renders nothing: a single hub process there is serialized by the service's
  own lock and the database's one writer.
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

Their statements are in hub/store/locks.py; this module decides when to send them.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gridswarm.hub.states import RoundStatus
from gridswarm.hub.store import locks as store
from gridswarm.hub.store.nodes import count_live_nodes

# re-exported: hub/trust.py imports it from here (its own move is another change)

log = logging.getLogger("gridswarm.hub")

# a lease holder pings its lease connection every tick (0.25 s); one silent this long is hung. Long
# enough for the longest tick (a close's replay audits); taking over too early only means the
# round work is done twice for a while, never wrongly
TICKER_STALE_S = 120.0


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class TickerLease:
    """Whether this process may run the ticker's round work: always on SQLite (one process),
    on PostgreSQL while it holds the session advisory lock `store.locks.TICKER_LOCK_KEY` on its own
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
                store.ping(self.conn)
                return True
            conn = self.engine.connect()
            if store.try_ticker_lock(conn):
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
        holder = store.ticker_lock_holder(conn)
        conn.rollback()
        if holder is None or holder[1] is None or float(holder[1]) < self.stale_after_s:
            return
        log.warning(
            "the ticker lease holder (database session %d) has been silent for %.0f s: ending "
            "its session so that another replica takes the lease",
            holder[0],
            float(holder[1]),
        )
        store.end_backend(conn, holder[0])
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
    """Per active run, a signature of what a waiting long-poll's answer and the round ticker's
    decision depend on (run state, round, its status and attempt, places taken and submitted,
    live nodes); `changed` returns the runs whose signature moved since the last call (the
    ticker advances them: hub/tick_schedule.py). Three queries, whatever the number of nodes."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple] = {}

    def changed(self, s: Session, live_cutoff: float) -> list[str]:
        rows = store.open_round_states(s)
        seats = store.places_taken(s)
        live = count_live_nodes(s, live_cutoff)
        now = {}
        for run_id, *state in rows:
            pending = state[3] == RoundStatus.PENDING
            now[run_id] = (*state, seats.get(run_id, (0, 0)), live if pending else None)
        moved = [r for r, sig in now.items() if self.seen.get(r) not in (None, sig)]
        moved += [r for r in self.seen if r not in now]  # ended, or no longer listed
        self.seen = now
        return moved
