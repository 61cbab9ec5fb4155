"""Entry format and chain rules of the embedded ledger (pure: no database, no clock).

An entry is (seq, kind, payload, author, prev_hash, created_ms) plus the author's Ed25519 signature:

    content_digest = sha256("gridswarm/ledger/content/v1" | kind | 0x00 | author | payload_json)
    entry_hash     = sha256("gridswarm/ledger/entry/v1" | seq u64 | prev_hash | content_digest
                            | scope u8 | created_ms i64)

`payload_json` is canonical JSON (sorted keys, no spaces, UTF-8, no NaN). Two signing scopes:

- SCOPE_CHAIN: the author signed `entry_hash`, which pins the entry's position. The hub uses it for
  everything it writes (genesis, rounds, rewards, slashes, checkpoints).
- SCOPE_CLAIM: the author signed `content_digest`. A node signs its contribution claim before it can
  know where the entry will land in the chain; the hub's next chain-signed entry (at the latest the
  next checkpoint) then pins its position. A claim's digest is unique in the log: a replayed claim
  is refused.

Entry 0 is the genesis entry: it names the hub key and the checkpoint interval N. Every (N+1)-th
entry (seq N, 2N+1, ...) is a checkpoint whose payload carries the Merkle root (sha256, sorted
pairs) over the entry hashes of the N entries since the previous checkpoint. `ChainVerifier`
replays all of these rules over a stream of entries and stops at the first entry that breaks one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gridswarm.identity import Identity, verify_signature
from gridswarm.ledger.merkle import merkle_root, sha256

FORMAT_VERSION = 1
GENESIS_PREV_HASH = b"\x00" * 32
SCOPE_CHAIN = 0
SCOPE_CLAIM = 1
SCOPE_NAMES = {SCOPE_CHAIN: "chain", SCOPE_CLAIM: "claim"}
KIND_GENESIS = "genesis"
KIND_CHECKPOINT = "checkpoint"
RESERVED_KINDS = frozenset({KIND_GENESIS, KIND_CHECKPOINT})
# Kinds only the hub may write (chain scope, hub key); anything else may come from any identity.
HUB_KINDS = frozenset(
    {
        KIND_GENESIS,
        KIND_CHECKPOINT,
        "round",
        "verdict",
        "reward",
        "slash",
        "payout",
        "epoch",
        "anchor",
        "reputation",
        "lifecycle",
    }
)
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
DEFAULT_CHECKPOINT_EVERY = 1024
_CONTENT_DOMAIN = b"gridswarm/ledger/content/v1"
_ENTRY_DOMAIN = b"gridswarm/ledger/entry/v1"


class LedgerError(Exception):
    """Something about a ledger entry or claim is wrong; the message says what."""


def canonical_json(payload: Mapping[str, Any]) -> str:
    """The one JSON text of a payload that everyone hashes: sorted keys, no spaces, no NaN."""
    if not isinstance(payload, Mapping):
        raise LedgerError(f"payload must be a JSON object, got {type(payload).__name__}")
    try:
        return json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"payload is not canonical-JSON serialisable: {exc}") from exc


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise LedgerError(f"bad entry kind {kind!r}: want lowercase [a-z][a-z0-9_]{{0,31}}")
    return kind


def content_digest(kind: str, author: bytes, payload_json: str) -> bytes:
    """What a claim signature covers: the entry's content without its position."""
    return hashlib.sha256(
        _CONTENT_DOMAIN + kind.encode() + b"\x00" + author + payload_json.encode()
    ).digest()


def entry_hash(seq: int, prev_hash: bytes, digest: bytes, scope: int, created_ms: int) -> bytes:
    """The hash that links the chain (and that a chain-scope signature covers)."""
    return hashlib.sha256(
        _ENTRY_DOMAIN
        + seq.to_bytes(8, "big")
        + prev_hash
        + digest
        + bytes([scope])
        + created_ms.to_bytes(8, "big", signed=True)
    ).digest()


