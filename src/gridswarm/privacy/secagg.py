"""SecAgg+: secure aggregation over a sparse neighbour graph (Bonawitz 2017, Bell 2020).

The hub learns the sum of the survivors' updates and nothing about any single update. Each node
adds to its quantised update (integers mod 2^32) a self mask PRG(b_i) and, for each neighbour j,
+-PRG(s_ij) where s_ij comes from an X25519 agreement between i and j; pairwise masks cancel in
the sum. Seeds b_i and mask keys sk_i are Shamir-shared among the neighbours, so the hub can
remove the self masks of the nodes that sent an input and the pairwise masks of the nodes that
dropped after sharing. Masks are ChaCha20 keystreams (never a statistical PRNG).

One round is four stages, each a pure state transition exchanging plain dataclass messages:

    hub                                               node i
    config = make_config(...) ──────────────────────► SecAggClient(config, node_id)
                              ◄── AdvertiseKeys ───── client.advertise_keys()
    server.collect_keys(msgs) ─── KeyBroadcast ─────► client.share_keys(broadcast)
                              ◄── ShareKeys ───────── (encrypted Shamir shares for neighbours)
    server.collect_shares(msgs) ─ ShareDelivery ────► client.mask_input(delivery, update)
                              ◄── MaskedInput ─────── (uint32 words, uniform to the hub)
    server.collect_masked(msgs) ─ UnmaskRequest ────► client.unmask(request)
                              ◄── UnmaskShares ────── (b-shares of survivors, sk-shares of dropped)
    server.collect_unmask(msgs) -> SecAggResult(total, survivors, dropped)

A node missing from a stage's messages has dropped out. At most `max_dropouts` (t) of the config's
nodes may drop during the whole round; with t + 1 the stage raises `SecAggDropoutError`. Each
secret is shared among the node and its k neighbours with threshold k + 1 - t, which t dropouts
cannot defeat; t < (k + 1) / 2 keeps the threshold a strict majority, so the hub can never hold
both a node's self-mask seed and its mask key. Threat model: honest-but-curious hub, any number of
curious nodes below the threshold; message authenticity comes from the hub's signed HTTP layer.

Quantisation: x -> round(clip(x, -R, R) * scale) mod 2^32 with scale = 2^floor(log2((2^31 - 1) /
(n R))), the largest power of two for which the sum of n clipped updates cannot wrap. A codec
(fp16, int8) may be applied to the update before: masking works on its decoded floats.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gridswarm.privacy.shamir import SHARE_BYTES, ShamirError, combine_shares, split_secret

RandomBytes = Callable[[int], bytes]
RING = 1 << 32
KEY_BYTES = 32


class SecAggError(ValueError):
    """A message or call that breaks the protocol (wrong stage, unknown sender, bad share...)."""


class SecAggDropoutError(SecAggError):
    """More nodes dropped out than the round tolerates: the sum cannot (or must not) be rebuilt."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SecAggConfig:
    """Everything both sides must agree on for one round. The hub makes it (`make_config`) and
    sends it to the sampled nodes; `session` binds all keys and masks to this round."""

    session: str  # e.g. "<run id>/<round>": never reused
    node_ids: tuple[str, ...]  # sampled nodes; position + 1 is the node's Shamir point
    n_neighbours: int  # k: even, or >= n - 1 for the complete graph (classic SecAgg)
    max_dropouts: int  # t
    vector_length: int  # d
    clip_range: float  # R: every coordinate is clipped to [-R, R] before quantisation
    graph_seed: bytes  # the hub's randomness for the neighbour ring

    def __post_init__(self) -> None:
        n = len(self.node_ids)
        if n < 2 or len(set(self.node_ids)) != n:
            raise ValueError(f"node_ids must hold >= 2 distinct ids, got {n} ({self.node_ids!r})")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {self.vector_length}")
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        if self.n_neighbours < n - 1 and (self.n_neighbours < 2 or self.n_neighbours % 2):
            raise ValueError(
                f"n_neighbours must be even and >= 2 (or >= n - 1 = {n - 1}), "
                f"got {self.n_neighbours}"
            )
        if self.max_dropouts < 0 or 2 * self.max_dropouts >= self.degree + 1:
            raise ValueError(
                f"max_dropouts must be in [0, {self.degree // 2}] for {self.degree} neighbours "
                f"(the share threshold k + 1 - t must stay a strict majority), "
                f"got {self.max_dropouts}"
            )
        if self.scale < 1:
            raise ValueError(
                f"clip_range {self.clip_range} x {n} nodes does not fit a 32-bit sum; lower it"
            )

    @property
    def degree(self) -> int:
        """Neighbours per node (k, capped at n - 1)."""
        return min(self.n_neighbours, len(self.node_ids) - 1)

    @property
    def threshold(self) -> int:
        """Shares needed to rebuild a secret: k + 1 holders (neighbours + self) minus t."""
        return self.degree + 1 - self.max_dropouts

    @property
    def scale(self) -> float:
        """Fixed-point scale: quantised = round(clip(x) * scale); the resolution is 1 / scale."""
        limit = (2**31 - 1) / (len(self.node_ids) * self.clip_range)
        return 2.0 ** math.floor(math.log2(limit)) if limit >= 1 else 0.0

    @property
    def session_id(self) -> bytes:
        """A hash of the whole config: the domain-separation label for every derived key."""
        blob = json.dumps(_to_jsonable(self), sort_keys=True).encode()
        return hashlib.sha256(b"gridswarm/secagg/v1|" + blob).digest()

    def index(self, node_id: str) -> int:
        try:
            return self._index_map[node_id]
        except KeyError:
            raise SecAggError(f"node {node_id!r} is not part of session {self.session!r}") from None

    @property
    def _index_map(self) -> dict[str, int]:
        cached = self.__dict__.get("_idx")
        if cached is None:
            cached = {nid: i for i, nid in enumerate(self.node_ids)}
            object.__setattr__(self, "_idx", cached)
        return cached

    def neighbours(self, node_id: str) -> tuple[str, ...]:
        """The node's neighbours: a ring over the ids shuffled by `graph_seed`, k/2 on each side
        (a random Harary graph, as in SecAgg+); the complete graph when k >= n - 1."""
        ring = self.__dict__.get("_ring")
        if ring is None:
            ring = sorted(
                self.node_ids,
                key=lambda nid: hashlib.sha256(self.graph_seed + nid.encode()).digest(),
            )
            object.__setattr__(self, "_ring", ring)
            object.__setattr__(self, "_ring_pos", {nid: p for p, nid in enumerate(ring)})
        n = len(ring)
        if self.degree >= n - 1:
            return tuple(nid for nid in self.node_ids if nid != node_id)
        self.index(node_id)
        pos = self.__dict__["_ring_pos"][node_id]
        half = self.degree // 2
        return tuple(ring[(pos + o) % n] for o in range(-half, half + 1) if o != 0)


