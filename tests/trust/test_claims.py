"""A node's signed contribution claim: what it covers and every way it is refused."""

from __future__ import annotations

import hashlib

import pytest
import torch

from gridswarm.identity import Identity
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from gridswarm.trust import claims
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


def _layouts() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    vec = torch.randn(5000, generator=g)
    odd = {
        "b": torch.tensor([True, False, True]),
        "a": torch.randn(3, 4, generator=g).t(),  # not contiguous
        "z": torch.tensor(2.5),  # 0-dim
        "e": torch.zeros(0, 3),
        "h": torch.randn(5, generator=g).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    return [make_codec(name, 64).encode(vec) for name in ("int8", "int4", "fp16")] + [odd]


@pytest.mark.parametrize("tensors", _layouts(), ids=["int8", "int4", "fp16", "mixed"])
def test_the_update_digest_is_the_sha256_of_the_packed_update(tensors, monkeypatch) -> None:
    """Bit for bit what it always was (the sha256 of `pack(tensors)`): the first time a layout
    is seen through `pack`, after that from its kept header and the tensors' own memory."""
    packed = hashlib.sha256(pack(dict(tensors))).hexdigest()
    assert update_sha256(tensors) == packed
    other = {k: v + 1 if v.dtype != torch.bool else ~v for k, v in tensors.items()}
    monkeypatch.setattr(claims, "pack", lambda *_: pytest.fail("packed again"))
    assert update_sha256(tensors) == packed  # the layout is known: no copy made
    monkeypatch.undo()
    assert update_sha256(other) == hashlib.sha256(pack(dict(other))).hexdigest()


def test_kept_layouts_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(claims, "MAX_LAYOUTS", 3)
    for n in range(1, 10):
        tensors = {"q": torch.ones(n, dtype=torch.int8)}
        assert update_sha256(tensors) == hashlib.sha256(pack(tensors)).hexdigest()
    assert len(claims._LAYOUTS) <= 3


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
