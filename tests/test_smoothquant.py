"""SmoothQuant and OS+: exact folds on every tiny family, the shift fold, the input statistics,
beating RTN at W8A8 / W4A8 with a planted activation-outlier channel, a Hydra run."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import cbq.methods
from cbq.config import Config, QuantConfig
from cbq.methods import method_config, method_problems
from cbq.methods.rtn import RoundToNearest, RTNConfig
from cbq.methods.smoothquant import (
    OSPlusConfig,
    OutlierSuppressionPlus,
    SmoothQuant,
    SmoothQuantConfig,
)
from cbq.models import ModelAdapter, ScaleGroup, adapter_for, tiny_model
from cbq.models.adapter import consumer_weight
from cbq.quant import quant_linears
from cbq.transforms import (
    CalibrationStream,
    capture_inputs,
    channel_center,
    fold_shift,
    migration_scale,
    shift_problem,
    weight_channel_absmax,
)

from helpers import CPU, assert_on_grid, logits, logits_error, quantize_copy, tokens

FAMILIES = ["opt", "bloom", "llama", "gemma3"]
W8A8 = QuantConfig(name="w8a8", w_bits=8, a_bits=8)
W4A8 = QuantConfig(name="w4a8", w_bits=4, a_bits=8)
W4A16 = QuantConfig(name="w4a16", w_bits=4)
PLANTED = 5  # channel of every block's attention-input norm made 30x larger


def group(adapter: ModelAdapter, name: str, index: int = 0) -> ScaleGroup:
    return next(g for g in adapter.scale_groups(adapter.blocks()[index]) if g.name == name)


def transform_all_blocks(method, model: nn.Module, calib: torch.Tensor) -> list[dict]:
    """Fold the method's transforms into every (FP) block, without quantizing anything."""
    adapter = adapter_for(model)
    stream = CalibrationStream.embed(adapter, calib, 2, CPU)
    stats = []
    for index in range(len(adapter.blocks())):
        stats.append(method.transform_block(adapter, index, stream))
        stream.advance(index)
    return stats


# --- exactness --------------------------------------------------------------------------------
FORCED_OSPLUS = OSPlusConfig(alphas=[0.5], try_identity=False, search_shift=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method",
    [
        SmoothQuant(SmoothQuantConfig(), Config(quant=W4A8)),
        OutlierSuppressionPlus(FORCED_OSPLUS, Config(quant=W4A8)),
    ],
    ids=["smoothquant", "osplus"],
)
def test_folded_transforms_leave_the_fp_logits_unchanged(family, method):
    fp = tiny_model(family)
    model = copy.deepcopy(fp)
    stats = transform_all_blocks(method, model, tokens(4, seed=0))
    held_out = tokens(2, seed=5)
    torch.testing.assert_close(logits(model, held_out), logits(fp, held_out), atol=1e-5, rtol=1e-5)
    changed = [
        (a - b).abs().max().item() for a, b in zip(fp.parameters(), model.parameters(), strict=True)
    ]
    assert max(changed) > 0.1  # the transform did something
    n_groups = len(adapter_for(fp).scale_groups(adapter_for(fp).blocks()[0]))
    assert all(len(block) == n_groups for block in stats)
    if method.name == "osplus":
        shifted = {name for name, s in stats[0].items() if s["shifted"]}
        # LayerNorm producers with biases, and value -> out with biases; no RMSNorm shifts.
        expected = {
            "opt": {"attn_in", "mlp_in", "attn_out"},
            "bloom": {"attn_in", "mlp_in", "attn_out"},
        }
        assert shifted == expected.get(family, set())


def test_shift_fold_is_exact_and_refused_where_it_is_not():
    model = tiny_model("opt")
    adapter = adapter_for(model)
    ids = tokens(2, seed=1)
    reference = logits(model, ids)
    attn_in = group(adapter, "attn_in")
    fold_shift(attn_in, torch.linspace(-2.0, 3.0, attn_in.num_channels))
    fold_shift(group(adapter, "attn_out"), torch.full((64,), 0.7))
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    assert "nonlinearity" in shift_problem(group(adapter, "mlp_out"))
    with pytest.raises(ValueError, match="nonlinearity"):
        fold_shift(group(adapter, "mlp_out"), torch.zeros(128))
    llama = adapter_for(tiny_model("llama"))
    assert shift_problem(group(llama, "attn_in")) == "the producer has no bias"
    assert shift_problem(group(llama, "mlp_out")) == "the producer has no bias"


