"""AWQ: exact scale folds on every tiny family, the clipping search, beating RTN at w3 and
w2 g16 on tiny models, stats and config checks."""

from __future__ import annotations

import copy

import pytest
import torch

import cbq.methods
from cbq.config import Config, QuantConfig
from cbq.methods import method_config, method_problems
from cbq.methods.awq import AWQ, AWQConfig, evenly_spaced
from cbq.methods.rtn import RoundToNearest, RTNConfig
from cbq.models import adapter_for, tiny_model
from cbq.quant import Granularity, QuantLinear, QuantSpec, quant_linears
from cbq.transforms import (
    CalibrationStream,
    apply_clip,
    awq_scale,
    clip_search,
    quantize_weight,
)

from helpers import CPU, assert_on_grid, logits, logits_error, quantize_copy, tokens

FAMILIES = ["opt", "bloom", "llama", "gemma3"]
W3 = QuantConfig(name="w3a16", w_bits=3)
W2G16 = QuantConfig(name="w2a16g16", w_bits=2, w_granularity="per_group", w_group_size=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_searched_scales_folded_leave_the_fp_logits_unchanged(family):
    """Scales searched for w3 but folded into the FP model (nothing quantized, no clipping)."""
    fp = tiny_model(family)
    model = copy.deepcopy(fp)
    adapter = adapter_for(model)
    method = AWQ(AWQConfig(clip=False), Config(quant=W3))
    stream = CalibrationStream.embed(adapter, tokens(4, seed=0), 2, CPU)
    alphas = []
    for index in range(len(adapter.blocks())):
        alphas += method.transform_block(adapter, index, stream)["alphas"].values()
        stream.advance(index)
    held_out = tokens(2, seed=5)
    torch.testing.assert_close(logits(model, held_out), logits(fp, held_out), atol=1e-5, rtol=1e-5)
    assert any(alpha > 0 for alpha in alphas)  # some groups were really scaled
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_awq_scale_is_normalised():
    scale = awq_scale(torch.tensor([0.5, 2.0, 8.0]), 0.5)
    torch.testing.assert_close(scale.max() * scale.min(), torch.tensor(1.0))
    torch.testing.assert_close(scale / scale[0], torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(awq_scale(torch.tensor([0.5, 2.0]), 0.0), torch.ones(2))


# --- clipping ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, granularity=Granularity.per_channel),
        # 72 inputs = 4.5 groups of 16: the last group is partial.
        QuantSpec(bits=2, granularity=Granularity.per_group, group_size=16),
    ],
    ids=["w3", "w2g16-partial"],
)
def test_clip_search_lowers_the_output_error(spec):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weight = torch.distributions.StudentT(3.0).sample((48, 72)) * 0.02  # heavy tails
        x = torch.randn(256, 72)
    ratios = clip_search(weight, x, spec)
    groups = 1 if spec.group_size is None else 5
    assert ratios.shape == (48, groups)
    assert bool((ratios <= 1).all()) and bool((ratios >= 0.55 - 1e-6).all())
    assert bool((ratios < 1).any())
    clipped = weight.clone()
    apply_clip(clipped, ratios, spec)
    assert bool((clipped.abs() <= weight.abs()).all())

    def error(w: torch.Tensor) -> float:
        return (x @ quantize_weight(w, spec).T - x @ weight.T).pow(2).mean().item()

    assert error(clipped) < 0.9 * error(weight)


def test_evenly_spaced_rows():
    rows = torch.arange(10).unsqueeze(1)
    assert evenly_spaced(rows, 3).flatten().tolist() == [0, 3, 6]
    assert evenly_spaced(rows, 20).shape[0] == 10


# --- the method on tiny models ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("quant", [W3, W2G16], ids=["w3", "w2g16"])
def test_awq_beats_rtn_on_held_out_tokens(family, quant):
    """Held-out logit MSE against FP, relative to RTN. Measured (model seed 0; seeds 1-3 in
    brackets): llama w3 0.73 (0.68-0.76), w2g16 0.74 (0.67-0.76); opt w3 0.40 (0.37-0.43),
    w2g16 0.44 (0.38-0.52). Without clipping (scales only) 0.76-1.12: on these random models
    the activations have no salient channels for the scales to protect; with a planted
    30x channel, scales alone give 0.29-0.96 and AWQ 0.14-0.55."""
    fp = tiny_model(family)
    calib, held_out = tokens(16, seed=0), tokens(8, seed=5)
    rtn, _ = quantize_copy(RoundToNearest, RTNConfig(), quant, fp, calib)
    model, stats = quantize_copy(AWQ, AWQConfig(), quant, fp, calib)
    ratio = logits_error(model, fp, held_out) / logits_error(rtn, fp, held_out)
    assert ratio < 0.85, ratio
    assert 0 < stats["mse_vs_rtn"] <= 1
    grid = {i / 20 for i in range(20)}
    assert set(stats["alphas"].values()) <= grid
    assert not any("q_proj" in name or "k_proj" in name for name in stats["clip_ratios"])
    assert len(stats["clip_ratios"]) == 2 * (len(adapter_for(fp).linear_names()) - 2)
    assert stats["n_quantized_linears"] == 2 * len(adapter_for(fp).linear_names())
    for _, qlinear in quant_linears(model):
        assert_on_grid(qlinear)


def test_config_is_checked(monkeypatch):
    monkeypatch.setitem(cbq.methods.METHODS, "awq", AWQ)
    assert method_config({"name": "awq"}) == AWQConfig()
    assert method_config({"name": "awq", "clip": False}).clip is False
    assert method_problems({"name": "awq", "clip_max_shrink": 1.0}) == [
        "method.clip_max_shrink: 1.0 is not allowed; allowed: [0, 1)"
    ]
    assert method_problems({"name": "awq", "n_grid": 0}) == ["method.n_grid: 0 must be >= 1"]
