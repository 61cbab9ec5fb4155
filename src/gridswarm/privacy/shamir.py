"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is the constant term of a random polynomial of degree threshold - 1;
the share for holder x (1 <= x < p) is the polynomial's value at x. Any `threshold` shares give the
secret back by Lagrange interpolation at 0; fewer reveal nothing about it. The Mersenne prime
2^521 - 1 is larger than any 64-byte secret, so secrets map into the field without reduction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, duplicated, malformed)."""


def _random_field_element(random_bytes: Callable[[int], bytes]) -> int:
    # 80 random bytes reduced mod p: the bias is below 2^-100.
    return int.from_bytes(random_bytes(80), "big") % PRIME


def split_secret(
    secret: bytes,
    xs: Iterable[int],
    threshold: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> dict[int, bytes]:
    """Shares of `secret` for the holders at field points `xs`: {x: share bytes}."""
    xs = list(xs)
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret has {len(secret)} bytes, at most {MAX_SECRET_BYTES} fit")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)} holders], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError(f"holder points must be distinct and in [1, p), got {xs}")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [_random_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine_shares(shares: Mapping[int, bytes], threshold: int, secret_len: int) -> bytes:
    """The `secret_len`-byte secret from at least `threshold` shares {x: share bytes}."""
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    points = []
    for x, share in list(shares.items())[:threshold]:
        if not 0 < x < PRIME:
            raise ShamirError(f"share point {x} is outside [1, p)")
        if len(share) != SHARE_BYTES:
            raise ShamirError(f"a share has {len(share)} bytes, expected {SHARE_BYTES}")
        points.append((x, int.from_bytes(share, "big")))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * secret_len):
        raise ShamirError("shares are inconsistent: the result does not fit the secret length")
    return secret.to_bytes(secret_len, "big")
