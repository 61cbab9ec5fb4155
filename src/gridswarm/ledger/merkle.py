"""Merkle trees with sorted-pair hashing, and the reward-leaf encoding the escrow contract checks.

Parents are `H(min(a, b) || max(a, b))`, as in OpenZeppelin's MerkleProof: a proof is just the list
of sibling hashes, with no left/right flags, so a Vyper loop of a dozen lines can verify it. An odd
node at the end of a level is carried up unchanged (its proof simply skips that level).

The same code builds the embedded ledger's checkpoint roots (sha256 over entry hashes) and the EVM
reward roots (keccak256 over reward leaves). Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from eth_utils import keccak, to_checksum_address

HashFn = Callable[[bytes], bytes]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def keccak256(data: bytes) -> bytes:
    return keccak(data)


def hash_pair(a: bytes, b: bytes, hash_fn: HashFn) -> bytes:
    """Parent of two nodes, order-independent (sorted pair)."""
    return hash_fn(a + b) if a <= b else hash_fn(b + a)


class MerkleTree:
    """A Merkle tree over 32-byte leaves; `root` and `proof(index)`."""

    def __init__(self, leaves: Sequence[bytes], hash_fn: HashFn = keccak256) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        for i, leaf in enumerate(leaves):
            if len(leaf) != 32:
                raise ValueError(f"leaf {i} is {len(leaf)} bytes, expected 32")
        self.hash_fn = hash_fn
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(self.levels[-1]) > 1:
            level = self.levels[-1]
            parents = [
                hash_pair(level[i], level[i + 1], hash_fn) for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                parents.append(level[-1])
            self.levels.append(parents)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def __len__(self) -> int:
        return len(self.levels[0])

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf `index` up to the root."""
        if not 0 <= index < len(self):
            raise IndexError(f"leaf index {index} out of range 0..{len(self) - 1}")
        proof = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


def merkle_root(leaves: Sequence[bytes], hash_fn: HashFn = keccak256) -> bytes:
    """Root of the tree over `leaves` (without keeping the levels around)."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = list(leaves)
    while len(level) > 1:
        parents = [hash_pair(level[i], level[i + 1], hash_fn) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])
        level = parents
    return level[0]


def verify_proof(
    leaf: bytes, proof: Sequence[bytes], root: bytes, hash_fn: HashFn = keccak256
) -> bool:
    """True when `proof` links `leaf` to `root`."""
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling, hash_fn)
    return node == root


def reward_leaf(account: str, cumulative_units: int) -> bytes:
    """Leaf of an epoch reward tree: keccak256(keccak256(abi.encode(address, uint256))).

    The double hash is OpenZeppelin's StandardMerkleTree convention: a 64-byte leaf preimage
    could otherwise be confused with an inner node (second-preimage attack). RunEscrow.vy computes
    the same.
    """
    if not 0 <= cumulative_units < 2**256:
        raise ValueError(f"cumulative_units {cumulative_units} out of uint256 range")
    address = bytes.fromhex(to_checksum_address(account)[2:])
    encoded = b"\x00" * 12 + address + cumulative_units.to_bytes(32, "big")
    return keccak256(keccak256(encoded))


@dataclass(frozen=True)
class RewardClaim:
    """What a node needs to claim on chain: its cumulative amount and the proof for one epoch."""

    epoch: int
    account: str
    cumulative_units: int
    proof: tuple[bytes, ...]
    root: bytes

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "account": self.account,
            "cumulative_units": self.cumulative_units,
            "proof": ["0x" + p.hex() for p in self.proof],
            "root": "0x" + self.root.hex(),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> RewardClaim:
        return cls(
            epoch=int(data["epoch"]),
            account=to_checksum_address(data["account"]),
            cumulative_units=int(data["cumulative_units"]),
            proof=tuple(bytes.fromhex(p.removeprefix("0x")) for p in data["proof"]),
            root=bytes.fromhex(data["root"].removeprefix("0x")),
        )


class RewardTree:
    """Epoch tree of cumulative rewards per EVM account (sorted by address: reproducible)."""

    def __init__(self, epoch: int, cumulative_units: Mapping[str, int]) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not cumulative_units:
            raise ValueError("an epoch reward tree needs at least one account")
        amounts: dict[str, int] = {}
        for account, units in cumulative_units.items():
            checksum = to_checksum_address(account)
            if checksum in amounts:
                raise ValueError(f"account {checksum} appears twice")
            if not isinstance(units, int) or units < 0:
                raise ValueError(f"cumulative units for {checksum} must be an int >= 0: {units!r}")
            amounts[checksum] = units
        self.epoch = epoch
        self.accounts = sorted(amounts, key=lambda a: a.lower())
        self.cumulative_units = amounts
        self._index = {a: i for i, a in enumerate(self.accounts)}
        self.tree = MerkleTree([reward_leaf(a, amounts[a]) for a in self.accounts], keccak256)

    @property
    def root(self) -> bytes:
        return self.tree.root

    @property
    def total_units(self) -> int:
        return sum(self.cumulative_units.values())

    def claim(self, account: str) -> RewardClaim:
        checksum = to_checksum_address(account)
        if checksum not in self._index:
            raise KeyError(f"account {checksum} has no reward in epoch {self.epoch}")
        return RewardClaim(
            epoch=self.epoch,
            account=checksum,
            cumulative_units=self.cumulative_units[checksum],
            proof=tuple(self.tree.proof(self._index[checksum])),
            root=self.root,
        )
