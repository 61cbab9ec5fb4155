"""EVM settlement: deploy and drive RewardToken + RunEscrow through web3.py on any EVM chain.

Contracts are compiled from the .vy sources next to this module with `vyper.compile_code` at run
time; the output is cached in memory and on disk (keyed by source hash and compiler version), so a
hub compiles once per machine. Every transaction is signed locally by an eth-account key (the hub's,
the sponsor's, the node's), so the same code works against anvil on 127.0.0.1 and a real L2.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vyper
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError

from gridswarm.ledger.merkle import RewardClaim, RewardTree

CONTRACTS_DIR = Path(__file__).parent / "contracts"
CONTRACT_NAMES = ("RewardToken", "RunEscrow")


class SettlementError(Exception):
    """A settlement transaction reverted or could not be sent; the message says why."""


@dataclass(frozen=True)
class CompiledContract:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    gas_used: int
    block_number: int


@dataclass(frozen=True)
class EscrowState:
    funded_units: int
    allocated_units: int
    claimed_units: int
    refunded_units: int
    epochs: int
    anchors: int
    closed: bool


def _cache_dir() -> Path:
    root = os.environ.get("GRIDSWARM_CACHE_DIR") or Path.home() / ".cache" / "gridswarm"
    return Path(root) / "vyper"


@functools.cache
def compile_contract(name: str) -> CompiledContract:
    """Compile contracts/<name>.vy (ABI + deploy bytecode), cached in memory and on disk."""
    if name not in CONTRACT_NAMES:
        raise ValueError(f"unknown contract {name!r}; expected one of {CONTRACT_NAMES}")
    source = (CONTRACTS_DIR / f"{name}.vy").read_text()
    key = hashlib.sha256(f"{vyper.__version__}\n{source}".encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{name}-{key}.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        return CompiledContract(name, data["abi"], data["bytecode"])
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    compiled = CompiledContract(name, out["abi"], out["bytecode"])
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"abi": compiled.abi, "bytecode": compiled.bytecode}))
        tmp.replace(cached)
    except OSError:
        pass  # a read-only home only costs a recompile next time
    return compiled


def _revert_reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).replace("execution reverted: ", "")


class EvmSettlement:
    """A run's token and escrow on one chain."""

    def __init__(self, w3: Web3, token_address: str, escrow_address: str) -> None:
        self.w3 = w3
        self.token = w3.eth.contract(
            address=Web3.to_checksum_address(token_address),
            abi=compile_contract("RewardToken").abi,
        )
        self.escrow = w3.eth.contract(
            address=Web3.to_checksum_address(escrow_address),
            abi=compile_contract("RunEscrow").abi,
        )
        self.chain_id = w3.eth.chain_id

    @classmethod
    def connect(cls, rpc_url: str, token_address: str, escrow_address: str) -> EvmSettlement:
        return cls(Web3(Web3.HTTPProvider(rpc_url)), token_address, escrow_address)

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        deployer: LocalAccount,
        *,
        hub_address: str,
        sponsor_address: str,
        token_address: str | None = None,
        name: str = "gridswarm reward",
        symbol: str = "GRID",
        decimals: int = 18,
    ) -> tuple[EvmSettlement, dict[str, int]]:
        """Deploy a token (unless `token_address` names one) and a run escrow; returns gas used."""
        gas: dict[str, int] = {}
        if token_address is None:
            token_address, gas["deploy_token"] = _deploy(
                w3, deployer, compile_contract("RewardToken"), name, symbol, decimals
            )
        escrow_address, gas["deploy_escrow"] = _deploy(
            w3,
            deployer,
            compile_contract("RunEscrow"),
            Web3.to_checksum_address(token_address),
            Web3.to_checksum_address(hub_address),
            Web3.to_checksum_address(sponsor_address),
        )
        return cls(w3, token_address, escrow_address), gas

    # ---- transactions --------------------------------------------------------------------------

    def _fees(self) -> dict[str, int]:
        """EIP-1559 fee fields good for a few blocks: 2 × base fee + tip."""
        tip = self.w3.eth.max_priority_fee
        base = self.w3.eth.get_block("latest")["baseFeePerGas"]
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base + tip}

    def _signed(
        self, sender: LocalAccount, call: Any, nonce: int | None = None, **fixed: int
    ) -> bytes:
        """Build and sign; `fixed` (gas, fee fields) skips the node's estimates for those."""
        if nonce is None:
            nonce = self.w3.eth.get_transaction_count(sender.address, "pending")
        try:
            tx = call.build_transaction(
                {"from": sender.address, "nonce": nonce, "chainId": self.chain_id, **fixed}
            )
        except ContractLogicError as exc:
            raise SettlementError(f"transaction would revert: {_revert_reason(exc)}") from exc
        return sender.sign_transaction(tx).raw_transaction

    def _wait(self, tx_hash: bytes) -> TxResult:
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        if receipt["status"] != 1:
            raise SettlementError(f"transaction {tx_hash.hex()} reverted")
        return TxResult("0x" + bytes(tx_hash).hex(), receipt["gasUsed"], receipt["blockNumber"])

    def _send(self, sender: LocalAccount, call: Any) -> TxResult:
        return self._wait(self.w3.eth.send_raw_transaction(self._signed(sender, call)))

    def mint(self, owner: LocalAccount, to_address: str, amount_units: int) -> TxResult:
        """Mint reward tokens (token owner only), e.g. to the sponsor before funding."""
        return self._send(
            owner, self.token.functions.mint(Web3.to_checksum_address(to_address), amount_units)
        )

    def fund(self, sponsor: LocalAccount, amount_units: int) -> TxResult:
        """Approve the escrow and fund the run with `amount_units` of the sponsor's tokens."""
        if amount_units <= 0:
            raise ValueError(f"amount_units must be > 0, got {amount_units}")
        self._send(sponsor, self.token.functions.approve(self.escrow.address, amount_units))
        return self._send(sponsor, self.escrow.functions.fund(amount_units))

    def post_epoch_root(self, hub: LocalAccount, tree: RewardTree) -> TxResult:
        """Publish an epoch's Merkle root of cumulative rewards (hub only, epochs in order)."""
        call = self.escrow.functions.post_root(tree.epoch, tree.root, tree.total_units)
        return self._send(hub, call)

    def claim(self, sender: LocalAccount, claim: RewardClaim) -> TxResult:
        """Claim cumulative − already claimed for `claim.account` (sender pays the gas)."""
        return self._send(sender, self._claim_call(claim))

    def claim_many(
        self, claims: Sequence[tuple[LocalAccount, RewardClaim]], gas_per_claim: int = 200_000
    ) -> list[TxResult]:
        """Send many claims before waiting for any receipt (pipelined, e.g. a relayer's batch).

        Gas limit and fees are fixed for the batch instead of estimated per transaction (unused
        gas is not charged); a claim that would revert is then reported from its receipt.
        """
        nonces: dict[str, int] = {}
        hashes = []
        fixed = {"gas": gas_per_claim, **self._fees()}
        for sender, claim in claims:
            if sender.address not in nonces:
                nonces[sender.address] = self.w3.eth.get_transaction_count(
                    sender.address, "pending"
                )
            raw = self._signed(sender, self._claim_call(claim), nonces[sender.address], **fixed)
            nonces[sender.address] += 1
            hashes.append(self.w3.eth.send_raw_transaction(raw))
        return [self._wait(h) for h in hashes]

    def _claim_call(self, claim: RewardClaim) -> Any:
        return self.escrow.functions.claim(
            Web3.to_checksum_address(claim.account),
            claim.epoch,
            claim.cumulative_units,
            list(claim.proof),
        )

    def anchor_checkpoint(self, hub: LocalAccount, seq: int, merkle_root: bytes) -> TxResult:
        """Write an embedded-ledger checkpoint root on chain (write once per seq)."""
        return self._send(hub, self.escrow.functions.anchor(seq, merkle_root))

    def close(self, sender: LocalAccount) -> TxResult:
        return self._send(sender, self.escrow.functions.close())

    def refund(self, sponsor: LocalAccount) -> TxResult:
        """Return unallocated funds to the sponsor once the run is closed."""
        return self._send(sponsor, self.escrow.functions.refund())

    # ---- reads ---------------------------------------------------------------------------------

    def token_balance(self, address: str) -> int:
        return self.token.functions.balanceOf(Web3.to_checksum_address(address)).call()

    def claimed_units(self, address: str) -> int:
        return self.escrow.functions.claimed(Web3.to_checksum_address(address)).call()

    def epoch_root(self, epoch: int) -> bytes:
        return bytes(self.escrow.functions.roots(epoch).call())

    def verify_claim(self, claim: RewardClaim) -> bool:
        return self.escrow.functions.verify_claim(
            Web3.to_checksum_address(claim.account),
            claim.epoch,
            claim.cumulative_units,
            list(claim.proof),
        ).call()

    def anchored_roots(self) -> dict[int, bytes]:
        """Every checkpoint seq -> root anchored on chain (read from the chain alone)."""
        f = self.escrow.functions
        seqs = [f.anchor_seq(i).call() for i in range(f.anchor_count().call())]
        return {s: bytes(f.anchors(s).call()) for s in seqs}

    def state(self) -> EscrowState:
        f = self.escrow.functions
        return EscrowState(
            funded_units=f.funded().call(),
            allocated_units=f.allocated().call(),
            claimed_units=f.claimed_total().call(),
            refunded_units=f.refunded().call(),
            epochs=f.epochs().call(),
            anchors=f.anchor_count().call(),
            closed=f.closed().call(),
        )

    def addresses(self) -> Mapping[str, str]:
        return {"token": self.token.address, "escrow": self.escrow.address}


def _deploy(
    w3: Web3, deployer: LocalAccount, compiled: CompiledContract, *args: Any
) -> tuple[str, int]:
    factory = w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
    tx = factory.constructor(*args).build_transaction(
        {
            "from": deployer.address,
            "nonce": w3.eth.get_transaction_count(deployer.address, "pending"),
            "chainId": w3.eth.chain_id,
        }
    )
    tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise SettlementError(f"deploying {compiled.name} reverted")
    return receipt["contractAddress"], receipt["gasUsed"]