def make_config(
    session: str,
    node_ids: Iterable[str],
    vector_length: int,
    n_neighbours: int = 10,
    max_dropouts: int = 2,
    clip_range: float = 1.0,
    random_bytes: RandomBytes = os.urandom,
) -> SecAggConfig:
    """The hub's round config with a fresh graph seed."""
    return SecAggConfig(
        session=session,
        node_ids=tuple(node_ids),
        n_neighbours=n_neighbours,
        max_dropouts=max_dropouts,
        vector_length=vector_length,
        clip_range=clip_range,
        graph_seed=random_bytes(16),
    )


# --------------------------------------------------------------------------- primitives


def quantize(update: torch.Tensor, config: SecAggConfig) -> np.ndarray:
    """Clip to [-R, R], scale, round to nearest, and wrap into uint32 (two's complement)."""
    x = update.detach().to(torch.float64).reshape(-1)
    if x.numel() != config.vector_length:
        raise SecAggError(
            f"update has {x.numel()} values, the round expects {config.vector_length}"
        )
    if not bool(torch.isfinite(x).all()):
        raise SecAggError("update has non-finite values")
    q = torch.round(x.clamp(-config.clip_range, config.clip_range) * config.scale)
    return q.to(torch.int32).numpy().view(np.uint32).copy()  # two's complement = mod 2^32


def dequantize(words: np.ndarray, config: SecAggConfig) -> torch.Tensor:
    """A sum of quantised updates (uint32 mod 2^32) back to float32, read as signed int32."""
    signed = words.astype(np.uint32).view(np.int32).astype(np.float64) / config.scale
    return torch.from_numpy(signed.astype(np.float32))


def prg(seed: bytes, n_words: int) -> np.ndarray:
    """n_words uniform uint32 from a 32-byte seed: the ChaCha20 keystream (zero nonce; every seed
    is used for one stream only)."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * n_words)), dtype="<u4")


def _kdf(shared: bytes, label: bytes, session_id: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session_id, info=b"gridswarm/" + label
    ).derive(shared)


def _pair_seed(private: X25519PrivateKey, public: bytes, session_id: bytes) -> bytes:
    """The pairwise mask seed s_ij (same from both ends)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return _kdf(shared, b"secagg/mask", session_id)


