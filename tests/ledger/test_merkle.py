"""Merkle trees: roots, proofs, reward-leaf encoding (its match with Vyper: test_contracts_boa)."""

from __future__ import annotations

import hashlib

import pytest
from eth_abi import encode
from eth_utils import keccak

from gridswarm.ledger.merkle import (
    MerkleTree,
    RewardClaim,
    RewardTree,
    hash_pair,
    keccak256,
    merkle_root,
    reward_leaf,
    sha256,
    verify_proof,
)


def leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


@pytest.mark.parametrize("hash_fn", [sha256, keccak256])
def test_every_proof_verifies_for_sizes_1_to_33(hash_fn) -> None:
    for n in range(1, 34):
        tree = MerkleTree(leaves(n), hash_fn)
        assert tree.root == merkle_root(leaves(n), hash_fn)
        for i, leaf in enumerate(leaves(n)):
            proof = tree.proof(i)
            assert len(proof) <= max(1, (n - 1).bit_length())
            assert verify_proof(leaf, proof, tree.root, hash_fn)
        assert not verify_proof(b"\x07" * 32, tree.proof(0), tree.root, hash_fn)


def test_root_changes_with_any_leaf_and_proofs_do_not_transfer() -> None:
    base = leaves(9)
    root = merkle_root(base)
    for i in range(9):
        changed = list(base)
        changed[i] = b"\x00" * 32
        assert merkle_root(changed) != root
    tree = MerkleTree(base)
    assert not verify_proof(base[1], tree.proof(2), root)


def test_sorted_pair_and_single_leaf() -> None:
    a, b = leaves(2)
    assert hash_pair(a, b, keccak256) == hash_pair(b, a, keccak256) == keccak(min(a, b) + max(a, b))
    assert merkle_root([a]) == a and MerkleTree([a]).proof(0) == []


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        MerkleTree([])
    with pytest.raises(ValueError, match="expected 32"):
        MerkleTree([b"short"])
    with pytest.raises(IndexError):
        MerkleTree(leaves(3)).proof(3)
    with pytest.raises(ValueError, match="uint256"):
        reward_leaf("0x" + "11" * 20, -1)
    with pytest.raises(ValueError, match="appears twice"):
        RewardTree(0, {"0x" + "ab" * 20: 1, "0x" + "AB" * 20: 2})
    with pytest.raises(ValueError, match="int >= 0"):
        RewardTree(0, {"0x" + "ab" * 20: 1.5})


def test_reward_leaf_is_double_keccak_of_abi_encoding() -> None:
    account = "0x" + "12" * 20
    expected = keccak(keccak(encode(["address", "uint256"], [account, 10**21])))
    assert reward_leaf(account, 10**21) == expected


def test_reward_tree_claims_and_round_trip() -> None:
    amounts = {"0x" + f"{i:040x}": 1000 * i for i in range(1, 12)}
    tree = RewardTree(3, amounts)
    assert tree.total_units == sum(amounts.values())
    for account, units in amounts.items():
        claim = tree.claim(account)
        assert claim.cumulative_units == units and claim.epoch == 3
        assert verify_proof(reward_leaf(account, units), claim.proof, tree.root)
        assert not verify_proof(reward_leaf(account, units + 1), claim.proof, tree.root)
        assert RewardClaim.from_dict(claim.to_dict()) == claim
    assert RewardTree(3, dict(reversed(list(amounts.items())))).root == tree.root
    with pytest.raises(KeyError, match="no reward"):
        tree.claim("0x" + "ff" * 20)
