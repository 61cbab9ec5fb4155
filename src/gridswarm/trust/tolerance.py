"""Replay audits that tolerate honest nondeterminism (GPUs, different thread counts) — pure.

A CPU replay with the node's thread count reproduces an honest update bit for bit, so that stays
the rule there. A GPU replay does not: kernels reduce in different orders from run to run. The hub
then replays on the same device class and accepts the upload when

    relative L2 distance (upload, replay) <= max(k × d_honest, floor)

where d_honest is the largest relative L2 distance the hub itself has seen between two honest
reruns of the same assignment (its own replays with different thread counts, or a second GPU run),
recorded per (run, device class) on the ledger as `audit_calibration` entries. Distances are taken
between decoded payloads (after the run's codec), because that is what the node uploads.

What it lets through: an update that differs from the honest one by at most about k times what
honest reruns differ by (e.g. ~1e-5 relative on CPU threads): a cheater may perturb its update
that little and nothing more; skipping steps, other data or scaling moves it by far more.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

CALIBRATION_RERUNS = 3  # honest rerun pairs recorded per (run, device class) before trusting it


class ReplayMatch(StrEnum):
    EXACT = "exact"  # bit for bit
    TOLERANCE = "tolerance"  # within the calibrated tolerance


@dataclass(frozen=True)
class Calibration:
    """What honest reruns of one device class have shown: the largest relative L2 distance
    between two of them, over `pairs` pairs."""

    device: str
    honest_max: float = 0.0
    pairs: int = 0

    def with_pair(self, distance: float) -> Calibration:
        return Calibration(self.device, max(self.honest_max, distance), self.pairs + 1)

    @property
    def settled(self) -> bool:
        return self.pairs >= CALIBRATION_RERUNS


def replay_match(setting: str, device: str) -> ReplayMatch:
    """The comparison for a contribution made on `device` (`cpu`, `cuda/<model>`, `mps`) under
    `trust.replay_match` (`auto`: exact on CPU, tolerance elsewhere)."""
    if setting == "auto":
        return ReplayMatch.EXACT if device == "cpu" else ReplayMatch.TOLERANCE
    return ReplayMatch(setting)


def relative_l2(upload: torch.Tensor, replay: torch.Tensor) -> float:
    """||upload - replay|| / ||replay|| (a zero replay compares by the absolute norm)."""
    diff = (upload.double() - replay.double()).norm().item()
    scale = replay.double().norm().item()
    return diff / scale if scale > 0 else diff


def tolerance(cal: Calibration, k: float, floor: float) -> float:
    return max(k * cal.honest_max, floor)


def judge(distance: float, cal: Calibration, k: float, floor: float) -> str | None:
    """None if `distance` is within the tolerance, else why not (for the verdict)."""
    limit = tolerance(cal, k, floor)
    if distance <= limit:
        return None
    return (
        f"relative L2 distance {distance:.3g} from the replay exceeds the tolerance {limit:.3g} "
        f"(max({k:g} × {cal.honest_max:.3g} seen between {cal.pairs} honest rerun pair(s) on "
        f"{cal.device}, floor {floor:g}))"
    )
