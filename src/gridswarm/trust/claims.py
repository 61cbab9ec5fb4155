"""A node's signed statement of its contribution, as it goes on the ledger (pure).

The node signs (ledger claim scope) what it says it did: which assignment, the sha256 of the
encoded update it uploads, and its metrics (steps, tokens, time, threads, energy ...). The hub
checks that the claim is signed by the very node that sent the upload and says exactly what the
upload says, then appends it to the ledger unchanged: the record of the work is the node's own,
unforgeable word, and the hub's verdict on it is a separate, hub-signed entry.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch

from gridswarm.identity import Identity, node_id_from_public_key
from gridswarm.ledger.chain import LedgerError, SignedClaim, sign_claim
from gridswarm.train.params import pack

CLAIM_KIND = "contribution"
LITTLE_ENDIAN = sys.byteorder == "little"  # safetensors stores little-endian bytes
# Contribution metadata the claim repeats (those a node leaves unset, or an older node does not
# know, are left out on both sides).
CLAIM_FIELDS = (
    "steps",
    "tokens",
    "train_time_s",
    "threads",
    "device",
    "micro_batch_size",
    "loss_first",
    "loss_last",
    "energy_wh",
    "energy_method",
    "intensity_g_per_kwh",
    "local_surplus_share",
)


class ClaimError(ValueError):
    """A contribution claim that is malformed, signed by the wrong key, or says something else;
    `forged` when it is signed as another node or its signature is bad."""

    def __init__(self, message: str, forged: bool = False) -> None:
        super().__init__(message)
        self.forged = forged


# safetensors headers of `pack(tensors)` by layout (names, dtypes, shapes): the header bytes
# (length prefix included) and the names in the order their bytes follow it
_LAYOUTS: dict[tuple, tuple[bytes, tuple[str, ...]]] = {}
_LAYOUTS_LOCK = threading.Lock()
MAX_LAYOUTS = 64  # a hub sees a few per run (the codec's tensors, per fragment size)


def _layout_of(packed: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The header of a `pack` output, and its tensor names in the order of their bytes."""
    length = int.from_bytes(packed[:8], "little")
    header = json.loads(packed[8 : 8 + length])
    names = sorted(
        (name for name in header if name != "__metadata__"),
        key=lambda name: header[name]["data_offsets"][0],
    )
    return packed[: 8 + length], tuple(names)


def update_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of an encoded update alone (not its metadata): equal updates, equal digests.

    It is the sha256 of `pack(tensors)`, computed without making that model-sized copy: a
    safetensors file is its header, then each tensor's raw little-endian bytes in the order
    the header's offsets give. The header depends only on the names, dtypes and shapes; the
    first time a layout is seen `pack` itself makes it (and the digest), and it is kept
    (`MAX_LAYOUTS`); after that the header and the tensors' own memory are hashed in place.
    """
    layout = tuple(sorted((name, t.dtype, tuple(t.shape)) for name, t in tensors.items()))
    known = _LAYOUTS.get(layout) if LITTLE_ENDIAN else None
    if known is not None and all(t.device.type == "cpu" for t in tensors.values()):
        header, order = known
        digest = hashlib.sha256(header)
        try:
            for name in order:
                digest.update(tensors[name].detach().reshape(-1).view(torch.uint8).numpy())
            return digest.hexdigest()
        except (RuntimeError, TypeError):  # a tensor numpy cannot view (conjugate bit ...)
            pass
    packed = pack(dict(tensors))
    if LITTLE_ENDIAN:
        with _LAYOUTS_LOCK:
            while len(_LAYOUTS) >= MAX_LAYOUTS:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))
            _LAYOUTS[layout] = _layout_of(packed)
    return hashlib.sha256(packed).hexdigest()


ZERO_PREFIX = 4096  # values looked at first: any real update has a nonzero among them


def is_zero_update(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every value of the encoded update is zero (it carries no work at all). A
    nonzero value in the first ZERO_PREFIX of a tensor answers at once; only an update that is
    (nearly) zero is scanned whole."""
    for t in tensors.values():
        flat = t.reshape(-1)
        if bool(flat[:ZERO_PREFIX].any()) or bool(flat.any()):
            return False
    return True


def claim_payload(
    run_id: str, round_number: int, assignment_id: str, digest: str, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The payload a node signs for one contribution (`meta`: the ContributionMeta fields)."""
    payload: dict[str, Any] = {
        "run_id": run_id,
        "round": round_number,
        "assignment_id": assignment_id,
        "update_sha256": digest,
    }
    for name in CLAIM_FIELDS:
        if meta.get(name) is not None:
            payload[name] = meta[name]
    return payload


def sign_contribution(
    identity: Identity,
    run_id: str,
    round_number: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> dict[str, str]:
    """The node's signed claim for an upload, as the JSON object ContributionMeta.claim holds."""
    payload = claim_payload(
        run_id, round_number, str(meta["assignment_id"]), update_sha256(tensors), meta
    )
    return sign_claim(identity, CLAIM_KIND, payload).to_dict()


def check_claim(
    claim: Mapping[str, Any], submitter_key: bytes, expected: Mapping[str, Any]
) -> SignedClaim:
    """The parsed claim if it is the submitter's valid signature over `expected`; else ClaimError.

    Checked in this order, so the reason names the real problem: well-formed, the right kind,
    the submitter's own key (not another node's), a valid signature, the same content.
    """
    try:
        parsed = SignedClaim.from_dict(claim)
        parsed.check(signature=False)
    except LedgerError as exc:
        raise ClaimError(f"malformed contribution claim: {exc}") from exc
    if parsed.kind != CLAIM_KIND:
        raise ClaimError(f"contribution claim has kind {parsed.kind!r}, expected {CLAIM_KIND!r}")
    if parsed.author != submitter_key:
        raise ClaimError(
            f"claim signed as another node: key of node {node_id_from_public_key(parsed.author)},"
            f" but the upload comes from node {node_id_from_public_key(submitter_key)}",
            forged=True,
        )
    try:
        parsed.check(signature=True)
    except LedgerError as exc:
        raise ClaimError(f"bad signature on the contribution claim: {exc}", forged=True) from exc
    said = parsed.payload
    for key in sorted(set(said) | set(expected)):
        if said.get(key) != expected.get(key):
            raise ClaimError(
                f"claim does not match the upload: {key} is {said.get(key)!r} in the claim, "
                f"{expected.get(key)!r} in the upload"
            )
    return parsed


def claimed_work_error(
    steps: int, tokens: int, assigned_steps: int, tokens_per_step: int
) -> str | None:
    """Why a contribution's step and token counts cannot be true, or None if they add up."""
    if steps != assigned_steps:
        return f"steps {steps} differ from the assigned {assigned_steps}"
    if tokens != steps * tokens_per_step:
        return f"tokens {tokens} != steps x tokens_per_step ({steps * tokens_per_step})"
    return None
