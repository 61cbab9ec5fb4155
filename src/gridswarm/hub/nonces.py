"""Replay protection for signed requests: each request's nonce may be used once.

`HubService.authenticate` verifies a request's signature and timestamp (identity.py) and then
consumes its nonce here, before the request has any effect. Nonces are stored in the database
(`nonces`, hub/store/nonces.py), so neither a restart nor another replica on the same database
reopens the replay window; a nonce older than twice the allowed clock skew can never be
accepted again (its timestamp is refused first), so those rows are pruned.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from gridswarm.hub.metrics import NO_METRICS, WorkObserver
from gridswarm.hub.store import nonces as nonce_store
from gridswarm.identity import AuthError


class NonceBook:
    """Nonces of accepted requests, stored in the database (a restart does not reopen the replay
    window) by group commit: the first request to arrive writes every nonce waiting at that
    moment in one transaction, the others wait for that commit. Under load this turns one fsync
    per request into one per batch; a request is never let through before its nonce is stored.
    A nonce seen before in this process is refused without touching the database."""

    def __init__(self, engine: Engine, max_skew_s: float) -> None:
        self.engine = engine
        self.window_s = 2 * max_skew_s  # older nonces can never be accepted again
        self.ready = threading.Condition()
        self.pending: list[tuple[dict, list]] = []  # (nonces row, its outcome)
        self.writing = False
        self.recent: dict[str, float] = {}
        self.pruned_at = 0.0
        self.observer: WorkObserver = NO_METRICS  # batch sizes, commit times (hub/metrics.py)

    def consume(self, nonce: str, public_key_hex: str, now: float) -> None:
        outcome: list = []  # filled with True (stored), False (replay) or an exception
        with self.ready:
            if nonce in self.recent:
                raise AuthError(409, "replayed request: nonce already used")
            self.recent[nonce] = now
            self.pending.append(
                ({"nonce": nonce, "public_key": public_key_hex, "seen_at": now}, outcome)
            )
            while not outcome:
                if self.writing:
                    self.ready.wait()
                    continue
                self.writing, batch, self.pending = True, self.pending, []
                self.ready.release()
                try:
                    started = time.perf_counter()
                    results = self._write([row for row, _ in batch], now)
                    self.observer.nonce_batch(len(batch), time.perf_counter() - started)
                except Exception as exc:  # handed to every request of the batch
                    results = [exc] * len(batch)
                finally:
                    self.ready.acquire()
                    self.writing = False
                for (_, waiting), result in zip(batch, results, strict=True):
                    waiting.append(result)
                self.ready.notify_all()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        if not outcome[0]:
            raise AuthError(409, "replayed request: nonce already used")

    def _write(self, rows: list[dict], now: float) -> list[bool]:
        """Store `rows` in one commit (one Core executemany INSERT: no ORM objects on this path,
        which every signed request takes); if one was stored before (a replay across a
        restart), row by row to tell which."""
        with self.engine.connect() as conn:  # a bare connection: no ORM session either
            try:
                nonce_store.insert_nonces(conn, rows)
                conn.commit()
                stored = [True] * len(rows)
            except IntegrityError:
                conn.rollback()
                stored = []
                for row in rows:
                    try:
                        nonce_store.insert_nonces(conn, row)
                        conn.commit()
                        stored.append(True)
                    except IntegrityError:
                        conn.rollback()
                        stored.append(False)
            if now - self.pruned_at >= 60:
                self.pruned_at = now
                nonce_store.prune_nonces(conn, now - self.window_s)
                conn.commit()
                with self.ready:
                    self.recent = {n: t for n, t in self.recent.items() if t >= now - self.window_s}
        return stored
