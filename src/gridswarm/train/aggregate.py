"""Aggregators: combine a round's pseudo-gradients (one row per contribution) into one vector.

Every rule takes the stacked updates `[n, d]` (float32) and per-contribution weights `[n]` and
returns one `[d]` vector. All of them are vectorised over parameters:

- `mean` is one weighted mat-vec (the hub's default, weights = tokens processed);
- `median` / `trimmed-mean` use a partial sort (selection) along the contribution axis;
- `krum`, `geometric-median` and `centered-clip` work on the n x n Gram matrix of the centred
  updates: distances, Weiszfeld steps and clipping steps are done on n coefficients, and the result
  is one final `coeffs @ updates`. Cost: one O(n^2 d) matrix product + O(n d).

Robust rules give every contribution one vote and ignore `weights` (a weight is the node's own
claim of tokens processed, which a Byzantine node can inflate); only contributions with weight 0
are left out. Rows with a non-finite value are always left out (a NaN must not poison a round).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import numpy as np
import torch

from gridswarm.plugins import Registry
from gridswarm.train.codecs import Codec, span_decoding

# Column block for the Gram product and the selection rules: bounds the extra memory to
# n * BLOCK floats (a few tens of MB) whatever d is.
BLOCK = 1 << 16
SELECT_BLOCK = 2048


class AggregationError(ValueError):
    """Updates or weights an aggregator cannot combine (bad shape, nothing usable left...)."""


class Aggregator(ABC):
    """A rule `(updates [n, d] float32, weights [n]) -> aggregate [d]`. A rule whose result
    for each coordinate depends on that coordinate's values alone sets `coordinatewise`: the
    hub then aggregates it a block of columns at a time (`aggregate_by_columns`), holding a
    block of every row instead of every whole row."""

    name: ClassVar[str]
    uses_weights: ClassVar[bool] = False
    coordinatewise: ClassVar[bool] = False

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        kept, kept_weights = _usable_rows(updates, weights)
        return self.combine(kept, kept_weights)

    @abstractmethod
    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The rule itself, on validated finite rows with positive weights."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


def _usable_rows(
    updates: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and drop rows that are non-finite or have weight 0."""
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates)
        raise AggregationError(f"updates must be a 2-D tensor [n, d], got {shape}")
    if updates.dtype != torch.float32:
        raise AggregationError(f"updates must be float32, got {updates.dtype}")
    n = updates.shape[0]
    if n == 0:
        raise AggregationError("no updates to aggregate")
    if weights is None:
        weights = torch.ones(n, dtype=torch.float32)
    if weights.dim() != 1 or weights.shape[0] != n:
        raise AggregationError(f"weights must have shape [{n}], got {tuple(weights.shape)}")
    weights = weights.to(torch.float32)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise AggregationError("weights must be finite and >= 0")
    # A row sum is finite iff every entry is (or the row is absurdly large): one fast pass,
    # with no model-sized temporary
    finite = torch.isfinite(updates.sum(dim=1))
    keep = finite & (weights > 0)
    if not bool(keep.any()):
        raise AggregationError("no update has a positive weight and finite values")
    if bool(keep.all()):
        return updates, weights
    return updates[keep], weights[keep]


# values of each row per column block: 1 MiB of fp32, so a block of 64 rows is 64 MiB
COLUMNS = 1 << 18

Row = Callable[[int, int], torch.Tensor]  # (start, end) -> that span of one update, fp32


def aggregate_by_columns(
    aggregator: Aggregator,
    rows: list[Row],
    weights: torch.Tensor,
    numel: int,
    *,
    align: int = 1,
    columns: int = COLUMNS,
) -> torch.Tensor:
    """A `coordinatewise` aggregator over `rows` a block of `columns` columns at a time (a
    multiple of `align`; for a rule with its own `columns`, such as the mean's blocked product,
    exactly those): each row's span (`row(start, end)`) is decoded only for its block, so the
    memory held is one block of every row, not every whole row. Bit for bit the result of
    `aggregator(stacked rows, weights)` for rows whose sums are finite (the checks that drop a
    non-finite row see a block at a time)."""
    if not aggregator.coordinatewise:
        raise AggregationError(f"{aggregator.name} is not coordinate-wise")
    width = block_width(aggregator, align, columns)
    if width is None:
        raise AggregationError(f"{aggregator.name}'s column blocks are not multiples of {align}")
    out = torch.empty(numel)
    for start in range(0, numel, width):
        end = min(start + width, numel)
        out[start:end] = aggregator(torch.stack([row(start, end) for row in rows]), weights)
    return out


