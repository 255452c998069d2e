"""QuantLinear: quantized forward, materialization, wrapping and activation calibration."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from cbq.quant import (
    Granularity,
    QuantLinear,
    QuantSpec,
    observing_activations,
    quant_linears,
    stored_weights,
    unwrap_block,
    wrap_block,
)
from cbq.quant.quantizer import RangeLearning
from cbq.quant.rounding import AdaRound, LoRARounding

W4 = QuantSpec(bits=4, granularity=Granularity.per_channel)
A8 = QuantSpec(bits=8, granularity=Granularity.per_tensor)
FP = QuantSpec(bits=16)


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleDict({"proj": nn.Linear(8, 8)})
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.attn["proj"](x)))


def test_forward_uses_fake_quantized_weight_and_bias():
    linear = nn.Linear(6, 3)
    qlinear = QuantLinear(linear, W4, FP)
    x = torch.randn(2, 6)
    expected = x @ qlinear.weight_quantizer(linear.weight).T + linear.bias
    torch.testing.assert_close(qlinear(x), expected)
    assert not torch.allclose(qlinear(x), linear(x))


def test_materialize_writes_quantized_weight_once():
    linear = nn.Linear(6, 3)
    qlinear = QuantLinear(linear, W4, FP)
    x = torch.randn(2, 6)
    before = qlinear(x)
    qlinear.materialize()
    torch.testing.assert_close(qlinear(x), before)
    torch.testing.assert_close(linear(x), before)  # the plain linear now holds Q(W)
    qlinear.materialize()  # idempotent: quantizing Q(W) again would not be a no-op in general
    torch.testing.assert_close(qlinear(x), before)


def test_stored_weights_forwards_the_fp_weight_then_quantizes_again():
    linear = nn.Linear(6, 3)
    qlinear = QuantLinear(linear, W4, FP)
    x = torch.randn(2, 6)
    quantized = qlinear(x)
    with stored_weights([qlinear]):
        torch.testing.assert_close(qlinear(x), linear(x))
    torch.testing.assert_close(qlinear(x), quantized)
    qlinear.materialize()
    with pytest.raises(RuntimeError, match="not materialized"), stored_weights([qlinear]):
        pass


def test_wrap_and_unwrap_block():
    block = TinyBlock()
    x = torch.randn(5, 8)
    reference = block(x)
    wrapped = wrap_block(block, ["attn.proj", "fc"], W4, FP)
    assert set(wrapped) == {"attn.proj", "fc"}
    assert [name for name, _ in quant_linears(block)] == ["attn.proj", "fc"]
    assert wrap_block(block, ["attn.proj", "fc"], W4, FP) == wrapped  # idempotent
    quantized = block(x)
    assert not torch.allclose(quantized, reference)
    unwrap_block(block)
    assert isinstance(block.fc, nn.Linear) and not list(quant_linears(block))
    torch.testing.assert_close(block(x), reference)  # weights were never materialized


def test_wrap_rejects_non_linear():
    block = TinyBlock()
    with pytest.raises(TypeError, match="attn is a ModuleDict"):
        wrap_block(block, ["attn"], W4, FP)


def test_static_activation_calibration_observes_fp_inputs():
    block = TinyBlock()
    wrap_block(block, ["attn.proj", "fc"], FP, A8)
    x = torch.randn(32, 8)
    with observing_activations(block) as quantizers:
        observed = block(x)
    assert len(quantizers) == 2
    # while observing, the block is exactly the FP block
    unwrapped = TinyBlock()
    torch.testing.assert_close(observed, unwrapped(x))
    proj_quantizer = block.attn["proj"].act_quantizer
    low, high = min(x.min().item(), 0), max(x.max().item(), 0)
    assert proj_quantizer.scale.item() == pytest.approx((high - low) / 255, rel=1e-6)
    error = (block(x) - observed).abs().max().item()
    assert 0 < error < 0.1  # 8-bit activations: small but real error


def test_failed_observation_leaves_quantizers_uncalibrated():
    block = TinyBlock()
    wrap_block(block, ["fc"], FP, A8)
    with pytest.raises(RuntimeError, match="boom"), observing_activations(block):
        raise RuntimeError("boom")
    assert not block.fc.act_quantizer.observing and not block.fc.act_quantizer.calibrated


def _learning_qlinear(rounding_kind: str) -> tuple[QuantLinear, list[torch.Tensor]]:
    """A 3-bit per-group QuantLinear learning its step sizes and a non-zero rounding."""
    torch.manual_seed(3)
    linear = nn.Linear(40, 24)
    spec = QuantSpec(bits=3, granularity=Granularity.per_group, group_size=16)
    qlinear = QuantLinear(linear, spec, FP)
    qlinear.lean_backward = True
    params = qlinear.weight_quantizer.learn_range(RangeLearning.step, linear.weight)
    weight = linear.weight
    qlinear.rounding = AdaRound(weight) if rounding_kind == "adaround" else LoRARounding(weight, 4)
    with torch.no_grad():
        for p in qlinear.rounding.parameters():
            p.normal_(0, 0.3)
    return qlinear, [*params, *qlinear.rounding.parameters()]


@pytest.mark.parametrize("rounding_kind", ["adaround", "lora"])
def test_backward_recomputes_the_quantized_weight_instead_of_keeping_it(rounding_kind):
    """With ``lean_backward``, the forward pass keeps no copy of the fake-quantized weight
    alive (a CBQ window's memory, issue #13), and the gradients equal those of the plain linear
    that keeps it."""
    qlinear, params = _learning_qlinear(rounding_kind)
    x = torch.randn(2, 5, 40, requires_grad=True)
    produced = []
    quantized_weight = QuantLinear.quantized_weight

    def watched(self: QuantLinear) -> torch.Tensor:
        weight = quantized_weight(self)
        produced.append(weakref.ref(weight if weight._base is None else weight._base))
        return weight

    QuantLinear.quantized_weight = watched  # type: ignore[method-assign]
    try:
        output = qlinear(x)
    finally:
        QuantLinear.quantized_weight = quantized_weight  # type: ignore[method-assign]
    gc.collect()
    assert produced and produced[0]() is None, "the graph still holds the quantized weight"
    output.square().sum().backward()
    recomputed = [t.grad.clone() for t in (*params, x)]

    for t in (*params, x):
        t.grad = None
    weight = qlinear.quantized_weight()
    held = weakref.ref(weight._base)
    kept = nn.functional.linear(x, weight, qlinear.bias)
    del weight
    gc.collect()
    assert held() is not None, "the check above would not see a kept weight"
    kept.square().sum().backward()
    assert all(g.abs().sum() > 0 for g in recomputed)
    for got, want in zip(recomputed, (t.grad for t in (*params, x)), strict=True):
        assert torch.equal(got, want)
