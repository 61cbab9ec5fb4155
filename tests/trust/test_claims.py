"""A node's signed contribution claim: what it covers and every way it is refused."""

from __future__ import annotations

import pytest
import torch

from gridswarm.identity import Identity
from gridswarm.trust.claims import (
    ClaimError,
    check_claim,
    claim_payload,
    is_zero_update,
    sign_contribution,
    update_sha256,
)

NODE, OTHER = Identity.from_seed(b"node"), Identity.from_seed(b"other")
TENSORS = {"q": torch.tensor([1, -2, 3], dtype=torch.int8), "scale": torch.tensor([0.5])}
META = {"assignment_id": "a1", "steps": 4, "tokens": 1024, "train_time_s": 1.5, "threads": 1,
        "energy_wh": 0.01, "loss_first": 5.0, "loss_last": 4.0, "region": "DE"}  # fmt: skip


def expected(meta: dict = META, tensors: dict = TENSORS) -> dict:
    return claim_payload("run1", 3, "a1", update_sha256(tensors), meta)


def test_a_claim_covers_the_update_and_the_metrics() -> None:
    claim = sign_contribution(NODE, "run1", 3, TENSORS, META)
    parsed = check_claim(claim, NODE.public_key, expected())
    assert parsed.payload["update_sha256"] == update_sha256(TENSORS)
    assert parsed.payload["energy_wh"] == 0.01 and "region" not in parsed.payload
    assert update_sha256({k: v.clone() for k, v in TENSORS.items()}) == update_sha256(TENSORS)
    assert not is_zero_update(TENSORS)
    assert is_zero_update({k: torch.zeros_like(v) for k, v in TENSORS.items()})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other signer", "claim signed as another node"),
        ("bad signature", "bad signature"),
        ("more tokens", "tokens is 1024 in the claim, 9999 in the upload"),
        ("other update", "update_sha256"),
        ("not a claim", "malformed contribution claim"),
        ("wrong kind", "expected 'contribution'"),
    ],
)
def test_claims_that_are_refused(case: str, message: str) -> None:
    claim = sign_contribution(NODE, "run1", 3, TENSORS, META)
    want = expected()
    if case == "other signer":
        claim = sign_contribution(OTHER, "run1", 3, TENSORS, META)
    elif case == "bad signature":
        claim = dict(claim, signature="00" * 64)
    elif case == "more tokens":
        want = expected(META | {"tokens": 9999})
    elif case == "other update":
        want = expected(tensors={"q": torch.tensor([1, 2, 3], dtype=torch.int8)})
    elif case == "not a claim":
        claim = {"kind": "contribution"}
    elif case == "wrong kind":
        from gridswarm.ledger.chain import sign_claim

        claim = sign_claim(NODE, "fund", want).to_dict()
    with pytest.raises(ClaimError, match=message):
        check_claim(claim, NODE.public_key, want)
