"""Quantizer outputs against hand-computed values, and the STE / LSQ gradients."""

from __future__ import annotations

import functools

import pytest
import torch

from cbq.quant import ActQuantizer, Granularity, QuantSpec, WeightQuantizer, fake_quant
from cbq.quant.quantizer import RangeLearning, offset_fake_quant, round_ste
from cbq.quant.rounding import AdaRound

T = torch.tensor


def weight_q(values, bits, symmetric=False, granularity=Granularity.per_tensor, group_size=None):
    weight = T(values, dtype=torch.float32)
    if weight.ndim == 1:
        weight = weight.unsqueeze(0)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    quantizer = WeightQuantizer(spec, weight)
    return quantizer, quantizer(weight)


def test_asymmetric_2bit_per_tensor():
    # range [-1, 2] -> s = 3/3 = 1, z = 1; codes round(x) + 1 = [0, 1, 1, 3]
    quantizer, out = weight_q([-1.0, -0.2, 0.3, 2.0], bits=2)
    assert quantizer.scale.item() == pytest.approx(1.0)
    assert quantizer.zero.item() == 1.0
    torch.testing.assert_close(out, T([[-1.0, 0.0, 0.0, 2.0]]))


def test_symmetric_3bit_per_tensor():
    # absmax 3 -> s = 3 / (2^2 - 1) = 1, signed grid [-4, 3]
    quantizer, out = weight_q([-1.4, 0.2, 0.7, 3.0], bits=3, symmetric=True)
    assert quantizer.scale.item() == pytest.approx(1.0)
    assert quantizer.zero.item() == 4.0
    torch.testing.assert_close(out, T([[-1.0, 0.0, 1.0, 3.0]]))


def test_symmetric_4bit_per_tensor():
    # s = 3/7: x/s = [-3.27, 0.47, 1.63, 7] -> [-3, 0, 2, 7]
    _, out = weight_q([-1.4, 0.2, 0.7, 3.0], bits=4, symmetric=True)
    torch.testing.assert_close(out, T([[-9 / 7, 0.0, 6 / 7, 3.0]]))


def test_symmetric_clamps_to_negative_end_of_grid():
    # absmax 1 -> s = 1/3 at 3 bits; -1 / s = -3 is on the grid, -4 is the lowest code
    _, out = weight_q([-1.0, 1.0, 0.5], bits=3, symmetric=True)
    torch.testing.assert_close(out, T([[-1.0, 1.0, 2 / 3]]))


def test_asymmetric_2bit_per_channel():
    quantizer, out = weight_q(
        [[1.0, -2.0, 0.4], [0.1, 0.25, 0.4]], bits=2, granularity=Granularity.per_channel
    )
    # row 0: [-2, 1] -> s = 1, z = 2; row 1: [0, 0.4] -> s = 0.4/3, z = 0
    torch.testing.assert_close(quantizer.scale.squeeze(1), T([1.0, 0.4 / 3]))
    torch.testing.assert_close(quantizer.zero.squeeze(1), T([2.0, 0.0]))
    torch.testing.assert_close(out, T([[1.0, -2.0, 0.0], [0.4 / 3, 0.8 / 3, 0.4]]))


def test_per_group_with_partial_last_group():
    # groups of 2 over 5 inputs: [1.1, 2], [3, 4], [-1] (partial, its own step size)
    quantizer, out = weight_q(
        [1.1, 2.0, 3.0, 4.0, -1.0], bits=2, granularity=Granularity.per_group, group_size=2
    )
    assert quantizer.scale.shape == (1, 3)
    torch.testing.assert_close(quantizer.scale, T([[2 / 3, 4 / 3, 1 / 3]]))
    torch.testing.assert_close(quantizer.zero, T([[0.0, 0.0, 3.0]]))
    torch.testing.assert_close(out, T([[4 / 3, 2.0, 8 / 3, 4.0, -1.0]]))