def block_width(aggregator: Aggregator, align: int, columns: int = COLUMNS) -> int | None:
    """The column block `aggregate_by_columns` uses: the rule's own (`columns` attribute: its
    bits depend on the blocks) if it is a multiple of `align`, else None; for a rule exact
    per coordinate (median, trimmed mean), `columns` rounded down to a multiple of `align`."""
    own = getattr(aggregator, "columns", None)
    if own is not None:
        return own if own % align == 0 else None
    return max(align, columns // align * align)


class EncodedRows:
    """A round's uploads as their codec payloads, decoded only as the aggregation needs them:
    a `coordinatewise` rule over a codec that decodes spans gets them a block of columns at a
    time (`aggregate_by_columns`: the payloads, int8 a quarter of a model each, and one block
    of every row are held); any other rule gets the stacked `[n, d]` rows (`stacked`)."""

    def __init__(self, codec: Codec, payloads: list[dict[str, torch.Tensor]], numel: int):
        self.codec, self.payloads, self.numel = codec, payloads, numel

    def __len__(self) -> int:
        return len(self.payloads)

    def stacked(self) -> torch.Tensor:
        """Every upload decoded into its row of one `[n, d]` float32 matrix; each payload is let
        go once decoded (one fp32 copy of each upload, never two). Once only."""
        rows = torch.empty(len(self.payloads), self.numel)
        for i in range(len(self.payloads)):
            rows[i] = self.codec.decode(self.payloads[i], self.numel)
            self.payloads[i] = {}
        return rows

    def aggregate(self, aggregator: Aggregator, weights: torch.Tensor) -> torch.Tensor:
        """`aggregator(self.stacked(), weights)`, by blocks of columns when that is the same."""
        align = span_decoding(self.codec)
        if not aggregator.coordinatewise or align is None or not block_width(aggregator, align):
            return aggregator(self.stacked(), weights)
        rows = [partial(self.codec.decode_span, p, self.numel) for p in self.payloads]
        return aggregate_by_columns(aggregator, rows, weights, self.numel, align=align)


# --------------------------------------------------------------------------- mean


class WeightedMean(Aggregator):
    """sum_i w_i x_i / sum_i w_i: FedAvg / DiLoCo's outer gradient. Breakdown point 0."""

    name = "mean"
    coordinatewise = True
    uses_weights = True

    # the weighted sum is one matrix-vector product per block of this many columns: BLAS
    # sums a column in an order that depends on the matrix's width, so fixing the blocks makes
    # the bits the same whether the rows arrive stacked or a block at a time
    # (`aggregate_by_columns`); a model of at most one block is one product, as it always was
    columns: int = COLUMNS

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = weights / weights.sum()
        d = updates.shape[1]
        if d <= self.columns:
            return w @ updates
        return torch.cat(
            [w @ updates[:, a : a + self.columns].contiguous() for a in range(0, d, self.columns)]
        )


# --------------------------------------------------------------------------- selection rules


def _select(updates: torch.Tensor, kth: list[int], reduce: Callable[[np.ndarray], np.ndarray]):
    """Partially sort each coordinate's n values (numpy introselect) so that the positions in
    `kth` hold their order statistics, then reduce each [block, n] slab to [block]. Column blocks
    are transposed to contiguous rows first: selection along contiguous memory is ~2x faster."""
    x = updates.numpy()
    out = np.empty(x.shape[1], dtype=np.float32)
    for start in range(0, x.shape[1], SELECT_BLOCK):
        slab = np.ascontiguousarray(x[:, start : start + SELECT_BLOCK].T)
        out[start : start + SELECT_BLOCK] = reduce(np.partition(slab, kth, axis=1))
    return torch.from_numpy(out)


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al. 2018); mean of the two middle values for even n.
    Breakdown point 1/2 per coordinate; biased under heterogeneous (non-IID) updates."""

    name = "median"
    coordinatewise = True

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = updates.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        return _select(updates, sorted({lo, hi}), lambda p: 0.5 * (p[:, lo] + p[:, hi]))


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values of each
    coordinate (Yin et al. 2018). Tolerates up to floor(trim_fraction * n) attackers."""

    name = "trimmed-mean"
    coordinatewise = True

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = updates.shape[0]
        k = math.floor(self.trim_fraction * n)
        if k == 0:
            return updates.mean(dim=0)
        return _select(updates, [k - 1, n - k], lambda p: p[:, k : n - k].mean(axis=1))


