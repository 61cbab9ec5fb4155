"""The hub's PostgreSQL pool pings only connections that sat idle (hub/server.py
`ping_when_idle`): one in steady use costs no round trip, one whose server side died while idle
is replaced before a transaction uses it. Real PostgreSQL (the session's server)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from gridswarm.hub.server import make_engine

pytestmark = pytest.mark.postgres


def test_only_idle_connections_are_pinged_and_a_dead_one_is_replaced(pg_database: str) -> None:
    engine = make_engine(pg_database)
    pings = []
    ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda conn: pings.append(conn) or ping(conn)  # counted, then done
    try:
        for _ in range(5):  # steady use: no ping
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert pings == []
        # the server ends the pooled connection while it is idle (a restart, a firewall)
        with make_engine(pg_database).connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        record = engine.pool._pool.queue[0]  # the idle one: pretend it sat idle a while
        record.info["idle_since"] -= 3600
        with engine.connect() as conn:  # pinged, found dead, replaced: the query succeeds
            new_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert new_pid != pid
        assert len(pings) == 1
    finally:
        engine.dispose()
