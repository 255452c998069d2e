"""Coarse-to-fine outlier detection (CBQ §3.3, Algorithm 1): pure functions on tensors.

1. Coarse: with the quartiles Q1, Q3 of a distribution and IQR = Q3 - Q1, the coarse
   outlier set is ``O = {x > Q3 + λ1·IQR}`` (Tukey's fence, λ1 = 1.5).
2. Fine: sort O and split it into a reserved part ``O_low`` and an outlier part
   ``O_high`` at the split minimising

       M = var(O_low) + var(O_high) - λ2 · dist(O_low, O_high)^2

   over every split point (both parts non-empty). ``dist`` is the difference of the
   means (``distance="mean"``, the paper's metric and the default) or the gap between the
   two sets, ``min(O_high) - max(O_low)`` (``distance="gap"``). The variances are plain
   (population) variances of each part, not weighted by the part sizes: weighting them
   (within-class variance, as in Otsu's method) made the gap rule cut a pure Gaussian
   tail in the middle, thousands of "outliers", and left the mean rule as it was.

Scale: M is homogeneous of degree 2 and translation invariant, so the chosen split is
the same for weights around 0.05 and activations around 100; λ2 is dimensionless and
normalising M (e.g. by var(O)) would not change any decision. ``log_space=True`` runs
the fine split on log(O) instead, which compares ratios between values rather than
differences.

Known behaviour of the default (``distance="mean"``, linear): on a long tail the
mean-difference term is largest when ``O_high`` is the single largest value, so the
fine split usually isolates just the maximum (see ``tests/test_outliers.py``). The
``distance="gap"`` rule recovers groups of planted outliers; with ``log_space=True`` and
a large λ2 (≈10) it also recovers outliers spread over a wide range of magnitudes, such
as massive activation channels 20-100x above the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch


class SplitDistance(StrEnum):
    """The fine split's distance between the two sets: of their means, or their gap."""

    mean = "mean"
    gap = "gap"


# Above this many elements the quartiles come from a fixed random sample (torch.quantile
# refuses inputs over 16M elements, and exact selection on 50M values takes seconds).
EXACT_QUANTILE_LIMIT = 1 << 21
QUANTILE_SAMPLE = 1 << 18
SAMPLE_SEED = 0


@dataclass(frozen=True)
class OutlierResult:
    """Outcome of :func:`detect_outliers`.

    ``mask`` has the shape of the input and marks the fine outliers, i.e. the values with
    ``|x| >= threshold``; ``threshold`` is the smallest fine outlier and ``reserved_max``
    the largest |x| below it (both ``inf`` when there is no outlier); ``coarse_count`` /
    ``fine_count`` are the sizes of O and O_high.
    """

    mask: torch.Tensor
    threshold: float
    reserved_max: float
    coarse_count: int
    fine_count: int


def quartiles(values: torch.Tensor) -> tuple[float, float]:
    """(Q1, Q3) of ``values`` (linear interpolation), estimated on a sample when huge."""
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("quartiles of an empty tensor")
    if flat.numel() > EXACT_QUANTILE_LIMIT:
        generator = torch.Generator(device=flat.device).manual_seed(SAMPLE_SEED)
        index = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device
        )
        flat = flat[index]
    probs = torch.tensor([0.25, 0.75], device=flat.device)
    q1, q3 = torch.quantile(flat.float(), probs).tolist()
    return q1, q3


def coarse_outliers(values: torch.Tensor, lambda1: float = 1.5) -> torch.Tensor:
    """Boolean mask (shape of ``values``) of ``values > Q3 + lambda1 * (Q3 - Q1)``."""
    _check_finite(values)
    q1, q3 = quartiles(values)
    return values > q3 + lambda1 * (q3 - q1)


def _check_distance(distance: SplitDistance | str) -> None:
    if distance not in tuple(SplitDistance):
        allowed = [d.value for d in SplitDistance]
        raise ValueError(f"distance must be one of {allowed}, got {distance!r}")


