"""The embedded ledger: an append-only, hash-chained, signed log in the hub's SQL database.

Rules (entry format, checkpoints, verification) live in `chain.py`; this module stores and reads.
Appends run in one transaction per batch: read the head, seal the entries (hub-signed ones are
signed here; node claims arrive already signed), insert them with one executemany. `seq` is the
primary key and `prev_hash` is unique, so two hub workers that read the same head cannot both
commit: the loser gets an IntegrityError (or, on SQLite, a lock error), rolls back, and retries on
the new head. The chain never forks. On PostgreSQL an append first takes a transaction advisory
lock (`LEDGER_LOCK_KEY`), so appenders in several processes (hub replicas) queue for the head
instead of losing the race inside a caller's transaction.

Works on SQLite and PostgreSQL (SQLAlchemy 2.x Core for the hot paths).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Mapped, mapped_column

from gridswarm.db import Base
from gridswarm.identity import Identity
from gridswarm.ledger.balances import Balances, fold_balances
from gridswarm.ledger.chain import (
    DEFAULT_CHECKPOINT_EVERY,
    GENESIS_PREV_HASH,
    HUB_KINDS,
    KIND_CHECKPOINT,
    KIND_GENESIS,
    RESERVED_KINDS,
    SCOPE_CLAIM,
    ChainVerifier,
    Entry,
    LedgerError,
    SignedClaim,
    VerifyReport,
    canonical_json,
    check_kind,
    checkpoint_payload,
    genesis_payload,
    is_checkpoint_seq,
    seal_claim,
    seal_hub_entry,
)
from gridswarm.ledger.merkle import MerkleTree, sha256

LEDGER_LOCK_KEY = 0x6C656467_65726864  # "ledgerhd": the transaction lock on the chain's head
HubItem = tuple[str, Mapping[str, Any]]
"""(kind, payload): an entry the hub writes and signs."""


class _Bytes(TypeDecorator[bytes]):
    """LargeBinary (BLOB / BYTEA) passed to the driver as plain bytes: sqlite3 and psycopg take
    bytes directly, and skipping SQLAlchemy's per-value wrapper makes bulk appends ~25 % faster."""

    impl = LargeBinary
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None


class LedgerEntryRow(Base):
    """One ledger entry. Hashes, keys and signatures are raw bytes (BLOB / BYTEA)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("prev_hash", name="uq_ledger_entries_prev_hash"),
        UniqueConstraint("entry_hash", name="uq_ledger_entries_entry_hash"),
        UniqueConstraint("claim_digest", name="uq_ledger_entries_claim_digest"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    payload_json: Mapped[str] = mapped_column(Text)
    author: Mapped[bytes] = mapped_column(_Bytes(32))
    prev_hash: Mapped[bytes] = mapped_column(_Bytes(32))
    entry_hash: Mapped[bytes] = mapped_column(_Bytes(32))
    signature: Mapped[bytes] = mapped_column(_Bytes(64))
    scope: Mapped[int] = mapped_column(SmallInteger)
    claim_digest: Mapped[bytes | None] = mapped_column(_Bytes(32), nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


TABLE = LedgerEntryRow.__table__
_COLUMNS = (
    TABLE.c.seq,
    TABLE.c.kind,
    TABLE.c.payload_json,
    TABLE.c.author,
    TABLE.c.prev_hash,
    TABLE.c.entry_hash,
    TABLE.c.signature,
    TABLE.c.scope,
    TABLE.c.created_ms,
)


class DuplicateClaimError(LedgerError):
    """The same signed claim is already on the ledger (a replay)."""


class LedgerConflictError(LedgerError):
    """Concurrent appenders kept winning the race; the batch was not written."""


@dataclass(frozen=True)
class CheckpointProof:
    """Inclusion of one entry in the Merkle root of the checkpoint that covers it."""

    seq: int
    entry_hash: bytes
    checkpoint_seq: int
    merkle_root: bytes
    proof: tuple[bytes, ...]


def _row_to_entry(row: Any) -> Entry:
    return Entry(
        seq=row.seq,
        kind=row.kind,
        payload_json=row.payload_json,
        author=bytes(row.author),
        prev_hash=bytes(row.prev_hash),
        entry_hash=bytes(row.entry_hash),
        signature=bytes(row.signature),
        scope=row.scope,
        created_ms=row.created_ms,
    )


def _entry_to_row(e: Entry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "kind": e.kind,
        "payload_json": e.payload_json,
        "author": e.author,
        "prev_hash": e.prev_hash,
        "entry_hash": e.entry_hash,
        "signature": e.signature,
        "scope": e.scope,
        "claim_digest": e.digest if e.scope == SCOPE_CLAIM else None,
        "created_ms": e.created_ms,
    }


def _item_entries(sealed: list[Entry]) -> list[Entry]:
    """The entries written for the caller's items (without genesis and checkpoints)."""
    return [e for e in sealed if e.kind not in RESERVED_KINDS]


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text)


