"""Byzantine attacks for tests and benchmarks: what malicious nodes send instead of honest work.

`apply_attack` is pure: from the honest updates of a round (which an omniscient attacker is assumed
to see, the usual worst case) it builds the rows the attackers submit. `garbage_batches` is the
other kind of attack: the node trains normally but on data that is not the run's (random tokens,
shuffled text or wrong targets), so its pseudo-gradient looks like real work.

All randomness comes from a `torch.Generator` seeded with `rng_seed`: an attack is reproducible.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from statistics import NormalDist

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _generator(rng_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng_seed))


def _picked_rows(honest: torch.Tensor, n_attackers: int, rng_seed: int) -> torch.Tensor:
    """The honest update each attacker pretends to have computed (drawn with replacement)."""
    pick = torch.randint(0, honest.shape[0], (n_attackers,), generator=_generator(rng_seed))
    return honest[pick]


def sign_flip(
    honest: torch.Tensor, n_attackers: int, rng_seed: int, scale: float = 1.0
) -> torch.Tensor:
    """-scale * (an honest update): the attacker pushes the model uphill."""
    return -scale * _picked_rows(honest, n_attackers, rng_seed)


def scaling(
    honest: torch.Tensor, n_attackers: int, rng_seed: int, scale: float = 10.0
) -> torch.Tensor:
    """scale * (an honest update): boosts one node's influence (model replacement style)."""
    return scale * _picked_rows(honest, n_attackers, rng_seed)


def random_noise(
    honest: torch.Tensor, n_attackers: int, rng_seed: int, sigma: float | None = None
) -> torch.Tensor:
    """N(0, sigma^2) per coordinate; sigma defaults to 100x the honest updates' RMS value."""
    if sigma is None:
        sigma = 100.0 * float(honest.pow(2).mean().sqrt())
    shape = (n_attackers, honest.shape[1])
    return sigma * torch.randn(shape, generator=_generator(rng_seed), dtype=honest.dtype)


def alie_z(n_total: int, n_attackers: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): the attackers need s = floor(n/2 + 1) - f honest nodes on
    their side, so z = Phi^-1((n - s) / n). Clamped to >= 0 (tiny swarms)."""
    s = n_total // 2 + 1 - n_attackers
    p = (n_total - s) / n_total
    if p <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(p, 1 - 1e-12))


def alie(
    honest: torch.Tensor, n_attackers: int, rng_seed: int, z: float | None = None
) -> torch.Tensor:
    """A little is enough: every attacker sends mu - z * sigma (coordinate-wise mean/std of the
    honest updates), small enough per coordinate to pass median/trimmed-mean/Krum filters."""
    if z is None:
        z = alie_z(honest.shape[0] + n_attackers, n_attackers)
    mu = honest.mean(dim=0)
    sigma = honest.std(dim=0, correction=0)
    return (mu - z * sigma).expand(n_attackers, -1).clone()


def ipm(
    honest: torch.Tensor, n_attackers: int, rng_seed: int, epsilon: float = 0.1
) -> torch.Tensor:
    """Inner product manipulation (Xie et al. 2019): every attacker sends -epsilon * mean(honest),
    making the aggregate's inner product with the true gradient negative. Small epsilon fools
    Krum and the median; large epsilon (> (n - f) / f) overturns the plain mean."""
    return (-epsilon * honest.mean(dim=0)).expand(n_attackers, -1).clone()


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "sign-flip": sign_flip,
    "scaling": scaling,
    "noise": random_noise,
    "alie": alie,
    "ipm": ipm,
}


def apply_attack(
    name: str, honest: torch.Tensor, n_attackers: int, rng_seed: int, **opts: float
) -> torch.Tensor:
    """The `[n_attackers, d]` rows the attackers submit, given the honest `[n_honest, d]` ones."""
    if name == "garbage-data":
        raise ValueError(
            "'garbage-data' is not an update attack: wrap the malicious node's batches with "
            "garbage_batches(...) and let it train normally"
        )
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError(
            f"honest updates must be a non-empty [n_honest, d] tensor, got {honest.shape}"
        )
    if n_attackers < 0:
        raise ValueError(f"n_attackers must be >= 0, got {n_attackers}")
    fn = ATTACKS[name]
    allowed = set(list(inspect.signature(fn).parameters)[3:])
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ValueError(
            f"attack {name!r} has no option(s) {unknown}; its options: {sorted(allowed)}"
        )
    if n_attackers == 0:
        return honest.new_zeros((0, honest.shape[1]))
    return fn(honest, n_attackers, rng_seed, **opts)


# --------------------------------------------------------------------------- garbage data

GARBAGE_KINDS = ("uniform", "shuffle", "flip-targets")


def garbage_batch(batch: Batch, vocab_size: int, generator: torch.Generator, kind: str) -> Batch:
    """Replace one (inputs, targets) token batch with garbage of the same shape and dtype:

    - "uniform": inputs and targets uniform random tokens (the model learns noise);
    - "shuffle": the batch's tokens permuted (right unigram statistics, no language);
    - "flip-targets": inputs kept, each target t replaced by vocab_size - 1 - t (label flipping).
    """
    inputs, targets = batch
    if kind == "uniform":
        return (
            torch.randint(0, vocab_size, inputs.shape, generator=generator).to(inputs.dtype),
            torch.randint(0, vocab_size, targets.shape, generator=generator).to(targets.dtype),
        )
    if kind == "shuffle":
        perm = torch.randperm(inputs.numel(), generator=generator)
        shuffled = inputs.reshape(-1)[perm].view_as(inputs)
        return shuffled, torch.roll(shuffled, -1, dims=-1).to(targets.dtype)
    if kind == "flip-targets":
        return inputs, (vocab_size - 1 - targets).to(targets.dtype)
    raise ValueError(f"unknown garbage kind {kind!r}; choose one of {GARBAGE_KINDS}")


def garbage_batches(
    stream: Iterator[Batch], vocab_size: int, rng_seed: int, kind: str = "uniform"
) -> Iterator[Batch]:
    """Wrap a node's batch stream so a malicious node trains on garbage instead (same shapes,
    same number of batches): `train_local(model, theta, garbage_batches(stream, 256, 7), ...)`."""
    if kind not in GARBAGE_KINDS:
        raise ValueError(f"unknown garbage kind {kind!r}; choose one of {GARBAGE_KINDS}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    generator = _generator(rng_seed)
    return (garbage_batch(batch, vocab_size, generator, kind) for batch in stream)
