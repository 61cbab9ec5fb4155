"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from gridswarm.privacy.shamir import PRIME, ShamirError, combine_shares, split_secret


def test_any_threshold_subset_rebuilds_the_secret() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, [1, 2, 3, 4, 5], threshold=3)
    for subset in itertools.combinations(shares, 3):
        assert combine_shares({x: shares[x] for x in subset}, 3, 32) == secret


def test_fewer_than_threshold_is_refused_and_wrong_threshold_gives_garbage() -> None:
    secret = b"\x00" * 31 + b"\x07"
    shares = split_secret(secret, [3, 9, 11], threshold=3)
    with pytest.raises(ShamirError, match="need 3 shares"):
        combine_shares({3: shares[3], 9: shares[9]}, 3, 32)
    # Interpolating a degree-2 polynomial with 2 points does not give the secret.
    with pytest.raises(ShamirError, match="inconsistent"):
        combine_shares({3: shares[3], 9: shares[9]}, 2, 32)


def test_tampered_share_changes_the_result() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, [1, 2, 3], threshold=2)
    bad = bytearray(shares[2])
    bad[-1] ^= 1
    try:
        result = combine_shares({1: shares[1], 2: bytes(bad)}, 2, 32)
    except ShamirError:
        return
    assert result != secret


def test_bad_parameters() -> None:
    with pytest.raises(ShamirError, match="at most 64"):
        split_secret(bytes(65), [1, 2], 2)
    with pytest.raises(ShamirError, match="threshold"):
        split_secret(bytes(32), [1, 2], 3)
    with pytest.raises(ShamirError, match="distinct"):
        split_secret(bytes(32), [1, 1, 2], 2)
    with pytest.raises(ShamirError, match="distinct"):
        split_secret(bytes(32), [0, 1], 2)
    with pytest.raises(ShamirError, match="outside"):
        combine_shares({PRIME: bytes(66)}, 1, 32)
    with pytest.raises(ShamirError, match="bytes"):
        combine_shares({1: bytes(10)}, 1, 32)
