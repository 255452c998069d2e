"""GPTQ: the solver on single linears, the block pipeline on tiny models, a Hydra run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbq.blockwise import context_for, embed_batches
from cbq.config import QuantConfig
from cbq.methods import METHODS
from cbq.methods.gptq import (
    GPTQ,
    BlockStream,
    GPTQConfig,
    GPTQError,
    HessianAccumulator,
    execution_stages,
    gptq_solve,
    quantize_linear,
)
from cbq.models import adapter_for, tiny_model
from cbq.quant import (
    Granularity,
    QuantLinear,
    QuantSpec,
    WeightQuantizer,
    fake_quant,
    minmax_params,
    quant_linears,
    wrap_block,
)

from helpers import (
    assert_on_grid,
    logits_error,
    quantize_copy,
    rtn_method_model,
    rtn_model,
    tokens,
)

FP = QuantSpec(bits=16)
W3 = QuantSpec(bits=3, granularity=Granularity.per_channel)
# 72 inputs = 4.5 groups of 16: the last group is partial.
W2G16 = QuantSpec(bits=2, granularity=Granularity.per_group, group_size=16)
W3_TENSOR = QuantSpec(bits=3, granularity=Granularity.per_tensor)
W3G20_SYM = QuantSpec(bits=3, symmetric=True, granularity=Granularity.per_group, group_size=20)


def correlated_inputs(n: int = 1024, cols: int = 72, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.3 * torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[1], x.device)
    for chunk in x.split(100):  # mini-batches, as the pipeline feeds them
        accumulator.add(chunk)
    return accumulator.hessian()


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return (x @ weight.T - x @ quantized.T).pow(2).sum().item()


def gptq_linear(spec: QuantSpec, cfg: GPTQConfig, x: torch.Tensor) -> tuple[QuantLinear, ...]:
    linear = nn.Linear(x.shape[1], 48)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        nn.init.normal_(linear.weight)
    original = linear.weight.detach().clone()
    qlinear = QuantLinear(linear, spec, FP)
    quantize_linear(qlinear, hessian_of(x), cfg, "test.linear")
    return qlinear, original


@pytest.mark.parametrize(
    "spec,cfg",
    [
        (W3, GPTQConfig()),
        (W2G16, GPTQConfig()),
        (W3_TENSOR, GPTQConfig()),
        (W3G20_SYM, GPTQConfig(block_size=7)),
        (W2G16, GPTQConfig(act_order=True)),
        (W2G16, GPTQConfig(act_order=True, static_groups=True)),
        (W3, GPTQConfig(act_order=True, static_groups=True)),
    ],
    ids=["w3", "w2g16", "w3-tensor", "w3g20-sym-bs7", "w2g16-act", "w2g16-act-static", "w3-act-st"],
)
def test_gptq_beats_rtn_on_a_linear_and_stays_on_its_grid(spec, cfg):
    """Measured GPTQ/RTN output error: w3 0.54, w2g16 0.59, per-tensor 0.49, w3g20 0.51,
    w2g16 act_order 0.58, act_order + static_groups 0.54 (w2g16) / 0.48 (w3)."""
    x = correlated_inputs()
    qlinear, original = gptq_linear(spec, cfg, x)
    rtn = WeightQuantizer(spec, original)(original)
    gptq_error, rtn_error = (
        output_error(x, original, qlinear.weight),
        output_error(x, original, rtn),
    )
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)
    assert_on_grid(qlinear)


def test_static_groups_are_fitted_on_the_original_weights():
    x = correlated_inputs()
    qlinear, original = gptq_linear(W2G16, GPTQConfig(act_order=True, static_groups=True), x)
    reference = WeightQuantizer(W2G16, original)
    torch.testing.assert_close(qlinear.weight_quantizer.scale, reference.scale)
    torch.testing.assert_close(qlinear.weight_quantizer.zero, reference.zero)


def reference_obs(weight, hessian, spec, percdamp=0.01, act_order=False) -> torch.Tensor:
    """Textbook sequential OBS in float64 with an explicit inverse, no Cholesky, no lazy
    batches: quantize one column, update all others, eliminate it from ``H^-1``; a group's
    step size is fitted on its current weights when its first column comes."""
    w, h = weight.double().clone(), hessian.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    cols = w.shape[1]
    size = spec.group_size if spec.granularity is Granularity.per_group else cols
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    params = {}
    for c in order.tolist() if act_order else range(cols):
        group = c // size
        if group not in params:
            values = w[:, group * size : (group + 1) * size]
            params[group] = minmax_params(values.amin(1), values.amax(1), spec)
        q = fake_quant(w[:, c], *params[group], spec.qmax)
        w -= ((w[:, c] - q) / inverse[c, c]).unsqueeze(1) * inverse[c].unsqueeze(0)
        w[:, c] = q
        inverse -= inverse[:, c : c + 1] @ inverse[c : c + 1] / inverse[c, c]
    return w.float()


@pytest.mark.parametrize("spec", [W3, W2G16], ids=["w3", "w2g16"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [128, 5])
def test_solver_matches_textbook_obs(spec, act_order, block_size):
    x = correlated_inputs(n=512, cols=40)
    weight = torch.randn(32, 40, generator=torch.Generator().manual_seed(2))
    hessian = hessian_of(x)
    quantizer = WeightQuantizer(spec, weight)
    cfg = GPTQConfig(act_order=act_order, block_size=block_size)
    quantized = gptq_solve(weight, hessian, quantizer, cfg)
    expected = reference_obs(weight, hessian, spec, act_order=act_order)
    torch.testing.assert_close(quantized, expected, atol=1e-5, rtol=0)
    assert torch.equal(quantizer(quantized), quantized)


def test_dead_columns_get_zero_weight():
    x = correlated_inputs(cols=32)
    x[:, [3, 17]] = 0.0
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    quantizer = WeightQuantizer(W3, weight)
    quantized = gptq_solve(weight, hessian_of(x), quantizer, GPTQConfig())
    assert torch.isfinite(quantized).all()
    assert (quantized[:, [3, 17]] == 0).all()


def test_indefinite_hessian_names_the_linear_and_percdamp():
    hessian = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    quantizer = WeightQuantizer(W3, torch.ones(4, 2))
    with pytest.raises(GPTQError, match=r"block 3 fc1.*method\.percdamp"):
        gptq_solve(torch.ones(4, 2), hessian, quantizer, GPTQConfig(), "block 3 fc1")


def test_config_is_registered_and_checked():
    assert METHODS["gptq"] is GPTQ and GPTQ.needs_calibration
    from cbq.methods import method_config, method_problems

    assert method_config({"name": "gptq"}) == GPTQConfig()
    assert method_problems({"name": "gptq", "percdamp": -0.1}) == [
        "method.percdamp: -0.1 must be >= 0"
    ]


# --- the block pipeline on tiny models --------------------------------------------------------
W3_RUN = QuantConfig(name="w3a16", w_bits=3)
W2G16_RUN = QuantConfig(name="w2a16g16", w_bits=2, w_granularity="per_group", w_group_size=16)
W4A8_RUN = QuantConfig(name="w4a8", w_bits=4, a_bits=8)


def gptq_model(model: nn.Module, quant: QuantConfig, calib: torch.Tensor, **cfg) -> tuple:
    return quantize_copy(GPTQ, GPTQConfig(**cfg), quant, model, calib)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("quant", [W3_RUN, W2G16_RUN], ids=["w3", "w2g16"])
def test_gptq_model_beats_rtn_on_held_out_tokens(family, quant):
    """Logit MSE against the FP model, GPTQ/RTN on held-out random tokens (measured, model
    seeds 0/1): llama w3 0.68, w2g16 0.67-0.78; opt w3 0.32-0.33, w2g16 0.29-0.35."""
    fp = tiny_model(family)
    quantized, stats = gptq_model(fp, quant, tokens(16, seed=0))
    held_out = tokens(8, seed=5)
    gptq_error, rtn_error = (
        logits_error(quantized, fp, held_out),
        logits_error(rtn_model(fp, quant), fp, held_out),
    )
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)
    assert 0 < stats["error_vs_rtn"] < 0.9
    n_linears = 2 * len(adapter_for(fp).linear_names())
    assert stats["n_quantized_linears"] == len(stats["layers"]) == n_linears
    for _, qlinear in quant_linears(quantized):
        assert_on_grid(qlinear)


def test_variants_and_static_activations_beat_rtn():
    """Measured GPTQ/RTN held-out logit MSE on tiny llama: w3 capture-once 0.72,
    act_order + static_groups 0.79, w4a8 (static activation ranges) 0.78."""
    fp = tiny_model("llama")
    calib, held_out = tokens(16, seed=0), tokens(8, seed=5)
    rtn_error = logits_error(rtn_model(fp, W3_RUN), fp, held_out)
    for cfg in ({"true_sequential": False}, {"act_order": True, "static_groups": True}):
        quantized, _ = gptq_model(fp, W3_RUN, calib, batch_size=3, **cfg)
        assert logits_error(quantized, fp, held_out) < 0.95 * rtn_error, cfg
    quantized, _ = gptq_model(fp, W4A8_RUN, calib)
    assert all(q.act_quantizer.calibrated for _, q in quant_linears(quantized))
    rtn_error = logits_error(rtn_method_model(fp, W4A8_RUN, calib), fp, held_out)
    assert logits_error(quantized, fp, held_out) < 0.95 * rtn_error


LLAMA_STAGES = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down"]]


@pytest.mark.parametrize(
    "family,expected",
    [
        ("llama", LLAMA_STAGES),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
        (
            "gemma3",
            [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down"]],
        ),
        ("bloom", [["query_key_value"], ["dense"], ["dense_h_to_4h"], ["dense_4h_to_h"]]),
    ],
)
def test_true_sequential_stages_follow_execution_and_shared_inputs(family, expected):
    adapter = adapter_for(tiny_model(family))
    hidden = embed_batches(adapter, tokens(2, seed=0), 2, torch.device("cpu"))
    stream = BlockStream(adapter, 0, hidden, context_for(adapter, hidden, 2), 2)
    spec = QuantSpec(bits=4, granularity=Granularity.per_channel)
    qlinears = wrap_block(adapter.blocks()[0], adapter.linear_names(), spec, FP)
    stages = execution_stages(stream, qlinears)
    short = [[name.rsplit(".", 1)[-1].replace("down_proj", "down") for name in s] for s in stages]
    assert short == expected


# --- a run through the Hydra entry point ------------------------------------------------------
def test_gptq_runs_through_hydra(tiny_run, tiny_corpus):
    metrics, record = tiny_run(
        "llama", "method=gptq", "quant=w3a16g128", "method.act_order=true", max_eval_windows=4
    )
    assert record["status"] == "finished" and metrics[f"ppl/{tiny_corpus.stem}"] > 1
    assert record["config"]["method"]["act_order"] is True
    assert record["calibration"]["n_samples"] == 4
    assert record["stats"]["n_quantized_linears"] == 14 and record["stats"]["error_vs_rtn"] < 1
