"""The statements that let hub replicas share one database (`hub/replicas.py`, `hub/server.py`):
runs' row locks, the advisory locks of the ticker lease and of migrations, and the reads of
`RoundWatch`. The caller owns each transaction and its commit or rollback."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, Row, func, select, text
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import NOT_ENDED, RunState
from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus

TICKER_LOCK_KEY = 0x67726964_7469636B & 0x7FFFFFFFFFFFFFFF  # "gridtick": the ticker lease
MIGRATION_LOCK_KEY = 0x67726964_6D696772  # "gridmigr": replicas starting at once migrate in turn
# the session holding the ticker lease and how long its connection has been silent, in seconds
_LEASE_HOLDER = text(
    "SELECT l.pid, EXTRACT(EPOCH FROM clock_timestamp() - a.state_change) "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid = :hi AND l.objid = :lo"
)


def lock_run(s: Session, run_id: str) -> m.Run | None:
    """The run's row, locked until the transaction ends (fresh values, even if the session had
    loaded it before); None if there is no such run.

    `FOR NO KEY UPDATE`, the lock PostgreSQL itself takes to update a row without changing its
    key: two lockers of one run still queue (it conflicts with itself), but a plain insert of a
    row that references the run (a download counted, a nonce, a ledger entry) no longer waits
    for the lock holder: its foreign-key check takes `FOR KEY SHARE`, which `FOR UPDATE` blocks
    and this does not. Nothing here changes or deletes a run's id. SQLite has no row locks and
    renders none: there the service's own lock and the database's one writer serialize."""
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


def lock_migrations(conn: Connection) -> None:
    """Wait for `MIGRATION_LOCK_KEY`, a PostgreSQL advisory lock held until `conn`'s
    transaction ends: replicas starting together migrate in turn."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})


def ping(conn: Connection) -> None:
    """`SELECT 1` on the lease connection: raises if it is lost (and its lock with it), and
    marks it active in `pg_stat_activity` (what `lease_holder` measures silence by)."""
    conn.execute(text("SELECT 1"))


def try_ticker_lock(conn: Connection) -> bool:
    """Try to take the session advisory lock `TICKER_LOCK_KEY` on `conn` (no wait): whether it
    was taken. The caller commits (the session lock outlives the transaction)."""
    got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": TICKER_LOCK_KEY})
    return bool(got.scalar())


def ticker_lock_holder(conn: Connection) -> Row | None:
    """(database session pid, seconds its connection has been silent) of the holder of
    `TICKER_LOCK_KEY`, or None when no one holds it (`pg_locks` joined to
    `pg_stat_activity`)."""
    key = {"hi": TICKER_LOCK_KEY >> 32, "lo": TICKER_LOCK_KEY & 0xFFFFFFFF}
    return conn.execute(_LEASE_HOLDER, key).first()


def end_backend(conn: Connection, pid: int) -> None:
    """End database session `pid` (`pg_terminate_backend`): a hung lease holder's, whose
    session locks go with it. The caller commits."""
    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def open_round_states(s: Session) -> Sequence[Row]:
    """(run id, run status, round, version, round status, attempt) of every run not ended,
    joined to its current round: `RoundWatch`'s first read."""
    return s.execute(
        select(m.Run.id, m.Run.status, m.Run.round, m.Run.version, m.Round.status, m.Round.attempt)
        .join(m.Round, (m.Round.run_id == m.Run.id) & (m.Round.number == m.Run.round))
        .where(m.Run.status.in_(sorted(NOT_ENDED)))
    ).all()


def places_taken(s: Session) -> dict[str, tuple[int, int]]:
    """Per active run, the assignments of its current round that hold a place: (assigned,
    submitted), one grouped count (an upload moves one from the first to the second)."""
    rows = s.execute(
        select(m.Assignment.run_id, m.Assignment.status, func.count())
        .join(
            m.Run,
            (m.Run.id == m.Assignment.run_id) & (m.Run.round == m.Assignment.round),
        )
        .where(m.Run.status == RunState.ACTIVE, m.Assignment.status.in_(sorted(HOLDS_PLACE)))
        .group_by(m.Assignment.run_id, m.Assignment.status)
    ).all()
    places: dict[str, tuple[int, int]] = {}
    for run_id, status, count in rows:
        assigned, submitted = places.get(run_id, (0, 0))
        if status == AssignmentStatus.SUBMITTED:
            submitted += count
        else:
            assigned += count
        places[run_id] = (assigned, submitted)
    return places