def is_checkpoint_seq(seq: int, checkpoint_every: int) -> bool:
    """Checkpoints sit at seq N, 2N+1, 3N+2, ...: each follows exactly N other entries."""
    return (seq + 1) % (checkpoint_every + 1) == 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One sealed ledger entry, as stored."""

    seq: int
    kind: str
    payload_json: str
    author: bytes
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes
    scope: int
    created_ms: int

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)

    @property
    def digest(self) -> bytes:
        return content_digest(self.kind, self.author, self.payload_json)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "payload": self.payload,
            "author": self.author.hex(),
            "prev_hash": self.prev_hash.hex(),
            "entry_hash": self.entry_hash.hex(),
            "signature": self.signature.hex(),
            "scope": SCOPE_NAMES[self.scope],
            "created_ms": self.created_ms,
        }


@dataclass(frozen=True, slots=True)
class SignedClaim:
    """An entry signed by its author (a node, a sponsor) before the hub places it in the chain."""

    kind: str
    payload_json: str
    author: bytes
    signature: bytes
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "digest", content_digest(self.kind, self.author, self.payload_json)
        )

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)

    def check(self, signature: bool = True) -> None:
        """Raise LedgerError unless well-formed and (with `signature`) validly signed."""
        check_kind(self.kind)
        if self.kind in HUB_KINDS:
            raise LedgerError(f"kind {self.kind!r} may only be written by the hub")
        if len(self.author) != 32:
            raise LedgerError(f"claim author key is {len(self.author)} bytes, expected 32")
        if len(self.signature) != 64:
            raise LedgerError(f"claim signature is {len(self.signature)} bytes, expected 64")
        try:
            payload = json.loads(self.payload_json)
        except ValueError as exc:
            raise LedgerError(f"claim payload is not JSON: {exc}") from exc
        if canonical_json(payload) != self.payload_json:
            raise LedgerError("claim payload is not in canonical JSON form")
        if signature and not verify_signature(self.author, self.digest, self.signature):
            raise LedgerError(f"bad signature on {self.kind!r} claim by {self.author.hex()[:16]}")

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "payload_json": self.payload_json,
            "author": self.author.hex(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedClaim:
        """Parse a claim received over HTTP (does not check the signature: call `check`)."""
        try:
            return cls(
                kind=str(data["kind"]),
                payload_json=str(data["payload_json"]),
                author=bytes.fromhex(data["author"]),
                signature=bytes.fromhex(data["signature"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"malformed claim: {exc!r}") from exc


def sign_claim(identity: Identity, kind: str, payload: Mapping[str, Any]) -> SignedClaim:
    """A node (or sponsor) signs an entry it wants on the ledger."""
    payload_json = canonical_json(payload)
    digest = content_digest(check_kind(kind), identity.public_key, payload_json)
    return SignedClaim(kind, payload_json, identity.public_key, identity.sign(digest))


def seal_hub_entry(
    seq: int,
    prev_hash: bytes,
    kind: str,
    payload_json: str,
    hub: Identity,
    created_ms: int,
) -> Entry:
    """Place and sign an entry written by the hub (chain scope)."""
    author = hub.public_key
    digest = content_digest(kind, author, payload_json)
    h = entry_hash(seq, prev_hash, digest, SCOPE_CHAIN, created_ms)
    return Entry(
        seq, kind, payload_json, author, prev_hash, h, hub.sign(h), SCOPE_CHAIN, created_ms
    )


def seal_claim(seq: int, prev_hash: bytes, claim: SignedClaim, created_ms: int) -> Entry:
    """Place an already-signed claim in the chain (the caller has run `claim.check()`)."""
    h = entry_hash(seq, prev_hash, claim.digest, SCOPE_CLAIM, created_ms)
    return Entry(
        seq,
        claim.kind,
        claim.payload_json,
        claim.author,
        prev_hash,
        h,
        claim.signature,
        SCOPE_CLAIM,
        created_ms,
    )


def genesis_payload(hub_public_key: bytes, checkpoint_every: int, run_id: str | None) -> str:
    if checkpoint_every < 1:
        raise LedgerError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    return canonical_json(
        {
            "version": FORMAT_VERSION,
            "hub": hub_public_key.hex(),
            "checkpoint_every": checkpoint_every,
            "run_id": run_id,
        }
    )


def checkpoint_payload(
    from_seq: int, segment_hashes: list[bytes], prev_checkpoint_hash: bytes | None
) -> str:
    """Payload of the checkpoint that closes the segment starting at `from_seq`."""
    return canonical_json(
        {
            "from_seq": from_seq,
            "to_seq": from_seq + len(segment_hashes) - 1,
            "count": len(segment_hashes),
            "merkle_root": merkle_root(segment_hashes, sha256).hex(),
            "prev_checkpoint": prev_checkpoint_hash.hex() if prev_checkpoint_hash else None,
        }
    )


@dataclass
class VerifyReport:
    """Outcome of re-checking a chain; `first_bad_seq`/`reason` name the first broken entry."""

    ok: bool
    checked: int
    head_seq: int | None
    head_hash: str | None
    checkpoints: int
    first_bad_seq: int | None = None
    reason: str | None = None
    anchors_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "checkpoints": self.checkpoints,
            "anchors_checked": self.anchors_checked,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


@dataclass
class ChainVerifier:
    """Streams entries in seq order and stops at the first one that breaks a chain rule.

    `hub_public_key`: when given, the genesis entry must name this key (the verifier's trust
    anchor); otherwise the key in the genesis entry is used. `anchors`: checkpoint seq -> Merkle
    root posted on chain; a checkpoint disagreeing with its anchor, or an anchor past the end of
    the log (truncation), is an error.
    """

    hub_public_key: bytes | None = None
    anchors: Mapping[int, bytes] = field(default_factory=dict)
    checked: int = field(default=0, init=False)
    checkpoints: int = field(default=0, init=False)
    anchors_checked: int = field(default=0, init=False)
    first_bad_seq: int | None = field(default=None, init=False)
    reason: str | None = field(default=None, init=False)
    _prev_hash: bytes = field(default=GENESIS_PREV_HASH, init=False)
    _last_checkpoint_hash: bytes | None = field(default=None, init=False)
    _segment: list[bytes] = field(default_factory=list, init=False)
    _segment_start: int = field(default=0, init=False)
    _checkpoint_every: int = field(default=0, init=False)
    _hub: bytes = field(default=b"", init=False)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def _fail(self, seq: int, reason: str) -> bool:
        self.first_bad_seq, self.reason = seq, reason
        return False

    def feed_many(self, entries: Iterable[Entry]) -> bool:
        """Check entries in order; False (and stop) at the first bad one."""
        return all(self.feed(e) for e in entries)

    def feed(self, e: Entry) -> bool:
        if not self.ok:
            return False
        expected = self.checked
        if e.seq != expected:
            what = "removed" if e.seq > expected else "duplicated or reordered"
            return self._fail(expected, f"seq gap: expected seq {expected}, found {e.seq} ({what})")
        if e.prev_hash != self._prev_hash:
            return self._fail(
                e.seq,
                f"chain broken: prev_hash does not match the hash of entry {e.seq - 1} "
                "(an entry before it was altered, removed, inserted or reordered)",
            )
        if e.scope not in SCOPE_NAMES:
            return self._fail(e.seq, f"unknown signing scope {e.scope}")
        digest = e.digest
        recomputed = entry_hash(e.seq, e.prev_hash, digest, e.scope, e.created_ms)
        if recomputed != e.entry_hash:
            return self._fail(e.seq, "entry altered: stored entry_hash does not match its contents")
        if not self._check_rules(e):
            return False
        message = e.entry_hash if e.scope == SCOPE_CHAIN else digest
        if not verify_signature(e.author, message, e.signature):
            return self._fail(
                e.seq, f"bad signature by {e.author.hex()[:16]} ({SCOPE_NAMES[e.scope]} scope)"
            )
        if e.kind == KIND_CHECKPOINT:
            if not self._check_checkpoint(e):
                return False
        else:
            self._segment.append(e.entry_hash)
        self._prev_hash = e.entry_hash
        self.checked += 1
        return True

    def _check_rules(self, e: Entry) -> bool:
        if e.seq == 0:
            if e.kind != KIND_GENESIS or e.scope != SCOPE_CHAIN:
                return self._fail(0, "entry 0 is not a hub-signed genesis entry")
            try:
                p = e.payload
                self._hub = bytes.fromhex(p["hub"])
                self._checkpoint_every = int(p["checkpoint_every"])
            except (KeyError, TypeError, ValueError) as exc:
                return self._fail(0, f"genesis payload malformed: {exc!r}")
            if self._checkpoint_every < 1:
                return self._fail(0, "genesis checkpoint_every must be >= 1")
            if self._hub != e.author:
                return self._fail(0, "genesis not signed by the hub it names")
            if self.hub_public_key is not None and self._hub != self.hub_public_key:
                return self._fail(0, "genesis names a different hub key than expected")
            return True
        if e.kind == KIND_GENESIS:
            return self._fail(e.seq, "second genesis entry")
        must_checkpoint = is_checkpoint_seq(e.seq, self._checkpoint_every)
        if must_checkpoint and e.kind != KIND_CHECKPOINT:
            return self._fail(e.seq, f"missing checkpoint: entry {e.seq} must be a checkpoint")
        if e.kind == KIND_CHECKPOINT and not must_checkpoint:
            return self._fail(e.seq, f"checkpoint at seq {e.seq} where none is due")
        if e.kind in HUB_KINDS and (e.author != self._hub or e.scope != SCOPE_CHAIN):
            return self._fail(e.seq, f"{e.kind!r} entry not chain-signed by the hub")
        return True

    def _check_checkpoint(self, e: Entry) -> bool:
        expected = checkpoint_payload(
            self._segment_start, self._segment, self._last_checkpoint_hash
        )
        if e.payload_json != expected:
            return self._fail(
                e.seq, "checkpoint does not match the Merkle root of the entries it covers"
            )
        if e.seq in self.anchors:
            root = bytes.fromhex(e.payload["merkle_root"])
            if root != self.anchors[e.seq]:
                return self._fail(e.seq, "checkpoint root differs from the root anchored on chain")
            self.anchors_checked += 1
        self.checkpoints += 1
        self._last_checkpoint_hash = e.entry_hash
        self._segment = []
        self._segment_start = e.seq + 1
        return True

    def finish(self) -> VerifyReport:
        """Close the stream: check no anchor lies beyond the end of the log, and report."""
        if self.ok:
            beyond = sorted(s for s in self.anchors if s >= self.checked)
            if beyond:
                self._fail(
                    self.checked,
                    f"log truncated: anchored checkpoint seq {beyond[0]} is missing "
                    f"(log ends at seq {self.checked - 1})",
                )
        head = self._prev_hash if self.checked else None
        return VerifyReport(
            ok=self.ok,
            checked=self.checked,
            head_seq=self.checked - 1 if self.checked else None,
            head_hash=head.hex() if head else None,
            checkpoints=self.checkpoints,
            first_bad_seq=self.first_bad_seq,
            reason=self.reason,
            anchors_checked=self.anchors_checked,
        )


def verify_entries(
    entries: Iterable[Entry],
    hub_public_key: bytes | None = None,
    anchors: Mapping[int, bytes] | None = None,
) -> VerifyReport:
    """Re-check a whole chain given as an iterable of entries in seq order."""
    verifier = ChainVerifier(hub_public_key=hub_public_key, anchors=dict(anchors or {}))
    verifier.feed_many(entries)
    return verifier.finish()