def test_bloom_value_shift_touches_only_the_value_rows():
    adapter = adapter_for(tiny_model("bloom"))
    attn_out = group(adapter, "attn_out")
    bias = attn_out.producer.bias.detach().clone()
    fold_shift(attn_out, torch.ones(attn_out.num_channels))
    rows = attn_out.producer_rows
    others = torch.ones(bias.numel(), dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(attn_out.producer.bias[rows], bias[rows] - 1.0)
    assert torch.equal(attn_out.producer.bias[others], bias[others])


# --- statistics and scales ----------------------------------------------------------------------
def test_captured_statistics_cover_every_token_and_sample_a_subset():
    adapter = adapter_for(tiny_model("llama"))
    stream = CalibrationStream.embed(adapter, tokens(5, seed=0), 2, CPU)
    names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    block = adapter.blocks()[0]
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    stream.forward(0)
    for handle in handles:
        handle.remove()
    stats = capture_inputs(adapter, 0, stream.hidden, stream.ctx, names, 2, max_tokens=50)
    for name in names:
        everything = torch.cat(seen[name])
        assert stats[name].tokens == everything.shape[0] == 5 * 32
        torch.testing.assert_close(stats[name].low, everything.amin(0))
        torch.testing.assert_close(stats[name].high, everything.amax(0))
        torch.testing.assert_close(stats[name].abs_mean(), everything.abs().mean(0))
        samples = stats[name].samples
        assert samples.shape == (50, everything.shape[1])
        assert all(bool((everything == row).all(1).any()) for row in samples)
    # q and k read the same tensor: one copy of the sampled rows.
    assert stats["self_attn.q_proj"].chunks[0] is stats["self_attn.k_proj"].chunks[0]


def test_migration_scale_and_channel_center():
    act, weight = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    torch.testing.assert_close(migration_scale(act, weight, 0.5), torch.tensor([2.0, 0.5, 1, 1]))
    torch.testing.assert_close(migration_scale(act, weight, 1.0)[:2], act[:2])
    adapter = adapter_for(tiny_model("llama"))
    attn_out = group(adapter, "attn_out")  # GQA: 32 value channels feed 64 o_proj columns
    low, high = -torch.arange(64.0), torch.arange(64.0) + 2
    center = channel_center(attn_out, low, high)
    assert center.shape == (32,)
    mine = attn_out.column_channels == 3
    assert center[3] == (high[mine].max() + low[mine].min()) / 2
    absmax = weight_channel_absmax(attn_out)
    column = consumer_weight(attn_out.consumers[0]).abs().amax(0)
    assert absmax[3] == column[mine].max()


# --- beating RTN with a planted outlier channel ------------------------------------------------
def planted(family: str) -> nn.Module:
    """A tiny model whose attention-input norms make channel PLANTED ~30x the others."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        for index in range(len(adapter.blocks())):
            group(adapter, "attn_in", index).producer.weight[PLANTED] *= 30.0
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("quant", [W8A8, W4A8], ids=["w8a8", "w4a8"])
def test_smoothing_beats_rtn_with_a_planted_outlier_channel(family, quant):
    """Held-out logit MSE against the planted FP model, relative to RTN (static activation
    ranges) on the same planted model. Measured (model seed 0; seeds 1-3 in brackets):
    smoothquant llama w8a8 0.33 (0.06-0.28), w4a8 0.64 (0.30-0.54); opt w8a8 0.21
    (0.08-0.34), w4a8 0.73 (0.51-0.68). osplus llama w8a8 0.34 (0.06-0.20), w4a8 0.56
    (0.21-0.51); opt w8a8 0.19 (0.07-0.29), w4a8 0.66 (0.20-0.44)."""
    fp = planted(family)
    calib, held_out = tokens(16, seed=0), tokens(8, seed=5)
    with torch.no_grad():
        x = adapter_for(fp).embed(held_out)
        norm_out = group(adapter_for(fp), "attn_in").producer(x).abs().amax((0, 1))
    assert norm_out[PLANTED] > 10 * norm_out.median()  # the outlier is there for everyone
    rtn, _ = quantize_copy(RoundToNearest, RTNConfig(), quant, fp, calib)
    rtn_error = logits_error(rtn, fp, held_out)
    for cls, cfg in [(SmoothQuant, SmoothQuantConfig()), (OutlierSuppressionPlus, OSPlusConfig())]:
        model, stats = quantize_copy(cls, cfg, quant, fp, calib)
        error = logits_error(model, fp, held_out)
        assert error < 0.85 * rtn_error, (cls.name, error / rtn_error)
        assert stats["n_quantized_linears"] == 2 * len(adapter_for(fp).linear_names())
        for _, qlinear in quant_linears(model):
            assert qlinear.act_quantizer.calibrated
            assert_on_grid(qlinear)
        if cls is OutlierSuppressionPlus:
            assert set(stats["alphas"].values()) <= {*cfg.alphas, None}
            assert 0 < stats["mse_vs_identity"] < 1


def test_weight_only_setting_warns_and_still_quantizes(caplog):
    fp = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        model, stats = quantize_copy(SmoothQuant, SmoothQuantConfig(), W4A16, fp, tokens(4, seed=0))
    assert "leaves activations in full precision" in caplog.text
    assert all(q.weight_materialized for _, q in quant_linears(model))
    assert stats["n_smoothed_groups"] == 2 * 4


def test_configs_are_checked(monkeypatch):
    monkeypatch.setitem(cbq.methods.METHODS, "smoothquant", SmoothQuant)
    monkeypatch.setitem(cbq.methods.METHODS, "osplus", OutlierSuppressionPlus)
    assert method_config({"name": "osplus"}) == OSPlusConfig()
    assert method_config({"name": "smoothquant", "alpha": 0.8}).alpha == 0.8
    assert method_problems({"name": "smoothquant", "alpha": 1.5}) == [
        "method.alpha: 1.5 is not allowed; allowed: [0, 1]"
    ]
    assert "method.alphas" in method_problems({"name": "osplus", "alphas": []})[0]


# --- a run through the Hydra entry point ------------------------------------------------------
def test_osplus_runs_through_hydra(tiny_run, tiny_corpus, monkeypatch):
    monkeypatch.setitem(cbq.methods.METHODS, "osplus", OutlierSuppressionPlus)
    metrics, record = tiny_run(
        "opt", "method=osplus", "quant=w8a8", "method.alphas=[0.4,0.6]", max_eval_windows=4
    )
    assert record["status"] == "finished" and metrics[f"ppl/{tiny_corpus.stem}"] > 1
    assert record["config"]["method"]["alphas"] == [0.4, 0.6]
    stats = record["stats"]
    assert stats["n_quantized_linears"] == 12 and stats["n_shifted_groups"] >= 1
    assert set(stats["alphas"]) == {
        f"{b}.{g}" for b in (0, 1) for g in ("attn_in", "mlp_in", "attn_out", "mlp_out")
    }