# --------------------------------------------------------------------------- Gram-matrix rules


def _centre_and_gram(updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row mean c and the Gram matrix G = (X - c)(X - c)^T in float64.

    Centring first removes the component all updates share, so that the squared distances
    G_ii + G_jj - 2 G_ij do not cancel catastrophically in float32. The product runs in column
    blocks so the centred copy never exceeds n * BLOCK floats."""
    n, d = updates.shape
    centre = torch.full((n,), 1.0 / n) @ updates
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, BLOCK):
        block = updates[:, start : start + BLOCK] - centre[start : start + BLOCK]
        gram += (block @ block.T).double()
    return centre, gram


def _sq_dist_to_points(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances [n, n] from a Gram matrix."""
    diag = gram.diagonal()
    return (diag[:, None] + diag[None, :] - 2.0 * gram).clamp_min_(0.0)


def _sq_dist_to_combination(gram: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """||x_i - z||^2 for every i, where z = sum_j coeffs_j x_j with sum(coeffs) = 1."""
    g_coeffs = gram @ coeffs
    return (gram.diagonal() - 2.0 * g_coeffs + coeffs @ g_coeffs).clamp_min_(0.0)


def _combine(updates: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """sum_i coeffs_i x_i for affine coefficients (they sum to 1, so the centring cancels)."""
    return coeffs.to(torch.float32) @ updates


class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al. 2017): score each update by the summed squared distance to its
    n - f - 2 nearest others, average the m best. Needs n >= 2f + 3. m = 1 is Krum.

    f defaults to the most the rule tolerates, (n - 3) // 2; m defaults to n - f. With n <= 2
    there is no majority to find and the rule returns the mean."""

    name = "krum"

    def __init__(self, f: int | None = None, m: int | None = None) -> None:
        if f is not None and f < 0:
            raise ValueError(f"f (assumed Byzantine count) must be >= 0, got {f}")
        if m is not None and m < 1:
            raise ValueError(f"m (updates to average) must be >= 1, got {m}")
        self.f = f
        self.m = m

    def scores(self, updates: torch.Tensor) -> torch.Tensor:
        """Krum score of every row (lower is more central)."""
        n = updates.shape[0]
        f = self._f(n)
        _, gram = _centre_and_gram(updates)
        dist = _sq_dist_to_points(gram)
        dist.fill_diagonal_(float("inf"))
        closest = n - f - 2
        if closest <= 0:
            return torch.zeros(n, dtype=torch.float64)
        return dist.topk(closest, dim=1, largest=False).values.sum(dim=1)

    def _f(self, n: int) -> int:
        f = max(0, (n - 3) // 2) if self.f is None else self.f
        if n < 2 * f + 3 and n > 2:
            raise AggregationError(f"krum needs n >= 2f + 3 updates: n={n}, f={f}")
        return f

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = updates.shape[0]
        if n <= 2:
            return updates.mean(dim=0)
        m = n - self._f(n) if self.m is None else min(self.m, n)
        chosen = self.scores(updates).topk(m, largest=False).indices
        coeffs = torch.zeros(n, dtype=torch.float64)
        coeffs[chosen] = 1.0 / m
        return _combine(updates, coeffs)


def _weiszfeld(gram: torch.Tensor, nu: float, max_iter: int, tol: float) -> torch.Tensor:
    """Smoothed Weiszfeld iterations in coefficient space; returns affine coefficients of the
    geometric median argmin_z sum_i max(nu, ||z - x_i||) (RFA, Pillutla et al. 2022)."""
    n = gram.shape[0]
    coeffs = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(max_iter):
        dist = _sq_dist_to_combination(gram, coeffs).sqrt()
        inv = 1.0 / dist.clamp_min(nu)
        new = inv / inv.sum()
        delta = new - coeffs
        step = float((delta @ gram @ delta).clamp_min(0.0).sqrt())
        coeffs = new
        if step <= tol * float(dist.mean()):
            break
    return coeffs


class GeometricMedian(Aggregator):
    """Geometric median by smoothed Weiszfeld (RFA). Breakdown point 1/2; rotation invariant.

    `nu` is the smoothing distance (same units as the updates); iterations stop when the estimate
    moves less than `tol` relative to the mean distance, or after `max_iter`."""

    name = "geometric-median"

    def __init__(self, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-7) -> None:
        if nu <= 0:
            raise ValueError(f"nu (smoothing) must be > 0, got {nu}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.nu = nu
        self.max_iter = max_iter
        self.tol = tol

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        _, gram = _centre_and_gram(updates)
        return _combine(updates, _weiszfeld(gram, self.nu, self.max_iter, self.tol))


class CenteredClip(Aggregator):
    """Centered clipping (Karimireddy, He & Jaggi 2021): v <- v + mean_i clip_tau(x_i - v), `iters`
    times. Each attacker can move v by at most tau / n per iteration.

    The start v0 is the medoid (the update with the least summed distance to the others), which a
    minority cannot move far. `tau` defaults to the median distance of the updates from v0, so it
    adapts to the spread of the honest updates (a fixed tau must be tuned per model and lr)."""

    name = "centered-clip"

    def __init__(self, tau: float | None = None, iters: int = 3) -> None:
        if tau is not None and tau <= 0:
            raise ValueError(f"tau (clipping radius) must be > 0, got {tau}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.tau = tau
        self.iters = iters

    def combine(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = updates.shape[0]
        _, gram = _centre_and_gram(updates)
        medoid = _sq_dist_to_points(gram).sqrt().sum(dim=1).argmin()
        coeffs = torch.zeros(n, dtype=torch.float64)
        coeffs[medoid] = 1.0
        tau = self.tau
        if tau is None:
            tau = float(_sq_dist_to_combination(gram, coeffs).sqrt().median())
        if tau <= 0:  # all updates coincide with the medoid
            return updates[medoid].clone()
        eye = torch.eye(n, dtype=torch.float64)
        for _ in range(self.iters):
            dist = _sq_dist_to_combination(gram, coeffs).sqrt()
            scale = (tau / dist.clamp_min(1e-300)).clamp(max=1.0)
            # v + (1/n) sum_i s_i (x_i - v), written on coefficients.
            coeffs = coeffs + ((eye - coeffs[None, :]) * scale[:, None]).mean(dim=0)
        return _combine(updates, coeffs)


# --------------------------------------------------------------------------- registry

# name -> Aggregator subclass; plugins add theirs through the `gridswarm.aggregators` entry points
AGGREGATORS: Registry[type[Aggregator]] = Registry("gridswarm.aggregators", "aggregator")
for _rule in (
    WeightedMean,
    CoordinateMedian,
    TrimmedMean,
    MultiKrum,
    GeometricMedian,
    CenteredClip,
):
    AGGREGATORS.register(_rule.name, _rule, builtin=True)


def make_aggregator(name: str, **options: object) -> Aggregator:
    """Build the aggregator called `name` with its options; bad names/options raise ValueError."""
    cls = AGGREGATORS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise ValueError(f"aggregator plugin {name!r} is not an Aggregator subclass")
    params = inspect.signature(cls.__init__).parameters.values()
    allowed = [p.name for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"aggregator {name!r} has no option(s) {unknown}; its options are {allowed or 'none'}"
        )
    return cls(**options)