def split_metric(
    sorted_values: torch.Tensor,
    lambda2: float = 1.0,
    distance: SplitDistance = SplitDistance.mean,
) -> torch.Tensor:
    """M for every split of ascending ``sorted_values`` (n >= 2) into ``[:k]`` and ``[k:]``.

    Entry ``k - 1`` is the metric of the split with ``k`` reserved values, k = 1..n-1.
    Cumulative sums make this O(n); float64 and centring keep the variances accurate.
    """
    _check_distance(distance)
    x = sorted_values.detach().double()
    x = x - x.mean()
    n = x.numel()
    sums, squares = torch.cumsum(x, 0), torch.cumsum(x * x, 0)
    n_low = torch.arange(1, n, dtype=torch.float64, device=x.device)
    n_high = n - n_low
    sum_low, sq_low = sums[:-1], squares[:-1]
    sum_high, sq_high = sums[-1] - sum_low, squares[-1] - sq_low
    mean_low, mean_high = sum_low / n_low, sum_high / n_high
    var_low = (sq_low / n_low - mean_low.square()).clamp_min(0.0)
    var_high = (sq_high / n_high - mean_high.square()).clamp_min(0.0)
    dist = mean_high - mean_low if distance == "mean" else x[1:] - x[:-1]
    return var_low + var_high - lambda2 * dist.square()


def fine_split(
    coarse_values: torch.Tensor,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
) -> float:
    """The threshold t splitting the coarse set; the fine outliers are ``values >= t``.

    t is the smallest value of ``O_high``. Edge cases:

    - empty coarse set: ``inf`` (no outliers);
    - fewer than two distinct values (a single value, or ties only): there is no split,
      and the whole coarse set is the outlier set (t = its value). A lone value above the
      fence is the clearest outlier there is, e.g. one massive channel among 64;
    - otherwise both parts are non-empty: at least the maximum is an outlier and at least
      the minimum is reserved. Splits inside a run of equal values are never considered
      (a threshold cannot separate them); on equal M the split with fewer outliers wins.
    """
    ordered = torch.sort(coarse_values.detach().reshape(-1).double()).values
    if ordered.numel() == 0:
        return math.inf
    _check_finite(ordered)
    distinct = ordered[1:] > ordered[:-1]
    if not bool(distinct.any()):
        return float(ordered[0])
    if log_space:
        if bool(ordered[0] <= 0):
            raise ValueError("log_space needs strictly positive values")
        metric = split_metric(ordered.log(), lambda2, distance)
    else:
        metric = split_metric(ordered, lambda2, distance)
    metric = metric.masked_fill(~distinct, math.inf)
    last_low = int(metric.numel() - 1 - torch.argmin(metric.flip(0)))
    return float(ordered[last_low + 1])


def detect_outliers(
    values: torch.Tensor,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
) -> OutlierResult:
    """Coarse-to-fine detection on ``|values|`` (any shape; the mask has that shape)."""
    magnitude = values.detach().abs()
    if magnitude.numel() == 0:
        empty = torch.zeros_like(magnitude, dtype=torch.bool)
        return OutlierResult(empty, math.inf, math.inf, 0, 0)
    coarse = coarse_outliers(magnitude, lambda1)
    coarse_values = magnitude[coarse]
    threshold = fine_split(coarse_values, lambda2, distance=distance, log_space=log_space)
    # Every value >= threshold is above the coarse fence, as the threshold is a coarse value.
    mask = magnitude >= threshold
    return OutlierResult(
        mask=mask,
        threshold=threshold,
        reserved_max=_largest_below(magnitude, coarse_values, mask, threshold),
        coarse_count=int(coarse_values.numel()),
        fine_count=int(torch.count_nonzero(mask)),
    )


def _largest_below(
    magnitude: torch.Tensor, coarse_values: torch.Tensor, mask: torch.Tensor, threshold: float
) -> float:
    """max(O_low), or the largest value under the fence when O_low is empty."""
    if not math.isfinite(threshold):
        return math.inf
    reserved = coarse_values[coarse_values < threshold]
    if reserved.numel():
        return float(reserved.max())
    below = magnitude.masked_fill(mask, -math.inf).max()
    # Only with a negative lambda1 can every value be an outlier; then clip nothing.
    return float(below) if math.isfinite(float(below)) else threshold


def _check_finite(values: torch.Tensor) -> None:
    if values.numel() == 0:
        return
    # min/max propagate nan and reach inf, and are much faster than isfinite().all().
    low, high = torch.aminmax(values.detach())
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise ValueError("outlier detection needs finite values (found nan or inf)")


@dataclass(frozen=True)
class RowOutliers:
    """Outcome of :func:`detect_row_outliers`: per row, as in :class:`OutlierResult`."""

    threshold: torch.Tensor  # smallest fine outlier; inf where the row has none
    reserved_max: torch.Tensor  # largest value below it; inf where the row has no outlier
    coarse_count: torch.Tensor
    fine_count: torch.Tensor