def create_tables(engine: Engine) -> None:
    """Create the ledger table outside Alembic (benchmarks, standalone tools, tests)."""
    Base.metadata.create_all(engine, tables=[TABLE])


def sqlite_engine(path: str, synchronous: str = "FULL", **kwargs: Any) -> Engine:
    """An SQLite engine in WAL mode; synchronous=FULL makes every commit durable (as the hub's)."""
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"unknown SQLite synchronous mode {synchronous!r}")
    engine = create_engine(f"sqlite:///{path}", **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()

    return engine


class Ledger:
    """Append, read, verify and fold the ledger stored in `engine`'s database.

    `hub` signs what the hub writes (genesis, checkpoints, rounds, rewards ...); it may be None for
    a read-only ledger (verify, show, balances). `checkpoint_every` is fixed by the genesis entry
    when the ledger is created; passing a different value for an existing ledger is an error.
    """

    def __init__(
        self,
        engine: Engine,
        hub: Identity | None = None,
        *,
        checkpoint_every: int | None = None,
        run_id: str | None = None,
        clock: Callable[[], float] = time.time,
        max_retries: int = 200,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.run_id = run_id
        self.clock = clock
        self.max_retries = max_retries
        self._requested_checkpoint_every = checkpoint_every
        self._checkpoint_every: int | None = None

    # ---- writing -------------------------------------------------------------------------------

    def append(
        self, kind: str, payload: Mapping[str, Any], *, conn: Connection | None = None
    ) -> Entry:
        """Write one hub-signed entry; returns it sealed (seq, hashes, signature)."""
        return _item_entries(self.append_many([(kind, payload)], conn=conn))[-1]

    def append_claim(
        self,
        claim: SignedClaim,
        *,
        conn: Connection | None = None,
        signatures_checked: bool = False,
    ) -> Entry:
        """Write one entry signed by its author (a node's contribution claim, a sponsor's fund)."""
        sealed = self.append_many([claim], conn=conn, signatures_checked=signatures_checked)
        return _item_entries(sealed)[-1]

    def append_many(
        self,
        items: Iterable[HubItem | SignedClaim],
        *,
        conn: Connection | None = None,
        signatures_checked: bool = False,
    ) -> list[Entry]:
        """Write a batch in one transaction; returns the sealed entries (incl. any checkpoints).

        Items are (kind, payload) pairs for the hub to sign, or SignedClaim objects (checked here:
        bad signature, reserved kind or replayed claim -> LedgerError, nothing written). Pass
        `signatures_checked=True` when the caller already ran `claim.check()` on each claim (the
        hub does, to answer a bad claim with a 4xx): Ed25519 verification is then not repeated
        (`verify` still checks every signature). With `conn`, the batch joins the caller's
        transaction and a lost race raises IntegrityError for the caller to retry; without it,
        the ledger commits and retries by itself.
        """
        prepared = self._prepare(items, signatures_checked)
        if not prepared:
            return []
        if conn is not None:
            return self._append_in(conn, prepared)
        last_error: Exception | None = None
        for attempt in range(self.max_retries):
            try:
                with self.engine.begin() as c:
                    return self._append_in(c, prepared)
            except (IntegrityError, OperationalError) as exc:
                if not _is_retryable(exc):
                    raise
                last_error = exc
                time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        raise LedgerConflictError(
            f"gave up after {self.max_retries} concurrent-append conflicts: {last_error}"
        )

    def _prepare(
        self, items: Iterable[HubItem | SignedClaim], signatures_checked: bool = False
    ) -> list[tuple[str, str] | SignedClaim]:
        if self.hub is None:
            raise LedgerError("this ledger was opened without a hub identity: it is read-only")
        prepared: list[tuple[str, str] | SignedClaim] = []
        seen: set[bytes] = set()
        for item in items:
            if isinstance(item, SignedClaim):
                item.check(signature=not signatures_checked)
                if item.digest in seen:
                    raise DuplicateClaimError(
                        f"the same {item.kind!r} claim appears twice in a batch"
                    )
                seen.add(item.digest)
                prepared.append(item)
            else:
                kind, payload = item
                if check_kind(kind) in RESERVED_KINDS:
                    raise LedgerError(f"kind {kind!r} is written by the ledger itself")
                prepared.append((kind, canonical_json(payload)))
        return prepared

    def _append_in(
        self, conn: Connection, items: list[tuple[str, str] | SignedClaim]
    ) -> list[Entry]:
        assert self.hub is not None
        hub = self.hub
        now_ms = int(self.clock() * 1000)
        if conn.dialect.name == "postgresql":
            # one appender at a time across processes (hub replicas): the head read below is
            # the head this batch extends; the lock is released when the transaction ends
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LEDGER_LOCK_KEY})
        self._refuse_replayed_claims(conn, [i for i in items if isinstance(i, SignedClaim)])
        head = conn.execute(
            select(TABLE.c.seq, TABLE.c.entry_hash).order_by(TABLE.c.seq.desc()).limit(1)
        ).first()
        sealed: list[Entry] = []
        if head is None:
            every = self._requested_checkpoint_every or DEFAULT_CHECKPOINT_EVERY
            payload = genesis_payload(hub.public_key, every, self.run_id)
            sealed.append(seal_hub_entry(0, GENESIS_PREV_HASH, KIND_GENESIS, payload, hub, now_ms))
            seq, prev = 1, sealed[0].entry_hash
        else:
            every = self._checkpoint_interval(conn)
            seq, prev = head.seq + 1, bytes(head.entry_hash)
        batch_hashes: dict[int, bytes] = {e.seq: e.entry_hash for e in sealed}

        def push(entry: Entry) -> None:
            nonlocal seq, prev
            sealed.append(entry)
            batch_hashes[entry.seq] = entry.entry_hash
            seq, prev = seq + 1, entry.entry_hash

        def checkpoint_if_due() -> None:
            if is_checkpoint_seq(seq, every):
                push(self._seal_checkpoint(conn, seq, prev, every, batch_hashes, now_ms))

        checkpoint_if_due()
        for item in items:
            if isinstance(item, SignedClaim):
                push(seal_claim(seq, prev, item, now_ms))
            else:
                push(seal_hub_entry(seq, prev, item[0], item[1], hub, now_ms))
            checkpoint_if_due()
        conn.execute(insert(TABLE), [_entry_to_row(e) for e in sealed])
        if head is None:
            self._checkpoint_every = every
        return sealed

    def _seal_checkpoint(
        self,
        conn: Connection,
        seq: int,
        prev: bytes,
        every: int,
        batch_hashes: dict[int, bytes],
        now_ms: int,
    ) -> Entry:
        start = seq - every
        hashes = self._hashes_between(conn, start - 1 if start > 0 else start, seq, batch_hashes)
        prev_checkpoint = hashes.pop(start - 1, None)
        segment = [hashes[s] for s in range(start, seq)]
        payload = checkpoint_payload(start, segment, prev_checkpoint)
        assert self.hub is not None
        return seal_hub_entry(seq, prev, KIND_CHECKPOINT, payload, self.hub, now_ms)

    @staticmethod
    def _hashes_between(
        conn: Connection, lo: int, hi: int, batch_hashes: dict[int, bytes]
    ) -> dict[int, bytes]:
        """Entry hashes for seq in [lo, hi), from this batch or the database."""
        found = {s: h for s, h in batch_hashes.items() if lo <= s < hi}
        missing_hi = min(found, default=hi)
        if lo < missing_hi:
            rows = conn.execute(
                select(TABLE.c.seq, TABLE.c.entry_hash).where(
                    TABLE.c.seq >= lo, TABLE.c.seq < missing_hi
                )
            )
            found.update({r.seq: bytes(r.entry_hash) for r in rows})
        return found

    @staticmethod
    def _refuse_replayed_claims(conn: Connection, claims: Sequence[SignedClaim]) -> None:
        digests = [c.digest for c in claims]
        for i in range(0, len(digests), 500):
            chunk = digests[i : i + 500]
            hit = conn.execute(
                select(TABLE.c.seq, TABLE.c.kind).where(TABLE.c.claim_digest.in_(chunk)).limit(1)
            ).first()
            if hit is not None:
                raise DuplicateClaimError(
                    f"replayed claim: the same signed {hit.kind!r} claim is already entry {hit.seq}"
                )

    def _checkpoint_interval(self, conn: Connection | None = None) -> int:
        if self._checkpoint_every is None:
            query = select(TABLE.c.payload_json).where(TABLE.c.seq == 0)
            if conn is None:
                with self.engine.connect() as c:
                    row = c.execute(query).first()
            else:
                row = conn.execute(query).first()
            if row is None:
                raise LedgerError("ledger is empty: no genesis entry yet")
            every = int(json.loads(row.payload_json)["checkpoint_every"])
            wanted = self._requested_checkpoint_every
            if wanted is not None and wanted != every:
                raise LedgerError(f"ledger was created with checkpoint_every={every}, not {wanted}")
            self._checkpoint_every = every
        return self._checkpoint_every

    # ---- reading -------------------------------------------------------------------------------

    def head(self) -> Entry | None:
        """The last entry, or None for an empty ledger."""
        with self.engine.connect() as c:
            row = c.execute(select(*_COLUMNS).order_by(TABLE.c.seq.desc()).limit(1)).first()
        return None if row is None else _row_to_entry(row)

    def get(self, seq: int) -> Entry:
        with self.engine.connect() as c:
            row = c.execute(select(*_COLUMNS).where(TABLE.c.seq == seq)).first()
        if row is None:
            raise KeyError(f"no ledger entry with seq {seq}")
        return _row_to_entry(row)

    def __len__(self) -> int:
        head = self.head()
        return 0 if head is None else head.seq + 1

    def entries(
        self,
        start_seq: int = 0,
        end_seq: int | None = None,
        kind: str | None = None,
        chunk: int = 5000,
    ) -> Iterator[Entry]:
        """Entries in seq order from `start_seq` up to (excluding) `end_seq`, read in chunks."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        cursor = start_seq
        while True:
            query = select(*_COLUMNS).where(TABLE.c.seq >= cursor)
            if end_seq is not None:
                query = query.where(TABLE.c.seq < end_seq)
            if kind is not None:
                query = query.where(TABLE.c.kind == kind)
            with self.engine.connect() as c:
                rows = c.execute(query.order_by(TABLE.c.seq).limit(chunk)).all()
            if not rows:
                return
            for row in rows:
                yield _row_to_entry(row)
            if len(rows) < chunk:
                return
            cursor = rows[-1].seq + 1

    def verify(
        self,
        *,
        hub_public_key: bytes | None = None,
        anchors: Mapping[int, bytes] | None = None,
        chunk: int = 5000,
    ) -> VerifyReport:
        """Re-check the whole chain (hashes, links, signatures, checkpoints, anchors), streaming.

        Returns a report whose `first_bad_seq` and `reason` name the first entry that was altered,
        removed, inserted or reordered. `hub_public_key` pins the expected hub (else genesis names
        it); `anchors` maps checkpoint seq -> Merkle root read back from the chain.
        """
        verifier = ChainVerifier(hub_public_key=hub_public_key, anchors=dict(anchors or {}))
        for entry in self.entries(chunk=chunk):
            if not verifier.feed(entry):
                break
        return verifier.finish()

    def balances(self) -> Balances:
        """Token balances as a fold over the whole log (see balances.py)."""
        return fold_balances(self.entries())

    def checkpoint_proof(self, seq: int) -> CheckpointProof | None:
        """Merkle proof that entry `seq` is under its checkpoint's root (None: not yet covered)."""
        every = self._checkpoint_interval()
        if is_checkpoint_seq(seq, every):
            raise ValueError(f"entry {seq} is itself a checkpoint, not covered by one")
        checkpoint_seq = (seq // (every + 1) + 1) * (every + 1) - 1
        try:
            checkpoint = self.get(checkpoint_seq)
        except KeyError:
            return None
        start = checkpoint.payload["from_seq"]
        segment = list(self.entries(start, checkpoint_seq))
        tree = MerkleTree([e.entry_hash for e in segment], sha256)
        index = seq - start
        return CheckpointProof(
            seq=seq,
            entry_hash=segment[index].entry_hash,
            checkpoint_seq=checkpoint_seq,
            merkle_root=tree.root,
            proof=tuple(tree.proof(index)),
        )

    @property
    def checkpoint_every(self) -> int:
        return self._checkpoint_interval()


def open_ledger(
    url_or_engine: str | Engine,
    hub: Identity | None = None,
    *,
    create: bool = True,
    **kwargs: Any,
) -> Ledger:
    """A Ledger over a database URL (or engine); creates the table unless `create=False`.

    For the hub, whose schema Alembic manages, prefer `Ledger(engine, hub)` directly.
    """
    if isinstance(url_or_engine, str):
        if url_or_engine.startswith("sqlite:///"):
            engine = sqlite_engine(url_or_engine.removeprefix("sqlite:///"))
        else:
            engine = create_engine(url_or_engine)
    else:
        engine = url_or_engine
    if create:
        create_tables(engine)
    return Ledger(engine, hub, **kwargs)


__all__ = [
    "HUB_KINDS",
    "CheckpointProof",
    "DuplicateClaimError",
    "Ledger",
    "LedgerConflictError",
    "LedgerEntryRow",
    "create_tables",
    "open_ledger",
    "sqlite_engine",
]
