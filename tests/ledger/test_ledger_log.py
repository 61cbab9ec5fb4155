"""The embedded ledger on real databases: appends, checkpoints, verify, tampering, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, select, text, update

from gridswarm.identity import Identity
from gridswarm.ledger.chain import (
    KIND_CHECKPOINT,
    SCOPE_CHAIN,
    SCOPE_CLAIM,
    LedgerError,
    SignedClaim,
    content_digest,
    entry_hash,
    is_checkpoint_seq,
    sign_claim,
    verify_entries,
)
from gridswarm.ledger.log import (
    TABLE,
    DuplicateClaimError,
    Ledger,
    create_tables,
    open_ledger,
    sqlite_engine,
)
from gridswarm.ledger.merkle import merkle_root, sha256, verify_proof

NODE = Identity.from_seed(b"node-a")
OTHER = Identity.from_seed(b"node-b")


def fill(ledger: Ledger, n: int) -> None:
    """n items alternating hub-signed rounds and node-signed contribution claims."""
    items = []
    for i in range(n):
        if i % 2:
            items.append(sign_claim(NODE, "contribution", {"round": i, "tokens": 100 + i}))
        else:
            items.append(("round", {"round": i, "participants": 2}))
    ledger.append_many(items)


def tamper(ledger: Ledger, seq: int, **values: object) -> None:
    with ledger.engine.begin() as c:
        c.execute(update(TABLE).where(TABLE.c.seq == seq).values(**values))


def test_append_seals_hub_and_node_entries(ledger: Ledger, hub: Identity) -> None:
    genesis_and_round = ledger.append_many([("round", {"round": 0})])
    assert [e.kind for e in genesis_and_round] == ["genesis", "round"]
    claim = sign_claim(NODE, "contribution", {"round": 0, "tokens": 512})
    entry = ledger.append_claim(claim)
    assert entry.seq == 2
    assert entry.author == NODE.public_key and entry.scope == SCOPE_CLAIM
    assert entry.prev_hash == genesis_and_round[-1].entry_hash
    assert entry.payload == {"round": 0, "tokens": 512}
    assert genesis_and_round[-1].author == hub.public_key
    assert genesis_and_round[-1].scope == SCOPE_CHAIN
    assert ledger.get(2) == entry and ledger.head() == entry and len(ledger) == 3


def test_checkpoints_every_n_with_merkle_root_and_proofs(ledger: Ledger) -> None:
    fill(ledger, 30)
    entries = list(ledger.entries())
    every = ledger.checkpoint_every
    checkpoints = [e for e in entries if e.kind == KIND_CHECKPOINT]
    assert [e.seq for e in checkpoints] == [
        s for s in range(len(entries)) if is_checkpoint_seq(s, every)
    ]
    assert len(checkpoints) == len(entries) // (every + 1)
    first = checkpoints[0].payload
    covered = [e.entry_hash for e in entries[first["from_seq"] : first["to_seq"] + 1]]
    assert len(covered) == every
    assert first["merkle_root"] == merkle_root(covered, sha256).hex()
    assert checkpoints[1].payload["prev_checkpoint"] == checkpoints[0].entry_hash.hex()
    proof = ledger.checkpoint_proof(12)
    assert proof is not None and proof.checkpoint_seq == checkpoints[1].seq
    assert verify_proof(proof.entry_hash, proof.proof, proof.merkle_root, sha256)
    assert proof.merkle_root.hex() == checkpoints[1].payload["merkle_root"]
    assert ledger.checkpoint_proof(entries[-1].seq + 5) is None


def test_verify_clean_chain(ledger: Ledger, hub: Identity) -> None:
    fill(ledger, 40)
    report = ledger.verify(hub_public_key=hub.public_key, chunk=7)
    assert report.ok, report.reason
    assert report.checked == len(ledger) and report.head_seq == len(ledger) - 1
    assert report.checkpoints == len(ledger) // 9
    assert verify_entries(ledger.entries()).ok


def test_verify_names_altered_payload(ledger: Ledger) -> None:
    fill(ledger, 40)
    tamper(ledger, 21, payload_json='{"round":21,"tokens":999999}')
    tamper(ledger, 33, payload_json='{"round":33}')
    report = ledger.verify()
    assert not report.ok
    assert report.first_bad_seq == 21
    assert "altered" in report.reason


def test_verify_names_altered_entry_with_recomputed_hash(ledger: Ledger) -> None:
    fill(ledger, 20)
    e = ledger.get(4)
    forged = '{"participants":2,"round":4,"bonus":1}'
    h = entry_hash(
        e.seq, e.prev_hash, content_digest(e.kind, e.author, forged), e.scope, e.created_ms
    )
    tamper(ledger, 4, payload_json=forged, entry_hash=h)
    report = ledger.verify()
    assert report.first_bad_seq == 4 and "bad signature" in report.reason


def test_verify_names_removed_entry(ledger: Ledger) -> None:
    fill(ledger, 20)
    with ledger.engine.begin() as c:
        c.execute(delete(TABLE).where(TABLE.c.seq == 6))
    report = ledger.verify()
    assert report.first_bad_seq == 6
    assert "seq gap" in report.reason and "removed" in report.reason


def test_verify_names_reordered_entries(ledger: Ledger) -> None:
    fill(ledger, 20)
    cols = [c for c in TABLE.c if c.name != "seq"]
    with ledger.engine.begin() as c:
        a = c.execute(select(*cols).where(TABLE.c.seq == 5)).one()._asdict()
        b = c.execute(select(*cols).where(TABLE.c.seq == 6)).one()._asdict()
        c.execute(update(TABLE).where(TABLE.c.seq == 5).values(claim_digest=None, entry_hash=b"x"))
        c.execute(update(TABLE).where(TABLE.c.seq == 6).values(claim_digest=None, entry_hash=b"y"))
        c.execute(update(TABLE).where(TABLE.c.seq == 5).values(prev_hash=b"p"))
        c.execute(update(TABLE).where(TABLE.c.seq == 6).values(**a))
        c.execute(update(TABLE).where(TABLE.c.seq == 5).values(**b))
    report = ledger.verify()
    assert report.first_bad_seq == 5 and "chain broken" in report.reason


def test_verify_catches_relinked_chain_after_removal(ledger: Ledger) -> None:
    """An attacker without keys deletes entry 5 and re-links everything after it."""
    fill(ledger, 20)
    entries = [e for e in ledger.entries() if e.seq != 5]
    with ledger.engine.begin() as c:
        c.execute(delete(TABLE))
    prev = entries[4].entry_hash
    rows = []
    for new_seq, e in enumerate(entries):
        if new_seq < 5:
            rows.append((e, e.prev_hash, e.entry_hash))
            continue
        h = entry_hash(new_seq, prev, e.digest, e.scope, e.created_ms)
        rows.append((e, prev, h))
        prev = h
    with ledger.engine.begin() as c:
        for new_seq, (e, prev_hash, h) in enumerate(rows):
            c.execute(
                TABLE.insert().values(
                    seq=new_seq,
                    kind=e.kind,
                    payload_json=e.payload_json,
                    author=e.author,
                    prev_hash=prev_hash,
                    entry_hash=h,
                    signature=e.signature,
                    scope=e.scope,
                    created_ms=e.created_ms,
                )
            )
    report = ledger.verify()
    assert not report.ok
    # The claim that slid into seq 5 still carries a valid node signature (claims are position-
    # free); the hub's signature on the next entry pins the position and breaks.
    assert rows[5][0].scope == SCOPE_CLAIM
    assert report.first_bad_seq == 6 and "bad signature" in report.reason


def test_verify_rejects_node_signed_hub_kind(ledger: Ledger) -> None:
    fill(ledger, 20)
    # a node-signed "reward" smuggled straight into the table
    e = ledger.get(3)
    forged = '{"round":3,"shares":{"me":10}}'
    digest = content_digest("reward", NODE.public_key, forged)
    h = entry_hash(3, e.prev_hash, digest, SCOPE_CLAIM, e.created_ms)
    tamper(
        ledger,
        3,
        kind="reward",
        payload_json=forged,
        entry_hash=h,
        scope=SCOPE_CLAIM,
        author=NODE.public_key,
        signature=NODE.sign(digest),
    )
    report = ledger.verify()
    assert report.first_bad_seq == 3 and "not chain-signed by the hub" in report.reason


def test_verify_checkpoint_root_mismatch(tmp_path: Path, hub: Identity) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'l.db'}", hub, checkpoint_every=4)
    fill(ledger, 6)
    cp = ledger.get(4)
    bad = cp.payload_json.replace(cp.payload["merkle_root"], "00" * 32)
    digest = content_digest(cp.kind, cp.author, bad)
    h = entry_hash(cp.seq, cp.prev_hash, digest, cp.scope, cp.created_ms)
    tamper(ledger, 4, payload_json=bad, entry_hash=h, signature=hub.sign(h))  # even re-signed
    report = ledger.verify()
    assert report.first_bad_seq == 4 and "Merkle root" in report.reason


def test_verify_against_anchors_detects_truncation(ledger: Ledger) -> None:
    fill(ledger, 30)
    anchors = {
        e.seq: bytes.fromhex(e.payload["merkle_root"]) for e in ledger.entries(kind=KIND_CHECKPOINT)
    }
    assert ledger.verify(anchors=anchors).anchors_checked == len(anchors)
    last = max(anchors)
    with ledger.engine.begin() as c:
        c.execute(delete(TABLE).where(TABLE.c.seq >= last - 3))
    assert ledger.verify().ok  # a clean prefix looks fine on its own ...
    report = ledger.verify(anchors=anchors)  # ... but not against the roots anchored on chain
    assert not report.ok and "truncated" in report.reason and report.first_bad_seq == last - 3
    wrong = dict(anchors) | {min(anchors): b"\x01" * 32}
    assert ledger.verify(anchors=wrong).first_bad_seq == min(anchors)


def test_verify_pins_expected_hub(ledger: Ledger) -> None:
    fill(ledger, 3)
    report = ledger.verify(hub_public_key=OTHER.public_key)
    assert report.first_bad_seq == 0 and "different hub" in report.reason


def test_claims_are_checked_and_replays_refused(ledger: Ledger) -> None:
    claim = sign_claim(NODE, "contribution", {"round": 1, "tokens": 64})
    ledger.append_claim(claim)
    with pytest.raises(DuplicateClaimError, match="already entry 1"):
        ledger.append_claim(claim)
    forged = SignedClaim(claim.kind, claim.payload_json, OTHER.public_key, claim.signature)
    with pytest.raises(LedgerError, match="bad signature"):
        ledger.append_claim(forged)
    altered = SignedClaim(claim.kind, '{"round":1,"tokens":6400}', NODE.public_key, claim.signature)
    with pytest.raises(LedgerError, match="bad signature"):
        ledger.append_claim(altered)
    with pytest.raises(LedgerError, match="only be written by the hub"):
        ledger.append_claim(sign_claim(NODE, "reward", {"shares": {}}))
    with pytest.raises(LedgerError, match="written by the ledger itself"):
        ledger.append("checkpoint", {})
    with pytest.raises(LedgerError, match="bad entry kind"):
        ledger.append("Round!", {})
    with pytest.raises(LedgerError, match="canonical-JSON"):
        ledger.append("round", {"loss": float("nan")})
    assert len(ledger) == 2  # nothing of the refused batches was written
    assert SignedClaim.from_dict(claim.to_dict()) == claim


def test_balances_fold_over_the_log(ledger: Ledger) -> None:
    sponsor = Identity.from_seed(b"sponsor")
    ledger.append_claim(sign_claim(sponsor, "fund", {"amount_units": 1000}))
    ledger.append(
        "reward", {"round": 0, "pool_units": 100, "shares": {"a": 60, "b": 40}, "carried_units": 0}
    )
    ledger.append("slash", {"account": "b", "amount_units": 15, "reason": "audit mismatch"})
    b = ledger.balances()
    assert (b.funded_units, b.pool_units) == (1000, 915)
    assert b.available("a") == 60 and b.available("b") == 25


def test_read_only_and_interval_mismatch(ledger: Ledger, hub: Identity) -> None:
    fill(ledger, 2)
    reader = Ledger(ledger.engine)
    assert reader.verify().ok and reader.checkpoint_every == 8
    with pytest.raises(LedgerError, match="read-only"):
        reader.append("round", {})
    with pytest.raises(LedgerError, match="checkpoint_every=8, not 16"):
        Ledger(ledger.engine, hub, checkpoint_every=16).append("round", {})


def test_append_joins_callers_transaction(ledger: Ledger) -> None:
    fill(ledger, 2)
    before = len(ledger)
    with pytest.raises(RuntimeError), ledger.engine.begin() as c:
        ledger.append("round", {"round": 99}, conn=c)
        raise RuntimeError("hub failed after writing")
    assert len(ledger) == before
    with ledger.engine.begin() as c:
        ledger.append("round", {"round": 99}, conn=c)
    assert ledger.head().payload == {"round": 99}


def test_single_append_returns_its_entry_not_the_checkpoint(tmp_path: Path, hub: Identity) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'one.db'}", hub, checkpoint_every=1)
    claim = sign_claim(NODE, "contribution", {"round": 0})
    assert ledger.append_claim(claim, signatures_checked=True).kind == "contribution"
    assert ledger.append("round", {"round": 1}).kind == "round"
    assert [e.kind for e in ledger.entries()] == [
        "genesis",
        "checkpoint",
        "contribution",
        "checkpoint",
        "round",
        "checkpoint",
    ]
    assert ledger.verify().ok


def test_clock_sets_created_ms(tmp_path: Path, hub: Identity) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'c.db'}", hub, clock=lambda: 1234.5678)
    assert ledger.append("round", {}).created_ms == 1234567


def append_concurrently(
    make_engine: Callable[[], Engine], hub: Identity, workers: int, batches: int
) -> None:
    """`workers` threads, each with its own engine (own connections), append batches at once."""
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def work(worker: int) -> None:
        engine = make_engine()
        try:
            ledger = Ledger(engine, hub, checkpoint_every=8)
            start.wait(timeout=10)
            for b in range(batches):
                ledger.append_many(
                    [("round", {"worker": worker, "batch": b, "i": i}) for i in range(3)]
                )
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def check_no_fork(ledger: Ledger, workers: int, batches: int) -> None:
    report = ledger.verify()
    assert report.ok, report.reason
    assert report.checked == len(ledger)
    payloads = [e.payload for e in ledger.entries(kind="round")]
    assert len(payloads) == workers * batches * 3
    assert len({(p["worker"], p["batch"], p["i"]) for p in payloads}) == len(payloads)
    for w in range(workers):  # each worker's batches landed in its order
        mine = [(p["batch"], p["i"]) for p in payloads if p["worker"] == w]
        assert mine == sorted(mine)


def test_two_workers_do_not_fork_sqlite(tmp_path: Path, hub: Identity) -> None:
    path = str(tmp_path / "shared.db")
    create_tables(sqlite_engine(path))
    append_concurrently(lambda: sqlite_engine(path), hub, workers=2, batches=25)
    check_no_fork(Ledger(sqlite_engine(path)), workers=2, batches=25)


@pytest.mark.slow  # a PostgreSQL server: the full suite
@pytest.mark.postgres
def test_two_workers_do_not_fork_postgres(postgres_url: str, hub: Identity) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as c:
        c.execute(text("DROP TABLE IF EXISTS ledger_entries"))
    ledger = open_ledger(engine, hub, checkpoint_every=8)
    append_concurrently(lambda: create_engine(postgres_url), hub, workers=3, batches=15)
    check_no_fork(ledger, workers=3, batches=15)
    tamper(ledger, 10, payload_json='{"worker":9}')
    assert ledger.verify().first_bad_seq == 10
    engine.dispose()
