"""Streaming DiLoCo's fragments (pure): which contiguous part of the flat parameter vector a round
syncs.

The flat vector (train/params.flatten order) is split into `fragments` contiguous ranges along
parameter-tensor boundaries, balanced by size; round r syncs fragment r % fragments. Hub and
nodes derive the same ranges from the model's tensor sizes, so an assignment needs no extra field
and the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

FragmentBounds = tuple[int, int]  # [start, end) in the flat parameter vector


def fragment_bounds(tensor_numels: Sequence[int], fragments: int) -> list[FragmentBounds]:
    """`fragments` contiguous [start, end) ranges covering [0, sum(tensor_numels)) in order, each
    a run of whole tensors, none empty, balanced by size: a fragment closes at the tensor
    boundary nearest its share of what is left. With fewer non-empty tensors than `fragments`
    there are as many fragments as non-empty tensors (a fragment is never empty)."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    sizes = [int(n) for n in tensor_numels if int(n) != 0]
    if any(n < 0 for n in sizes):
        raise ValueError("tensor sizes must be non-negative")
    total = sum(sizes)
    if total == 0:
        raise ValueError("a model without parameters has no fragments")
    count = min(fragments, len(sizes))
    bounds: list[FragmentBounds] = []
    start = offset = 0
    for i, n in enumerate(sizes):
        left = count - len(bounds)  # fragments still to close, this one included
        if left == 1:
            break  # the last fragment takes the rest
        tensors_after = len(sizes) - i - 1
        share = (total - start) / left
        before, after = offset - start, offset + n - start
        if before > 0 and after > share and share - before < after - share:
            bounds.append((start, offset))  # closing before this tensor is nearer the share
            start = offset
            left -= 1
            if left == 1:
                break
            share = (total - start) / left
            after = offset + n - start
        offset += n
        if after >= share or tensors_after < left:
            bounds.append((start, offset))
            start = offset
    bounds.append((start, total))
    return bounds


def fragment_of_round(round_number: int, fragments: int) -> int:
    """The fragment round `round_number` syncs."""
    if fragments < 1 or round_number < 0:
        raise ValueError(f"bad round {round_number} or fragment count {fragments}")
    return round_number % fragments