def _pair_sign(config: SecAggConfig, i: str, j: str) -> int:
    return 1 if config.index(i) < config.index(j) else -1


def _share_aead(private: X25519PrivateKey, public: bytes, session_id: bytes) -> ChaCha20Poly1305:
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return ChaCha20Poly1305(_kdf(shared, b"secagg/share", session_id))


def _share_nonce(sender_index: int) -> bytes:
    # The pair key is the same in both directions; the sender's index keeps nonces apart.
    return sender_index.to_bytes(4, "big") + bytes(8)


def _commit(session_id: bytes, seed: bytes) -> bytes:
    return hashlib.sha256(b"gridswarm/secagg/seed|" + session_id + seed).digest()


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class AdvertiseKeys:
    node_id: str
    cipher_public_key: bytes  # X25519, for encrypting shares
    mask_public_key: bytes  # X25519, for pairwise masks


@dataclass(frozen=True)
class KeyBroadcast:
    public_keys: dict[str, tuple[bytes, bytes]]  # neighbour -> (cipher pk, mask pk)


@dataclass(frozen=True)
class ShareKeys:
    node_id: str
    encrypted_shares: dict[str, bytes]  # recipient neighbour -> AEAD ciphertext
    seed_commitment: bytes  # sha256 of the self-mask seed, to check its reconstruction


@dataclass(frozen=True)
class ShareDelivery:
    encrypted_shares: dict[str, bytes]  # sender neighbour -> ciphertext addressed to this node


@dataclass(frozen=True)
class MaskedInput:
    node_id: str
    masked: bytes  # vector_length little-endian uint32 words


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]  # sent a masked input: reveal their self-mask seed shares
    dropped: tuple[str, ...]  # shared keys but sent no input: reveal their mask-key shares


@dataclass(frozen=True)
class UnmaskShares:
    node_id: str
    seed_shares: dict[str, bytes]  # owner -> Shamir share of owner's self-mask seed
    key_shares: dict[str, bytes]  # owner -> Shamir share of owner's mask private key


@dataclass(frozen=True)
class SecAggResult:
    total: torch.Tensor  # float32 [d]: the sum of the survivors' (clipped, quantised) updates
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    integer_sum: np.ndarray = field(repr=False)  # the exact sum mod 2^32


_MESSAGES = {
    cls.__name__: cls
    for cls in (
        SecAggConfig,
        AdvertiseKeys,
        KeyBroadcast,
        ShareKeys,
        ShareDelivery,
        MaskedInput,
        UnmaskRequest,
        UnmaskShares,
    )
}


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in fields(value)}
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"], validate=True)
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


def encode_message(message: Any) -> bytes:
    """A config or message as JSON bytes (bytes fields base64) for the hub's HTTP API."""
    name = type(message).__name__
    if name not in _MESSAGES:
        raise SecAggError(f"{name} is not a SecAgg message")
    return json.dumps({"type": name, "body": _to_jsonable(message)}).encode()


def decode_message(data: bytes) -> Any:
    """Inverse of `encode_message`; malformed input raises SecAggError."""
    try:
        doc = json.loads(data)
        cls = _MESSAGES[doc["type"]]
        body = {k: _from_jsonable(v) for k, v in doc["body"].items()}
        return cls(**body)
    except (ValueError, KeyError, TypeError) as exc:
        raise SecAggError(f"malformed SecAgg message: {exc}") from exc


# --------------------------------------------------------------------------- client


class Stage(Enum):
    ADVERTISE = 1
    SHARE = 2
    MASK = 3
    UNMASK = 4
    DONE = 5


def _expect(actual: Stage, expected: Stage, what: str) -> None:
    if actual is not expected:
        raise SecAggError(f"{what} called at stage {actual.name}, expected {expected.name}")


def generate_keys(random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes]:
    """A fresh (cipher, mask) pair of X25519 private keys, for one round only."""
    return random_bytes(KEY_BYTES), random_bytes(KEY_BYTES)


