"""Ed25519 identities and signed requests.

A node (or sponsor, or the hub itself) is its key: the id is derived from the public key, so a
node that restarts with the same key file is the same node. Every control-plane request carries a
signature over (method, path, sha256(body), timestamp, nonce); the hub checks freshness and single
use of the nonce, so a captured request can be neither altered nor replayed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gridswarm.blobs import synced_temp_file

HEADER_KEY = "x-gridswarm-key"
HEADER_TIMESTAMP = "x-gridswarm-timestamp"
HEADER_NONCE = "x-gridswarm-nonce"
HEADER_SIGNATURE = "x-gridswarm-signature"


def node_id_from_public_key(public_key: bytes) -> str:
    """Short, stable id for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` under `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair with the id derived from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests, simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at `path`, creating it (mode 0600) on first use."""
        return cls.ensure(path)[0]

    @classmethod
    def ensure(cls, path: Path) -> tuple[Identity, bool]:
        """The key at `path` and whether this call created it.

        Creation is atomic: the key is written and fsynced under a temporary name, then linked
        to `path`, which fails if another process got there first; then that process's key is
        used. A reader never sees a half-written key, and two processes starting at once end up
        with the same one."""
        path = Path(path)
        if path.exists():
            return cls._load(path), False
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = synced_temp_file(path.parent, pem)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return cls._load(path), False
        finally:
            tmp.unlink(missing_ok=True)
        return identity, True

    @classmethod
    def _load(cls, path: Path) -> Identity:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def request_message(method: str, path: str, body_sha256: str, timestamp: str, nonce: str) -> bytes:
    """The canonical bytes a request signature covers (`body_sha256`: the body's hex sha256)."""
    return f"{method.upper()}\n{path}\n{body_sha256}\n{timestamp}\n{nonce}".encode()


def sign_request(
    identity: Identity, method: str, path: str, body: bytes, now_s: float | None = None
) -> dict[str, str]:
    """Headers that authenticate one request."""
    timestamp = f"{time.time() if now_s is None else now_s:.3f}"
    nonce = secrets.token_hex(16)
    body_sha256 = hashlib.sha256(body).hexdigest()
    signature = identity.sign(request_message(method, path, body_sha256, timestamp, nonce))
    return {
        HEADER_KEY: identity.public_key.hex(),
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature.hex(),
    }


class AuthError(Exception):
    """A request failed authentication; `status` is the HTTP code to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class VerifiedRequest:
    """Who signed a request, with which nonce and when; `body_sha256`: the hex sha256 of the
    body the signature covers, computed once here (an upload is stored under it, the
    blob store's name for the same bytes, without hashing them again)."""

    public_key: bytes
    nonce: str
    timestamp_s: float
    body_sha256: str = ""

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)


def verify_request(
    headers: dict[str, str],
    method: str,
    path: str,
    body: bytes,
    now_s: float,
    max_skew_s: float = 120.0,
) -> VerifiedRequest:
    """Check a request's signature and freshness (not nonce reuse: that needs the hub's store)."""
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [
        h
        for h in (HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
        if not lower.get(h)
    ]
    if missing:
        raise AuthError(401, f"unsigned request: missing header(s) {', '.join(missing)}")
    try:
        public_key = bytes.fromhex(lower[HEADER_KEY])
        signature = bytes.fromhex(lower[HEADER_SIGNATURE])
        timestamp_s = float(lower[HEADER_TIMESTAMP])
    except ValueError as exc:
        raise AuthError(400, f"malformed authentication header: {exc}") from exc
    nonce = lower[HEADER_NONCE]
    if len(public_key) != 32 or len(signature) != 64 or not 16 <= len(nonce) <= 64:
        raise AuthError(400, "malformed authentication header: wrong key, signature or nonce size")
    if abs(now_s - timestamp_s) > max_skew_s:
        raise AuthError(401, f"stale request: timestamp is {now_s - timestamp_s:+.0f} s off")
    body_sha256 = hashlib.sha256(body).hexdigest()
    message = request_message(method, path, body_sha256, lower[HEADER_TIMESTAMP], nonce)
    if not verify_signature(public_key, message, signature):
        raise AuthError(401, "bad signature")
    return VerifiedRequest(public_key, nonce, timestamp_s, body_sha256)
