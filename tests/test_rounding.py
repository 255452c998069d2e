"""Learned rounding and learned weight ranges: each must move what it learns, in the right
direction, by an asserted margin, and the measures must read zero when it is made inert."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cbq.cbd import (
    BestRule,
    CBDTrainer,
    Score,
    TrainerKnobs,
    TrainerSettings,
    _BestIterate,
    _Snapshot,
)
from cbq.config import CFPConfig, CFPMode, QuantConfig, RoundingConfig, RoundingKind
from cbq.models import adapter_for, tiny_model
from cbq.optim import LRSchedule, SignSGD, schedule_factor
from cbq.quant import Granularity, QuantSpec, WeightQuantizer, fake_quant, minmax_params
from cbq.quant.quantizer import MIN_CLIP_FACTOR, RangeLearning
from cbq.quant.rounding import AdaRound, LoRARounding, RoundingForm

from helpers import tokens

W2G16 = QuantConfig(name="w2a16g16", w_bits=2, w_granularity="per_group", w_group_size=16)
SPEC = QuantSpec(bits=3, granularity=Granularity.per_group, group_size=16)


def _weight(rows: int = 24, cols: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", [AdaRound, LoRARounding])
def test_offset_form_starts_at_rtn_and_stays_on_the_grid(kind):
    weight = _weight()
    quantizer = WeightQuantizer(SPEC, weight)
    rounding = kind(weight, 4) if kind is LoRARounding else kind(weight)
    torch.testing.assert_close(quantizer(weight, rounding), quantizer(weight))
    with torch.no_grad():
        for p in rounding.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    scale = quantizer.expand(quantizer.scale, weight)
    offsets = rounding(weight / scale)
    assert set(offsets.unique().tolist()) <= {0.0, 1.0}
    moved = quantizer(weight, rounding) != quantizer(weight)
    # One step up or down from RTN, never more.
    steps = ((quantizer(weight, rounding) - quantizer(weight)) / scale).abs()
    assert bool(moved.any()) and steps.max().item() <= 1 + 1e-4


def test_offset_gradient_reaches_the_variable():
    weight = _weight()
    quantizer = WeightQuantizer(SPEC, weight)
    rounding = AdaRound(weight)
    quantizer(weight, rounding).sum().backward()
    scale = quantizer.expand(quantizer.scale, weight)
    # Straight-through: d(s * (floor + round(x + V) - floor)) / dV = s inside the grid.
    inside = (weight / scale).abs() < 2  # far from the clamp at 3 bits
    torch.testing.assert_close(rounding.d.grad[inside], scale[inside])


def test_sigmoid_form_starts_at_the_weight_and_hardens_to_rtn():
    """AdaRound's start: h(V0) = frac(W/s), so the soft weight is W itself (inside the grid;
    at its ends the rounded zero point may leave a weight up to half a step outside)."""
    weight = _weight()
    quantizer = WeightQuantizer(SPEC, weight)
    rounding = LoRARounding(weight, 4, form=RoundingForm.sigmoid)
    soft = quantizer(weight, rounding)
    scale = quantizer.expand(quantizer.scale, weight)
    codes = quantizer.integers(weight)
    inside = (codes > 0) & (codes < SPEC.qmax)
    assert ((soft - weight).abs() / scale)[inside].max().item() < 1e-4
    rounding.harden()
    torch.testing.assert_close(quantizer(weight, rounding), quantizer(weight))
    rounding.soften()
    assert not rounding.hard


def test_step_learning_moves_every_row_by_the_same_relative_amount():
    """weight_range=step: one Adam step of lr changes each row's step by a factor exp(+-lr),
    whether the row's weights are 1e-3 or 1 (a tensor-mean lr moved the small rows 1000x
    further than the large ones, relatively)."""
    weight = _weight(4, 32)
    weight[:2] *= 1e-3
    quantizer = WeightQuantizer(QuantSpec(bits=3, granularity=Granularity.per_channel), weight)
    before = quantizer.scale.detach().clone()
    params = quantizer.learn_range(RangeLearning.step, weight)
    optimizer = torch.optim.Adam(params, lr=0.01)
    target = weight + 0.1 * weight.abs().mean(dim=1, keepdim=True) * torch.randn_like(weight)
    (quantizer(weight) - target).pow(2).div(weight.pow(2).mean(1, keepdim=True)).sum().backward()
    optimizer.step()
    scale, _ = quantizer.params()
    ratio = (scale.detach() / before).log().abs()
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.01), rtol=1e-3, atol=1e-6)


def test_clip_learning_starts_at_minmax_and_freezes_onto_its_grid():
    weight = _weight()
    quantizer = WeightQuantizer(SPEC, weight)
    rtn = quantizer(weight)
    quantizer.learn_range(RangeLearning.clip, weight)
    torch.testing.assert_close(quantizer(weight), rtn)
    with torch.no_grad():
        quantizer.low_factor.fill_(0.8)
        quantizer.high_factor.fill_(-3.0)  # out of bounds: projected back
    quantizer.project_range()
    assert quantizer.clip_factor_range() == pytest.approx((MIN_CLIP_FACTOR, 0.8))
    with torch.no_grad():
        quantizer.high_factor.fill_(0.7)
    grouped = quantizer.grouped(weight)
    scale, zero = minmax_params(grouped.amin(-1) * 0.8, grouped.amax(-1) * 0.7, SPEC)
    expected = fake_quant(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), SPEC.qmax)
    clipped = quantizer(weight)
    torch.testing.assert_close(clipped, quantizer.ungrouped(expected, weight))
    quantizer.freeze()
    assert quantizer.range_learning is RangeLearning.none and not hasattr(quantizer, "low_factor")
    torch.testing.assert_close(quantizer(weight), clipped)
    codes = quantizer.integers(clipped)
    back = (codes - quantizer.expand(quantizer.zero, weight)) * quantizer.expand(
        quantizer.scale, weight
    )
    torch.testing.assert_close(back, clipped)


def _train(tmp_path: Path, rounding: RoundingConfig, **knobs) -> dict:
    """CBQ on a tiny llama at W2 g16, CFP off, the step sizes fixed (weight_range=none) so
    that learned rounding is compared with RTN at the same step sizes; Adam at lr 1e-2 (the
    margins below were measured with it)."""
    fixed = {"epochs": 4, "batch_size": 2, "weight_range": RangeLearning.none}
    settings = TrainerSettings(
        knobs=TrainerKnobs(**{**fixed, "optimizer": "adam", "lr_rounding": 1e-2, **knobs}),
        rounding=rounding,
        cfp=CFPConfig(mode=CFPMode.none),
    )
    model = copy.deepcopy(tiny_model("llama"))
    trainer = CBDTrainer(adapter_for(model), W2G16, settings, torch.device("cpu"), tmp_path)
    return trainer.run(tokens(16, seed=0, seqlen=32))


def _moved_fraction(stats: dict) -> float:
    counts = stats["rounding_moved"].values()
    return sum(c[0] for c in counts) / sum(c[1] for c in counts)


@pytest.mark.parametrize(
    "kind,margin",
    # Measured: hardened window loss 0.40x (full rank) and 0.67x (rank 8) of nearest's, with
    # 2.9% and 3.3% of the weights off RTN.
    [(RoundingKind.adaround, 0.6), (RoundingKind.lora, 0.85)],
)
def test_learned_rounding_moves_weights_and_lowers_the_hardened_error(tmp_path, kind, margin):
    nearest = _train(tmp_path / "nearest", RoundingConfig(kind=RoundingKind.nearest))
    learned = _train(tmp_path / kind.value, RoundingConfig(kind=kind, rank=8))
    (near,), (window,) = nearest["windows"], learned["windows"]
    assert window["loss_init"] == pytest.approx(near["loss_init"])  # same start: RTN
    assert _moved_fraction(learned) > 0.01
    assert window["rounding_moved_fraction"] > 0.01
    assert window["loss_hard"] < margin * near["loss_hard"], (window, near)


def test_inert_rounding_reads_as_inert(tmp_path):
    """With lr 0 the measures report it: nothing moved, the loss of RTN."""
    nearest = _train(tmp_path / "nearest", RoundingConfig(kind=RoundingKind.nearest))
    inert = _train(tmp_path / "inert", RoundingConfig(kind=RoundingKind.lora), lr_rounding=0.0)
    assert _moved_fraction(inert) == 0.0
    assert inert["windows"][0]["loss_hard"] == pytest.approx(nearest["windows"][0]["loss_hard"])


def test_sigmoid_form_records_soft_and_hard_losses(tmp_path):
    stats = _train(tmp_path, RoundingConfig(kind=RoundingKind.adaround, form="sigmoid"))
    (window,) = stats["windows"]
    # Soft weights can match the target better than any grid point: the gap is the cost of
    # hardening, which the record makes visible.
    assert window["loss_soft"] < window["loss_hard"]
    assert window["best_step"] is None  # keep-best needs a hard forward


def test_keep_best_undoes_a_destructive_window(tmp_path):
    """A learning rate that wrecks the rounding: keep-best returns to the start (step 0);
    without it the window ends worse than RTN."""
    wreck = {"optimizer": "signsgd", "lr_rounding": 1.0}
    rounding = RoundingConfig(kind=RoundingKind.adaround)
    kept = _train(tmp_path / "kept", rounding, keep_best=True, **wreck)["windows"][0]
    last = _train(tmp_path / "last", rounding, keep_best=False, **wreck)["windows"][0]
    assert last["loss_hard"] > 1.2 * last["loss_init"]
    assert kept["best_step"] == 0 and kept["loss_hard"] == pytest.approx(kept["loss_init"])


def test_a_window_never_ends_worse_than_it_started(tmp_path, monkeypatch):
    """When the best-iterate choice fails (here: forced to the last step of a destructive
    run), keep-best still returns the window to its start, RTN, and says so."""
    wreck = {"optimizer": "signsgd", "lr_rounding": 1.0}
    monkeypatch.setattr(CBDTrainer, "_best_score", lambda self, distance, initial: -distance)
    stats = _train(tmp_path, RoundingConfig(kind=RoundingKind.adaround), keep_best=True, **wreck)
    window = stats["windows"][0]
    assert window["reverted_to_start"] and window["best_step"] == 0
    assert window["loss_hard"] == window["loss_init"]
    assert window["loss_terms_hard"] == window["loss_terms_init"]
    assert window["rounding_moved"] == 0 and _moved_fraction(stats) == 0


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("rule", [BestRule.relative, BestRule.batch])
def test_the_best_rules(tmp_path, monkeypatch, rule, on_disk):
    """relative: a batch's loss over the same samples' initial loss, and the best step kept
    only if it beats the last on the whole calibration set; batch (AutoRound's): the raw
    batch loss, and the best step kept as it is. The best step's copy is in memory, or on disk
    (model.lazy)."""
    settings = TrainerSettings(knobs=TrainerKnobs(best_rule=rule))
    trainer = CBDTrainer(
        adapter_for(tiny_model("llama")), W2G16, settings, torch.device("cpu"), tmp_path
    )
    score = trainer._best_score(0.5, torch.tensor([1.0, 3.0]))
    assert score == (0.25 if rule is BestRule.relative else 0.5)
    variable = torch.nn.Parameter(torch.tensor([0.5]))
    best = _BestIterate([variable], _Snapshot(tmp_path / "best.safetensors" if on_disk else None))
    best.offer(0.2, step=1)
    with torch.no_grad():
        variable.fill_(1.0)
    best.offer(0.1, step=3)  # replaces step 1's copy; step 4 scores worse and is not copied
    best.offer(0.3, step=4)
    with torch.no_grad():
        variable.fill_(2.0)  # the last step's value, which scores 1.0 on the whole set
    best_score = Score(5.0, {"l2": 5.0})  # the best step's, on the whole set
    monkeypatch.setattr(trainer, "_evaluate", lambda start, end: best_score)
    kept, step = trainer._keep_best(best, 0, 1, Score(1.0, {"l2": 1.0}))
    if rule is BestRule.relative:
        assert (kept.loss, step, variable.item()) == (1.0, None, 2.0)
    else:
        assert (kept, step, variable.item()) == (best_score, 3, 1.0)


def test_iters_sets_the_steps_per_window(tmp_path):
    stats = _train(tmp_path, RoundingConfig(kind=RoundingKind.lora), iters=5)
    assert [w["steps"] for w in stats["windows"]] == [5]


def test_schedules_and_signsgd():
    assert [schedule_factor(LRSchedule.linear, s, 4) for s in range(5)] == [1, 0.75, 0.5, 0.25, 0]
    assert schedule_factor(LRSchedule.cosine, 2, 4) == pytest.approx(0.5)
    assert schedule_factor(LRSchedule.constant, 3, 4) == 1.0
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    p.grad = torch.tensor([3.0, -1e-6, 0.0])
    SignSGD([p], lr=0.25).step()
    assert p.tolist() == [0.75, 1.25, 1.0]