def detect_row_outliers(
    values: torch.Tensor,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
) -> RowOutliers:
    """Coarse-to-fine detection on ``|values|`` of each row of a 2-D tensor, vectorised.

    Each row gets the decisions :func:`detect_outliers` takes on it alone (same fence, same
    split metric, same tie rules); CFP uses it per quantization group, where a row's
    outlier widens that row's step size.
    """
    _check_distance(distance)
    magnitude = values.detach().abs().double()
    _check_finite(magnitude)
    rows, width = magnitude.shape
    q1, q3 = torch.quantile(magnitude, torch.tensor([0.25, 0.75], dtype=torch.float64), dim=-1)
    ordered = magnitude.sort(dim=-1).values
    coarse = (magnitude > (q3 + lambda1 * (q3 - q1)).unsqueeze(-1)).sum(-1)
    inf = torch.full((rows,), math.inf, dtype=torch.float64)
    tail_size = int(coarse.max()) if rows else 0
    if tail_size == 0:
        return RowOutliers(inf, inf.clone(), coarse, torch.zeros_like(coarse))
    # The coarse set of each row is the last coarse[r] entries of its top tail_size values.
    tail = ordered[:, width - tail_size :]
    position = torch.arange(tail_size)
    valid = position.unsqueeze(0) >= (tail_size - coarse).unsqueeze(-1)
    split = _row_split(tail, valid, lambda2, distance)
    # The fine outliers start at tail position ``split``; rows without a coarse set have none.
    threshold = tail.gather(1, split.clamp(max=tail_size - 1).unsqueeze(-1)).squeeze(-1)
    none = coarse == 0
    threshold = torch.where(none, inf, threshold)
    fine = (magnitude >= threshold.unsqueeze(-1)).sum(-1)
    return RowOutliers(threshold, _largest_below_rows(ordered, threshold), coarse, fine)


def _row_split(
    tail: torch.Tensor, valid: torch.Tensor, lambda2: float, distance: SplitDistance
) -> torch.Tensor:
    """Per row, the tail position where the fine outliers start (see :func:`fine_split`)."""
    size = tail.shape[1]
    first = size - valid.sum(-1)  # position of each row's smallest coarse value
    if size < 2:
        return first
    x = torch.where(valid, tail, 0.0)
    # Centre each row on its coarse mean (the variances are translation invariant).
    count = valid.sum(-1).clamp(min=1).unsqueeze(-1)
    x = torch.where(valid, x - x.sum(-1, keepdim=True) / count, 0.0)
    sums, squares = torch.cumsum(x, -1), torch.cumsum(x * x, -1)
    n_valid = torch.cumsum(valid.double(), -1)
    # Split before position p (p = 1..size-1): low = [0, p), high = [p, size).
    n_low, n_high = n_valid[:, :-1], n_valid[:, -1:] - n_valid[:, :-1]
    sum_low, sq_low = sums[:, :-1], squares[:, :-1]
    sum_high, sq_high = sums[:, -1:] - sum_low, squares[:, -1:] - sq_low
    safe_low, safe_high = n_low.clamp(min=1), n_high.clamp(min=1)
    mean_low, mean_high = sum_low / safe_low, sum_high / safe_high
    var_low = (sq_low / safe_low - mean_low.square()).clamp_min(0.0)
    var_high = (sq_high / safe_high - mean_high.square()).clamp_min(0.0)
    gap = x[:, 1:] - x[:, :-1]
    dist = mean_high - mean_low if distance == "mean" else gap
    metric = var_low + var_high - lambda2 * dist.square()
    distinct = tail[:, 1:] > tail[:, :-1]
    allowed = (n_low > 0) & distinct
    metric = metric.masked_fill(~allowed, math.inf)
    # Ties: the split with fewer outliers (the largest p) wins.
    best = size - 2 - torch.argmin(metric.flip(-1), dim=-1)
    # No allowed split (one coarse value, or ties only): the whole coarse set is the outliers.
    return torch.where(allowed.any(-1), best + 1, first)


def _largest_below_rows(ordered: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, the largest value below a finite ``threshold`` (max of the reserved part, or
    of the values under the fence); inf where there is no outlier, the threshold where every
    value is one (only with a negative lambda1), as :func:`_largest_below`."""
    below = torch.where(ordered < threshold.unsqueeze(-1), ordered, -math.inf).amax(-1)
    below = torch.where(torch.isfinite(below), below, threshold)
    return torch.where(torch.isfinite(threshold), below, threshold)