def test_asymmetric_8bit_per_tensor():
    _, out = weight_q([0.0, 1.234, 2.55], bits=8)  # s = 2.55 / 255 = 0.01
    torch.testing.assert_close(out, T([[0.0, 1.23, 2.55]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "granularity,group_size",
    [(Granularity.per_tensor, None), (Granularity.per_channel, None), (Granularity.per_group, 16)],
)
def test_weight_quantizer_matches_elementwise_reference(bits, symmetric, granularity, group_size):
    """Every granularity against a loop over rows and groups of a plain min-max formula."""
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    out = WeightQuantizer(spec, weight)(weight)
    expected = torch.empty_like(weight)
    size = {Granularity.per_tensor: None, Granularity.per_channel: 40, Granularity.per_group: 16}[
        granularity
    ]
    slices = (
        [(slice(None), slice(None))]
        if size is None
        else [(slice(r, r + 1), slice(c, c + size)) for r in range(6) for c in range(0, 40, size)]
    )
    for rows, cols in slices:
        part = weight[rows, cols]
        low, high = min(part.min().item(), 0.0), max(part.max().item(), 0.0)
        if symmetric:
            scale = max(-low, high) / (2 ** (bits - 1) - 1)
            codes = torch.clamp(torch.round(part / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            expected[rows, cols] = codes * scale
        else:
            scale = (high - low) / (2**bits - 1)
            zero = round(-low / scale)
            codes = torch.clamp(torch.round(part / scale) + zero, 0, 2**bits - 1)
            expected[rows, cols] = (codes - zero) * scale
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    levels = out.unique().numel() if size is None else None
    if levels is not None:
        assert levels <= 2**bits


def test_integer_codes_reconstruct_fake_quant():
    weight = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, granularity=Granularity.per_group, group_size=8)
    quantizer = WeightQuantizer(spec, weight)
    codes = quantizer.integers(weight)
    assert codes.min() >= 0 and codes.max() <= 7
    scale, zero = (
        quantizer.expand(quantizer.scale, weight),
        quantizer.expand(quantizer.zero, weight),
    )
    torch.testing.assert_close((codes - zero) * scale, quantizer(weight))


def test_dynamic_per_token_activations():
    quantizer = ActQuantizer(QuantSpec(bits=2, granularity=Granularity.per_token, dynamic=True))
    x = T([[1.0, -0.5, 0.2], [1.0, 4.0, 0.0]])
    # token 0: [-0.5, 1] -> s = 0.5, z = 1; token 1: [0, 4] -> s = 4/3, z = 0
    torch.testing.assert_close(quantizer(x), T([[1.0, -0.5, 0.0], [4 / 3, 4.0, 0.0]]))


def test_dynamic_per_tensor_activations():
    quantizer = ActQuantizer(QuantSpec(bits=2, granularity=Granularity.per_tensor, dynamic=True))
    x = T([[-1.0, -0.2], [0.3, 2.0]])
    torch.testing.assert_close(quantizer(x), T([[-1.0, 0.0], [0.0, 2.0]]))


def test_static_activations_use_observed_range():
    quantizer = ActQuantizer(QuantSpec(bits=2, granularity=Granularity.per_tensor))
    with pytest.raises(RuntimeError, match="before calibration"):
        quantizer(torch.zeros(2))
    quantizer.observing = True
    quantizer(T([-1.0, 0.5]))
    quantizer(T([2.0, 0.0]))
    quantizer.finish_observation()
    assert quantizer.scale.item() == pytest.approx(1.0) and quantizer.zero.item() == 1.0
    # values outside the calibrated range clamp to it
    torch.testing.assert_close(quantizer(T([-3.0, 0.4, 5.0])), T([-1.0, 0.0, 2.0]))


def test_per_token_static_is_rejected():
    with pytest.raises(ValueError, match="dynamic"):
        ActQuantizer(QuantSpec(bits=4, granularity=Granularity.per_token, dynamic=False))


def test_sixteen_bits_is_identity():
    x = torch.randn(3, 5)
    assert torch.equal(ActQuantizer(QuantSpec(bits=16))(x), x)
    assert torch.equal(WeightQuantizer(QuantSpec(bits=16), x)(x), x)


def test_ste_gradient_passes_inside_range_and_stops_outside():
    x = T([-5.0, -0.7, 0.2, 1.1, 9.0], requires_grad=True)
    scale, zero = T(0.5), T(4.0)  # 3-bit: codes round(x/0.5) + 4 in [0, 7] -> x in [-2, 1.5]
    fake_quant(x, scale, zero, qmax=7).sum().backward()
    torch.testing.assert_close(x.grad, T([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_lsq_step_size_and_zero_point_gradients():
    """dQ/ds = round(x/s) - x/s inside, (qmin - z) or (qmax - z) outside; dQ/dz = -s outside."""
    x = T([-5.0, -0.7, 0.2, 1.1, 9.0])
    scale = T(0.5, requires_grad=True)
    zero = T(4.0, requires_grad=True)
    out = fake_quant(x, scale, zero, qmax=7)
    for i in range(5):
        scale.grad = zero.grad = None
        out[i].backward(retain_graph=True)
        ratio = x[i].item() / 0.5
        clipped_low, clipped_high = round(ratio) + 4 < 0, round(ratio) + 4 > 7
        expected_ds = (0 - 4) if clipped_low else (7 - 4) if clipped_high else round(ratio) - ratio
        expected_dz = -0.5 if (clipped_low or clipped_high) else 0.0
        assert scale.grad.item() == pytest.approx(expected_ds, abs=1e-6), i
        assert zero.grad.item() == pytest.approx(expected_dz, abs=1e-6), i


def composed_offset_fake_quant(x, scale, zero, qmax, offset):
    """The oracle: the same quantizer built from autograd's ops (straight-through floor and
    rounding offsets, as the sigmoid form's path still does)."""
    scaled = x.detach() / scale.detach()
    offsets = round_ste(scaled + offset.clamp(-0.5, 0.5)) - scaled.floor()
    return fake_quant(x, scale, zero, qmax, offsets)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("param_shape", [(1, 1, 1), (6, 1, 1), (6, 3, 1)])
def test_the_fused_offset_quantizer_equals_autograd_composition(param_shape, recompute):
    """Values and every gradient (x, step size, zero point, offset), with codes clamped at
    both ends and offsets beyond +-0.5; with the backward pass's masks kept or recomputed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, generator=g) * 3
    scale = (torch.rand(param_shape, generator=g) * 0.5 + 0.3).requires_grad_(True)
    zero = (torch.rand(param_shape, generator=g) * 3 + 2).requires_grad_(True)
    offset = (torch.rand(6, 3, 16, generator=g) * 1.6 - 0.8).requires_grad_(True)
    x.requires_grad_(True)
    weights = torch.randn(6, 3, 16, generator=g)
    grads = []
    fused = functools.partial(offset_fake_quant, recompute=recompute)
    for quantize in (fused, composed_offset_fake_quant):
        for t in (x, scale, zero, offset):
            t.grad = None
        out = quantize(x, scale, zero, 7, offset)
        (out * weights).sum().backward()
        grads.append((out.detach(), *(t.grad.clone() for t in (x, scale, zero, offset))))
    assert grads[0][3].abs().sum() > 0 and (grads[0][4] == 0).float().mean() > 0.2
    for fused, composed in zip(*grads, strict=True):
        torch.testing.assert_close(fused, composed)


@pytest.mark.parametrize("mode", [RangeLearning.none, RangeLearning.step, RangeLearning.clip])
def test_weight_quantizer_with_offset_rounding_equals_the_composed_path(mode):
    """A partial last group (40 = 16 + 16 + 8), learned ranges and an AdaRound offset."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 40, generator=g)
    spec = QuantSpec(bits=3, granularity=Granularity.per_group, group_size=16)
    quantizer = WeightQuantizer(spec, weight)
    params = quantizer.learn_range(mode, weight)
    with torch.no_grad():
        for p in params:
            p.uniform_(0.6, 1.0) if mode is RangeLearning.clip else p.uniform_(-0.3, 0.3)
    rounding = AdaRound(weight)
    with torch.no_grad():
        rounding.d.uniform_(-0.7, 0.7, generator=g)
    fused = quantizer(weight, rounding)
    fused.pow(2).sum().backward()
    fused_grads = [p.grad.clone() for p in [*params, rounding.d]]
    for p in [*params, rounding.d]:
        p.grad = None
    scale, zero = quantizer.params()
    grouped = quantizer.grouped(weight)
    composed = composed_offset_fake_quant(
        grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.qmax, quantizer.grouped(rounding.d)
    )
    composed = quantizer.ungrouped(composed, weight)
    composed.pow(2).sum().backward()
    torch.testing.assert_close(fused, composed)
    for fused_grad, p in zip(fused_grads, [*params, rounding.d], strict=True):
        torch.testing.assert_close(fused_grad, p.grad)


def test_learnable_weight_scale_reduces_error_with_gradient_steps():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    weight[0, 0] = 12.0  # one outlier makes min-max wasteful for row 0
    quantizer = WeightQuantizer(QuantSpec(bits=3, granularity=Granularity.per_channel), weight)
    quantizer.scale.requires_grad_(True)
    optimizer = torch.optim.Adam([quantizer.scale], lr=1e-3)

    def error() -> torch.Tensor:
        return (quantizer(weight) - weight).pow(2).mean()

    before = error().item()
    for _ in range(200):
        optimizer.zero_grad()
        error().backward()
        optimizer.step()
    assert error().item() < 0.95 * before


def test_the_fused_offset_quantizer_keeps_only_its_inputs_when_it_recomputes():
    """With ``recompute``, masks and slopes are recomputed in the backward pass, not kept
    weight-sized from the forward (issue #13): every tensor the graph saves is an input."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 16, generator=g)
    scale = (torch.rand(6, 3, 1, generator=g) + 0.3).requires_grad_(True)
    zero = torch.full((6, 3, 1), 3.0, requires_grad=True)
    offset = (torch.rand(6, 3, 16, generator=g) - 0.5).requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in (x, scale, zero, offset)}
    for recompute, kept_beyond_inputs in ((True, 0), (False, 3)):
        saved = offset_fake_quant(x, scale, zero, 7, offset, recompute=recompute).grad_fn
        storages = [t.untyped_storage().data_ptr() for t in saved.saved_tensors]
        assert sum(ptr not in inputs for ptr in storages) == kept_beyond_inputs, recompute
