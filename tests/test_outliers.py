"""Coarse-to-fine outlier detection on synthetic distributions with planted outliers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch

from cbq.outliers import (
    EXACT_QUANTILE_LIMIT,
    coarse_outliers,
    detect_outliers,
    detect_row_outliers,
    fine_split,
    quartiles,
    split_metric,
)

# name -> keyword arguments of detect_outliers / fine_split
RULES: dict[str, dict] = {
    "paper": {},
    "gap": {"distance": "gap"},
    "log-gap": {"distance": "gap", "log_space": True, "lambda2": 10.0},
}


# --- synthetic data: (values, planted mask) ----------------------------------------------
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_planted(bulk: torch.Tensor, planted: torch.Tensor, g: torch.Generator) -> tuple:
    signs = torch.randint(0, 2, planted.shape, generator=g) * 2 - 1
    values = torch.cat([planted * signs, bulk])
    truth = torch.zeros(values.numel(), dtype=torch.bool)
    truth[: planted.numel()] = True
    order = torch.randperm(values.numel(), generator=g)
    return values[order], truth[order]


def gaussian(seed: int) -> tuple:
    g = _generator(seed)
    bulk = torch.randn(100_000, generator=g)
    return _with_planted(bulk, torch.empty(10).uniform_(20, 50, generator=g), g)


def laplace(seed: int) -> tuple:
    g = _generator(seed)
    u = torch.rand(100_000, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    bulk = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return _with_planted(bulk, torch.empty(10).uniform_(40, 80, generator=g), g)


def student_t3(seed: int) -> tuple:
    g = _generator(seed)
    normal = torch.randn(100_000, generator=g)
    chi2 = torch.randn(100_000, 3, generator=g).square().sum(1)
    bulk = normal / (chi2 / 3).sqrt()
    return _with_planted(bulk, torch.empty(10).uniform_(200, 400, generator=g), g)


def activation_channels(seed: int) -> tuple:
    """Per-channel max |x| over 256 tokens of 4096 channels; 5 massive ones at 20-100x."""
    g = _generator(seed)
    spread = torch.exp(torch.randn(4096, generator=g) * 0.3)
    absmax = (torch.randn(256, 4096, generator=g) * spread).abs().amax(0)
    planted = absmax[:5] * torch.empty(5).uniform_(20, 100, generator=g)
    return _with_planted(absmax[5:], planted, g)


SCENARIOS: dict[str, Callable[[int], tuple]] = {
    "gaussian": gaussian,
    "laplace": laplace,
    "student-t3": student_t3,
    "activation channels": activation_channels,
}


def precision_recall(mask: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    hits = int((mask & truth).sum())
    found = int(mask.sum())
    return (hits / found if found else 1.0), hits / int(truth.sum())


# --- the fine split by hand --------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_split_hand_case(rule: str) -> None:
    assert fine_split(torch.tensor([1.0, 1.1, 1.2, 10.0, 10.5]), **RULES[rule]) == 10.0


def test_split_hand_metric() -> None:
    """M for [1, 2, 10, 11], lambda2 = 1, both distances, against hand arithmetic."""
    x = torch.tensor([1.0, 2.0, 10.0, 11.0])
    # k=1: var 0 + var([2,10,11]) = 146/9, means 1 | 23/3, gap 1
    # k=2: .25 + .25, means 1.5 | 10.5, gap 8
    # k=3: var([1,2,10]) = 146/9 + 0, means 13/3 | 11, gap 1
    mean = [146 / 9 - (20 / 3) ** 2, 0.5 - 81.0, 146 / 9 - (20 / 3) ** 2]
    gap = [146 / 9 - 1.0, 0.5 - 64.0, 146 / 9 - 1.0]
    torch.testing.assert_close(split_metric(x), torch.tensor(mean, dtype=torch.float64))
    torch.testing.assert_close(split_metric(x, distance="gap"), torch.tensor(gap).double())
    assert fine_split(x) == fine_split(x, distance="gap") == 10.0


def test_split_edge_cases() -> None:
    assert fine_split(torch.tensor([])) == math.inf  # no coarse outlier: none
    assert fine_split(torch.tensor([7.0])) == 7.0  # a lone value above the fence: it
    assert fine_split(torch.tensor([3.0, 3.0, 3.0])) == 3.0  # ties cannot be split: all
    assert fine_split(torch.tensor([1.0, 2.0])) == 2.0  # one split: the maximum
    # Never inside a run of ties; on equal M, fewer outliers.
    assert fine_split(torch.tensor([1.0, 1.0, 1.0, 9.0, 9.0])) == 9.0
    assert fine_split(torch.tensor([1.0, 2.0, 3.0]), distance="gap") == 3.0
    # Order and dtype of the input do not matter.
    values = torch.tensor([10.5, 1.2, 10.0, 1.0, 1.1], dtype=torch.bfloat16)
    assert fine_split(values) == float(torch.tensor(10.0, dtype=torch.bfloat16))


def test_split_matches_brute_force() -> None:
    g = _generator(1)
    for trial in range(20):
        values = torch.rand(int(torch.randint(2, 40, (1,), generator=g)), generator=g) * 10
        ordered = values.double().sort().values
        for distance in ("mean", "gap"):
            lambda2 = float(trial % 4) + 0.5
            expected = []
            for k in range(1, ordered.numel()):
                low, high = ordered[:k], ordered[k:]
                dist = high.mean() - low.mean() if distance == "mean" else high[0] - low[-1]
                var = low.var(unbiased=False) + high.var(unbiased=False)
                expected.append(var - lambda2 * dist**2)
            metric = split_metric(ordered, lambda2, distance)
            torch.testing.assert_close(metric, torch.stack(expected), rtol=1e-9, atol=1e-9)
            best = int(torch.argmin(metric))
            assert fine_split(values, lambda2, distance=distance) == float(ordered[best + 1])


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        fine_split(torch.tensor([1.0, float("nan"), 3.0]))
    with pytest.raises(ValueError, match="positive"):
        fine_split(torch.tensor([0.0, 1.0, 3.0]), log_space=True)
    with pytest.raises(ValueError, match="distance"):
        split_metric(torch.tensor([1.0, 2.0]), distance="median")  # type: ignore[arg-type]


# --- coarse stage ------------------------------------------------------------------------
def test_coarse_fence_by_hand() -> None:
    values = torch.arange(1.0, 101.0)  # Q1 = 25.75, Q3 = 75.25: fence 149.5
    assert quartiles(values) == pytest.approx((25.75, 75.25))
    assert not coarse_outliers(values).any()
    # Two values above 100: Q1 = 26.25, Q3 = 76.75, fence 152.5.
    with_far = torch.cat([values, torch.tensor([152.0, 153.0])])
    assert coarse_outliers(with_far).nonzero().flatten().tolist() == [101]
    assert coarse_outliers(with_far, lambda1=0.0).sum() > 20
    with pytest.raises(ValueError, match="finite"):
        coarse_outliers(torch.tensor([1.0, float("inf")]))


def test_large_tensor_is_fast_and_sampled_quartiles_are_close() -> None:
    weight = torch.randn(8192, 6144, generator=_generator(2)) * 0.02  # 50M values
    assert weight.numel() > EXACT_QUANTILE_LIMIT
    weight.view(-1)[::5_000_000] = 0.4  # 11 planted
    start = time.perf_counter()
    result = detect_outliers(weight, distance="gap")
    elapsed = time.perf_counter() - start
    assert result.fine_count == 11 and result.threshold == pytest.approx(0.4)
    assert elapsed < 5.0  # ~0.4 s on 2 idle cores
    q1, q3 = quartiles(weight.abs())
    # |N(0, s)| has Q1 = 0.3186 s and Q3 = 1.1503 s.
    assert q1 == pytest.approx(0.3186 * 0.02, rel=0.01)
    assert q3 == pytest.approx(1.1503 * 0.02, rel=0.01)


# --- detection quality -------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("rule", ["gap", "log-gap"])
def test_planted_outliers_are_found(scenario: str, rule: str) -> None:
    if scenario == "activation channels" and rule == "gap":
        pytest.skip("a linear gap misses massive channels spread over 20-100x (see table)")
    for seed in range(3):
        values, truth = SCENARIOS[scenario](seed)
        result = detect_outliers(values, **RULES[rule])
        precision, recall = precision_recall(result.mask, truth)
        assert recall == 1.0 and precision >= 0.9, (seed, precision, recall)
        assert result.coarse_count >= result.fine_count
        assert result.reserved_max < result.threshold


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_paper_metric_isolates_the_largest_values(scenario: str) -> None:
    """The mean-difference metric is precise but keeps most planted outliers reserved."""
    for seed in range(3):
        values, truth = SCENARIOS[scenario](seed)
        result = detect_outliers(values)
        precision, _ = precision_recall(result.mask, truth)
        assert precision == 1.0 and 1 <= result.fine_count <= 3
        assert result.threshold >= 0.5 * float(values.abs().max())


@pytest.mark.parametrize("rule", RULES)
def test_pure_gaussian_has_few_outliers(rule: str) -> None:
    values = torch.randn(1_000_000, generator=_generator(3))
    result = detect_outliers(values, **RULES[rule])
    assert result.coarse_count > 10_000  # the coarse fence alone keeps ~1.6%
    assert result.fine_count <= 5
    assert result.threshold > 4.0  # only the extreme tail of N(0, 1)


@pytest.mark.parametrize("rule", RULES)
def test_decisions_do_not_depend_on_scale(rule: str) -> None:
    values, _ = laplace(4)
    reference = detect_outliers(values, **RULES[rule])
    for factor in (0.02, 100.0):
        scaled = detect_outliers(values * factor, **RULES[rule])
        assert torch.equal(scaled.mask, reference.mask)
        assert scaled.threshold == pytest.approx(reference.threshold * factor, rel=1e-6)


def test_detect_outliers_keeps_shape_and_sign_agnostic() -> None:
    weight = torch.randn(64, 32, generator=_generator(5)) * 0.02
    weight[3, 4], weight[10, 20] = -0.9, 1.0
    result = detect_outliers(weight, distance="gap")
    assert result.mask.shape == weight.shape
    assert result.mask.nonzero().tolist() == [[3, 4], [10, 20]]
    assert result.threshold == pytest.approx(0.9)
    empty = detect_outliers(torch.empty(0, 3))
    assert empty.fine_count == 0 and empty.threshold == math.inf and empty.mask.shape == (0, 3)


@pytest.mark.parametrize("distance", ["mean", "gap"])
def test_row_detection_matches_the_scalar_rule_row_by_row(distance: str) -> None:
    """detect_row_outliers (vectorised) against detect_outliers on each row alone: random
    rows, planted outliers, ties (rounded values) and rows with no coarse outlier."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        width = int(torch.randint(4, 70, (1,), generator=generator))
        values = torch.randn(7, width, generator=generator)
        if trial % 3 == 0:
            values[:, :3] *= 20
        if trial % 5 == 0:
            values = values.round()
        values[6] = 1.0  # all ties: no coarse outlier
        rows = detect_row_outliers(values, 1.5, 1.0, distance=distance)
        for r in range(values.shape[0]):
            ref = detect_outliers(values[r], 1.5, 1.0, distance=distance)
            assert rows.threshold[r].item() == ref.threshold
            assert rows.reserved_max[r].item() == ref.reserved_max
            assert (rows.coarse_count[r].item(), rows.fine_count[r].item()) == (
                ref.coarse_count,
                ref.fine_count,
            )