def public_keys(private_keys: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """The (cipher, mask) public keys of `generate_keys`'s private pair."""
    return tuple(  # type: ignore[return-value]
        X25519PrivateKey.from_private_bytes(k).public_key().public_bytes_raw() for k in private_keys
    )


class SecAggClient:
    """One node's side of one round. Call the four methods in order, once each."""

    def __init__(
        self,
        config: SecAggConfig,
        node_id: str,
        random_bytes: RandomBytes = os.urandom,
        private_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`private_keys` = (cipher, mask) X25519 private keys made before the config existed
        (a live node advertises its keys when it finishes training; see `generate_keys`)."""
        config.index(node_id)
        self.config = config
        self.node_id = node_id
        self.stage = Stage.ADVERTISE
        self._random = random_bytes
        cipher, mask = private_keys or generate_keys(random_bytes)
        self._cipher_key = X25519PrivateKey.from_private_bytes(cipher)
        self._mask_key = X25519PrivateKey.from_private_bytes(mask)
        self._neighbours = set(config.neighbours(node_id))
        self._peer_keys: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (seed share, key share)

    def advertise_keys(self) -> AdvertiseKeys:
        _expect(self.stage, Stage.ADVERTISE, "advertise_keys")
        self.stage = Stage.SHARE
        return AdvertiseKeys(
            self.node_id,
            self._cipher_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
        )

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Shamir-share the self-mask seed and the mask key among the neighbours that advertised."""
        _expect(self.stage, Stage.SHARE, "share_keys")
        cfg = self.config
        unknown = set(broadcast.public_keys) - self._neighbours
        if unknown:
            raise SecAggError(f"key broadcast names non-neighbours {sorted(unknown)}")
        all_keys = [k for pair in broadcast.public_keys.values() for k in pair]
        if len(set(all_keys)) != len(all_keys) or any(len(k) != KEY_BYTES for k in all_keys):
            raise SecAggError("key broadcast holds repeated or malformed public keys")
        self._require_holders(len(broadcast.public_keys), "advertised keys")
        self._peer_keys = dict(broadcast.public_keys)
        self._seed = self._random(KEY_BYTES)
        holders = [self.node_id, *sorted(self._peer_keys, key=cfg.index)]
        points = [cfg.index(h) + 1 for h in holders]
        seed_shares = split_secret(self._seed, points, cfg.threshold, self._random)
        key_shares = split_secret(
            self._mask_key.private_bytes_raw(), points, cfg.threshold, self._random
        )
        me = cfg.index(self.node_id)
        self._held[self.node_id] = (seed_shares[me + 1], key_shares[me + 1])
        encrypted = {}
        for peer, (cipher_pk, _) in self._peer_keys.items():
            x = cfg.index(peer) + 1
            plaintext = seed_shares[x] + key_shares[x]
            aad = cfg.session_id + self.node_id.encode() + b"\x00" + peer.encode()
            aead = _share_aead(self._cipher_key, cipher_pk, cfg.session_id)
            encrypted[peer] = aead.encrypt(_share_nonce(me), plaintext, aad)
        self.stage = Stage.MASK
        return ShareKeys(self.node_id, encrypted, _commit(cfg.session_id, self._seed))

    def mask_input(self, delivery: ShareDelivery, update: torch.Tensor) -> MaskedInput:
        """Store the neighbours' shares, then mask the quantised update."""
        _expect(self.stage, Stage.MASK, "mask_input")
        cfg = self.config
        unknown = set(delivery.encrypted_shares) - set(self._peer_keys)
        if unknown:
            raise SecAggError(f"shares from nodes that did not advertise keys: {sorted(unknown)}")
        self._require_holders(len(delivery.encrypted_shares), "shared keys")
        for sender, ciphertext in delivery.encrypted_shares.items():
            aad = cfg.session_id + sender.encode() + b"\x00" + self.node_id.encode()
            aead = _share_aead(self._cipher_key, self._peer_keys[sender][0], cfg.session_id)
            try:
                plaintext = aead.decrypt(_share_nonce(cfg.index(sender)), ciphertext, aad)
            except InvalidTag:
                raise SecAggError(f"share from {sender!r} fails authentication") from None
            if len(plaintext) != 2 * SHARE_BYTES:
                raise SecAggError(f"share from {sender!r} has the wrong length")
            self._held[sender] = (plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:])
        masked = quantize(update, cfg)
        masked += prg(self._seed, cfg.vector_length)
        for peer in delivery.encrypted_shares:
            stream = prg(
                _pair_seed(self._mask_key, self._peer_keys[peer][1], cfg.session_id), len(masked)
            )
            if _pair_sign(cfg, self.node_id, peer) > 0:
                masked += stream
            else:
                masked -= stream
        self.stage = Stage.UNMASK
        return MaskedInput(self.node_id, masked.astype("<u4").tobytes())

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal seed shares of survivors and key shares of dropped nodes, never both for one."""
        _expect(self.stage, Stage.UNMASK, "unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError(
                f"nodes listed as both survivor and dropped: {sorted(survivors & dropped)}"
            )
        if self.node_id not in survivors:
            raise SecAggError(
                f"unmask request does not list this node ({self.node_id!r}) as a survivor"
            )
        absent = len(self.config.node_ids) - len(survivors)
        if absent > self.config.max_dropouts:
            raise SecAggDropoutError(
                f"unmask request implies {absent} dropouts, more than max_dropouts="
                f"{self.config.max_dropouts}; refusing to reveal shares"
            )
        seed_shares = {o: s for o, (s, _) in self._held.items() if o in survivors}
        key_shares = {o: k for o, (_, k) in self._held.items() if o in dropped}
        self.stage = Stage.DONE
        return UnmaskShares(self.node_id, seed_shares, key_shares)

    def _require_holders(self, n_peers: int, what: str) -> None:
        if n_peers + 1 < self.config.threshold:
            raise SecAggDropoutError(
                f"only {n_peers} of node {self.node_id!r}'s {self.config.degree} neighbours "
                f"{what}; "
                f"its secrets need {self.config.threshold} holders"
            )


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The hub's side of one round: routes messages and, at the end, removes the masks."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.stage = Stage.ADVERTISE
        self._keys: dict[str, AdvertiseKeys] = {}
        self._shared: dict[str, ShareKeys] = {}
        self._masked: dict[str, np.ndarray] = {}

    def _collect(
        self, messages: Iterable[Any], allowed: Iterable[str], what: str
    ) -> dict[str, Any]:
        allowed = set(allowed)
        out: dict[str, Any] = {}
        for msg in messages:
            if msg.node_id not in allowed:
                raise SecAggError(
                    f"{what} from {msg.node_id!r}, which is not expected at this stage"
                )
            if msg.node_id in out:
                raise SecAggError(f"two {what} messages from {msg.node_id!r}")
            out[msg.node_id] = msg
        absent = len(self.config.node_ids) - len(out)
        if absent > self.config.max_dropouts:
            raise SecAggDropoutError(
                f"{absent} of {len(self.config.node_ids)} nodes dropped out by the {what} stage; "
                f"the round tolerates max_dropouts={self.config.max_dropouts}"
            )
        return out

    def collect_keys(self, messages: Iterable[AdvertiseKeys]) -> dict[str, KeyBroadcast]:
        """Stage 1 -> 2: send each node the public keys of its neighbours that advertised."""
        _expect(self.stage, Stage.ADVERTISE, "collect_keys")
        self._keys = self._collect(messages, self.config.node_ids, "AdvertiseKeys")
        self.stage = Stage.SHARE
        return {
            nid: KeyBroadcast(
                {
                    peer: (self._keys[peer].cipher_public_key, self._keys[peer].mask_public_key)
                    for peer in self.config.neighbours(nid)
                    if peer in self._keys
                }
            )
            for nid in self._keys
        }

    def collect_shares(self, messages: Iterable[ShareKeys]) -> dict[str, ShareDelivery]:
        """Stage 2 -> 3: forward each encrypted share to its recipient."""
        _expect(self.stage, Stage.SHARE, "collect_shares")
        self._shared = self._collect(messages, self._keys, "ShareKeys")
        inbox: dict[str, dict[str, bytes]] = {nid: {} for nid in self._shared}
        for sender, msg in self._shared.items():
            for recipient, ciphertext in msg.encrypted_shares.items():
                if recipient not in self.config.neighbours(sender):
                    raise SecAggError(f"{sender!r} sent a share to non-neighbour {recipient!r}")
                if recipient in inbox:
                    inbox[recipient][sender] = ciphertext
        self.stage = Stage.MASK
        return {nid: ShareDelivery(shares) for nid, shares in inbox.items()}

    def collect_masked(self, messages: Iterable[MaskedInput]) -> dict[str, UnmaskRequest]:
        """Stage 3 -> 4: keep the masked inputs; ask the survivors for the unmasking shares."""
        _expect(self.stage, Stage.MASK, "collect_masked")
        received = self._collect(messages, self._shared, "MaskedInput")
        for nid, msg in received.items():
            if len(msg.masked) != 4 * self.config.vector_length:
                raise SecAggError(f"masked input from {nid!r} has {len(msg.masked)} bytes")
            self._masked[nid] = np.frombuffer(msg.masked, dtype="<u4")
        survivors = tuple(sorted(self._masked, key=self.config.index))
        dropped = tuple(sorted(set(self._shared) - set(self._masked), key=self.config.index))
        self._request = UnmaskRequest(survivors, dropped)
        self.stage = Stage.UNMASK
        return {nid: self._request for nid in survivors}

    def collect_unmask(self, messages: Iterable[UnmaskShares]) -> SecAggResult:
        """Stage 4: rebuild survivors' seeds and dropped nodes' mask keys, remove all masks."""
        _expect(self.stage, Stage.UNMASK, "collect_unmask")
        cfg = self.config
        answers = self._collect(messages, self._masked, "UnmaskShares")
        survivors, dropped = self._request.survivors, self._request.dropped
        total = np.zeros(cfg.vector_length, dtype=np.uint32)
        for nid in survivors:
            total += self._masked[nid]
        for nid in survivors:
            seed = self._rebuild(nid, answers, "seed_shares")
            if _commit(cfg.session_id, seed) != self._shared[nid].seed_commitment:
                raise SecAggError(f"reconstructed self-mask seed of {nid!r} fails its commitment")
            total -= prg(seed, cfg.vector_length)
        for nid in dropped:
            key = X25519PrivateKey.from_private_bytes(self._rebuild(nid, answers, "key_shares"))
            if key.public_key().public_bytes_raw() != self._keys[nid].mask_public_key:
                raise SecAggError(
                    f"reconstructed mask key of {nid!r} does not match its public key"
                )
            for peer in cfg.neighbours(nid):
                # peer masked with nid only if nid's share reached it.
                if peer not in self._masked or peer not in self._shared[nid].encrypted_shares:
                    continue
                stream = prg(
                    _pair_seed(key, self._keys[peer].mask_public_key, cfg.session_id), len(total)
                )
                # peer added sign(peer, nid) * stream; take it out.
                if _pair_sign(cfg, peer, nid) > 0:
                    total -= stream
                else:
                    total += stream
        self.stage = Stage.DONE
        return SecAggResult(dequantize(total, cfg), survivors, dropped, total)

    def _rebuild(self, owner: str, answers: Mapping[str, UnmaskShares], kind: str) -> bytes:
        shares = {
            self.config.index(holder) + 1: getattr(msg, kind)[owner]
            for holder, msg in answers.items()
            if owner in getattr(msg, kind)
        }
        secret = "self-mask seed" if kind == "seed_shares" else "mask key"
        if len(shares) < self.config.threshold:
            raise SecAggDropoutError(
                f"the {secret} of {owner!r} needs {self.config.threshold} shares, only "
                f"{len(shares)} of its holders answered"
            )
        try:
            return combine_shares(shares, self.config.threshold, KEY_BYTES)
        except ShamirError as exc:
            raise SecAggError(f"the {secret} of {owner!r} cannot be rebuilt: {exc}") from exc


# --------------------------------------------------------------------------- in-process driver


def simulate_round(
    config: SecAggConfig,
    updates: Mapping[str, torch.Tensor],
    drop_before: Mapping[str, Stage] | None = None,
    random_bytes: RandomBytes = os.urandom,
) -> SecAggResult:
    """Run all four stages in one process (tests, benchmarks, the simulator). `drop_before` maps a
    node to the stage it never answers (e.g. Stage.MASK: it shared keys, then vanished)."""
    drop_before = drop_before or {}

    def alive(nid: str, stage: Stage) -> bool:
        return nid not in drop_before or stage.value < drop_before[nid].value

    server = SecAggServer(config)
    clients = {nid: SecAggClient(config, nid, random_bytes) for nid in config.node_ids}
    adv = [c.advertise_keys() for nid, c in clients.items() if alive(nid, Stage.ADVERTISE)]
    broadcasts = server.collect_keys(adv)
    shares = [clients[n].share_keys(b) for n, b in broadcasts.items() if alive(n, Stage.SHARE)]
    deliveries = server.collect_shares(shares)
    masked = [
        clients[n].mask_input(d, updates[n]) for n, d in deliveries.items() if alive(n, Stage.MASK)
    ]
    requests = server.collect_masked(masked)
    answers = [clients[n].unmask(r) for n, r in requests.items() if alive(n, Stage.UNMASK)]
    return server.collect_unmask(answers)
