"""Uniform affine fake-quantization with learnable step size and zero point (LSQ).

``Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)``

Rounding uses a straight-through estimator, so gradients reach ``s`` and ``z`` exactly as
in LSQ (Esser et al., 2019): inside the range ``dQ/ds = round(x/s) - x/s``, outside it
``qmin - z`` or ``qmax - z``. Symmetric quantizers fix ``z = 2^(b-1)``, which is the signed
grid ``[-2^(b-1), 2^(b-1) - 1]``.

Ranges include zero (as in the GPTQ reference), so zero is exactly representable and a
partial last group can be padded with zeros without changing its statistics.

A weight quantizer's range can be learned in two ways (:class:`RangeLearning`), each per row
and group, so that one learning rate suits every row whatever its magnitude:

- ``step``: LSQ on ``s = s0 * exp(g)``: Adam moves ``g`` by about ``lr`` a step, a relative
  change of every step size by ``lr`` (not of the tensor's mean step size);
- ``clip``: AutoRound's / OmniQuant's learnable clipping of both bounds, ``[f_lo * min(W_g),
  f_hi * max(W_g)]`` with factors in ``(0, 1]``; step size and zero point follow by min-max.

:meth:`WeightQuantizer.freeze` writes the learned step sizes and zero points into ``scale`` /
``zero`` and drops the learned parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

FULL_PRECISION_BITS = 16
# A learned rounding offset (AutoRound's V) is clamped to [-OFFSET_BOUND, OFFSET_BOUND].
OFFSET_BOUND = 0.5


class RangeLearning(StrEnum):
    none = "none"
    step = "step"
    clip = "clip"


# Lower bound of the learned clipping factors (AutoRound bounds them to [0, 1]).
MIN_CLIP_FACTOR = 1e-2


class Granularity(StrEnum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"
    per_group = "per_group"
    per_token = "per_token"


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer does; ``bits >= 16`` means no quantization."""

    bits: int = FULL_PRECISION_BITS
    symmetric: bool = False
    granularity: Granularity = Granularity.per_tensor
    group_size: int | None = None
    dynamic: bool = False

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.floor() - x).detach() + x


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    rounding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale`` and (float) ``zero``.

    ``rounding`` replaces round-to-nearest by ``floor(x/s) + rounding`` (AdaRound-style
    soft rounding offsets in [0, 1]).
    """
    scaled = x / scale
    integer = round_ste(scaled) if rounding is None else floor_ste(scaled) + rounding
    zero = round_ste(zero)
    return (torch.clamp(integer + zero, 0, qmax) - zero) * scale


class _OffsetFakeQuant(torch.autograd.Function):
    """``fake_quant`` with ``round(x/s + clamp(v, -b, b))`` in one forward and one backward pass.

    The same straight-through gradients as the composition of :func:`round_ste` /
    :func:`fake_quant` (which a test checks), computed in place: autograd's graph of that
    composition costs more than a SmolLM2 block's matmuls at batch 1 x 256 tokens (docs,
    "Fake-quant overhead"). It keeps its range masks and step-size slope for the backward pass
    (10 bytes per weight), or with ``recompute`` only its inputs, recomputing the rest there:
    for runs bound by memory (``QuantLinear.lean_backward``, which with the weight's own
    recomputation costs about 1.3x a block's training step, docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, scale, zero, offset, qmax, bound, recompute):
        codes, scaled, outside = _offset_codes(x, scale, zero, offset, qmax, bound)
        ctx.qmax, ctx.bound, ctx.recompute = qmax, bound, recompute
        if recompute:
            ctx.save_for_backward(x, scale, zero, offset)
            return codes.mul_(scale)
        out = codes * scale
        ctx.save_for_backward(scale, zero, *_slope_and_masks(ctx, codes, scaled, outside, offset))
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.recompute:
            x, scale, zero, offset = ctx.saved_tensors
            codes, scaled, outside = _offset_codes(x, scale, zero, offset, ctx.qmax, ctx.bound)
            step_slope, outside, offset_blocked = _slope_and_masks(
                ctx, codes, scaled, outside, offset
            )
            del codes, scaled
        else:
            scale, zero, step_slope, outside, offset_blocked = ctx.saved_tensors
        need_x, need_scale, need_zero, need_offset = ctx.needs_input_grad[:4]
        grad_x = grad_scale = grad_zero = grad_offset = None
        if need_x:
            grad_x = grad.masked_fill(outside, 0)
        if need_scale:
            grad_scale = _sum_to(grad * step_slope, scale.shape)
        scaled_grad = grad * scale
        if need_zero:  # dQ/dz: -s outside the range
            grad_zero = _sum_to(-torch.where(outside, scaled_grad, 0), zero.shape)
        if need_offset:
            grad_offset = scaled_grad.masked_fill_(offset_blocked, 0)
        return grad_x, grad_scale, grad_zero, grad_offset, None, None, None


def _slope_and_masks(
    ctx: Any,
    codes: torch.Tensor,
    scaled: torch.Tensor,
    outside: torch.Tensor,
    offset: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """What the backward pass needs (overwriting ``codes`` and ``scaled``): dQ/ds (LSQ),
    ``(q - z) - x/s`` inside the range and ``q - z`` outside; the range mask; and where the
    offset gets no gradient (outside the range, or clamped)."""
    need_scale, need_offset = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    step_slope = codes.sub_(scaled.masked_fill_(outside, 0)) if need_scale else None
    offset_blocked = outside | (offset.abs() > ctx.bound) if need_offset else None
    return step_slope, outside, offset_blocked


def _offset_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    offset: torch.Tensor | None,
    qmax: int,
    bound: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q - z, x / s, outside the range)`` with ``q = clamp(round(x/s + clamp(offset)) + z)``."""
    zero_int = zero.round()
    scaled = x / scale
    codes = scaled.clone() if offset is None else scaled + offset.clamp(-bound, bound)
    codes.round_().add_(zero_int)
    outside = (codes < 0).logical_or_(codes > qmax)
    codes.clamp_(0, qmax).sub_(zero_int)
    return codes, scaled, outside


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (of the same number of dimensions)."""
    dims = [d for d, (g, n) in enumerate(zip(grad.shape, shape, strict=True)) if n == 1 < g]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def offset_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    offset: torch.Tensor | None = None,
    bound: float = OFFSET_BOUND,
    recompute: bool = False,
) -> torch.Tensor:
    """``fake_quant(x, scale, zero, qmax)`` with ``round(x/s + clamp(offset, -bound, bound))``
    in place of ``round(x/s)`` (AutoRound's rounding offset; ``None`` is RTN). ``scale`` and
    ``zero`` broadcast against ``x`` and keep their own shapes' gradients. ``recompute`` keeps
    only the inputs for the backward pass, and recomputes the rest there."""
    return _OffsetFakeQuant.apply(x, scale, zero, offset, qmax, bound, recompute)


def minmax_params(
    low: torch.Tensor,
    high: torch.Tensor,
    spec: QuantSpec,
    eps: float = 1e-8,
    straight_through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point covering ``[min(low, 0), max(high, 0)]``.

    ``straight_through`` rounds the zero point with a straight-through gradient (AutoRound's),
    so that a learned lower bound also gets the gradient of the zero point it moves."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = torch.maximum(-low, high) / (half - 1)
        scale = torch.clamp(scale, min=eps)
        return scale, torch.full_like(scale, float(half))
    scale = torch.clamp((high - low) / spec.qmax, min=eps)
    zero = -low / scale
    return scale, round_ste(zero) if straight_through else torch.round(zero)


def group_columns(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(rows, in)`` as ``(rows, groups, size)``, zero-padding a partial last group."""
    pad = (-t.shape[-1]) % size
    if pad:
        t = nn.functional.pad(t, (0, pad))
    return t.reshape(t.shape[0], -1, size)


class WeightQuantizer(nn.Module):
    """Static weight quantizer: per-tensor, per-output-channel or per-group of inputs.

    Parameters are kept per row and group, shaped ``(rows, groups)``; a partial last group
    (input width not a multiple of the group size) gets its own step size.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, clip_ratio: float = 1.0):
        super().__init__()
        if spec.granularity is Granularity.per_token:
            raise ValueError("per_token granularity is for activations, not weights")
        self.spec = spec
        self.clip_ratio = clip_ratio
        self.in_features = weight.shape[-1]
        scale, zero = self._initial_params(weight.detach())
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.zero = nn.Parameter(zero, requires_grad=False)
        self.range_learning = RangeLearning.none

    @property
    def group_size(self) -> int:
        if self.spec.granularity is Granularity.per_group:
            assert self.spec.group_size is not None
            return self.spec.group_size
        return self.in_features

    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """View ``(rows, in)`` as ``(rows, groups, group_size)``, zero-padding the last group."""
        rows = 1 if self.spec.granularity is Granularity.per_tensor else weight.shape[0]
        flat = weight.reshape(rows, -1)
        size = flat.shape[1] if self.spec.granularity is Granularity.per_tensor else self.group_size
        return group_columns(flat, size)

    def _initial_params(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = self.grouped(weight.float())
        low = grouped.amin(dim=-1) * self.clip_ratio
        high = grouped.amax(dim=-1) * self.clip_ratio
        return minmax_params(low, high, self.spec)

    def reset(self, weight: torch.Tensor) -> None:
        """Recompute min-max step sizes from ``weight`` (keeps the parameters' identity)."""
        scale, zero = self._initial_params(weight.detach())
        self.scale.data.copy_(scale)
        self.zero.data.copy_(zero)

    def learn_range(self, mode: RangeLearning, weight: torch.Tensor) -> list[nn.Parameter]:
        """Start learning the range of ``weight`` (``mode``); returns the new parameters."""
        mode = RangeLearning(mode)
        self.range_learning = mode
        if mode is RangeLearning.step:
            self.log_gain = nn.Parameter(torch.zeros_like(self.scale))
            return [self.log_gain]
        if mode is RangeLearning.clip:
            grouped = self.grouped(weight.detach().float())
            self.register_buffer("range_low", grouped.amin(dim=-1) * self.clip_ratio)
            self.register_buffer("range_high", grouped.amax(dim=-1) * self.clip_ratio)
            self.low_factor = nn.Parameter(torch.ones_like(self.scale))
            self.high_factor = nn.Parameter(torch.ones_like(self.scale))
            return [self.low_factor, self.high_factor]
        return []

    def range_parameters(self) -> list[nn.Parameter]:
        if self.range_learning is RangeLearning.step:
            return [self.log_gain]
        if self.range_learning is RangeLearning.clip:
            return [self.low_factor, self.high_factor]
        return []

    @torch.no_grad()
    def project_range(self) -> None:
        """Keep learned clipping factors in ``[MIN_CLIP_FACTOR, 1]`` (after an optimizer step)."""
        if self.range_learning is RangeLearning.clip:
            self.low_factor.clamp_(MIN_CLIP_FACTOR, 1.0)
            self.high_factor.clamp_(MIN_CLIP_FACTOR, 1.0)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step sizes and zero points in use, ``(rows, groups)``."""
        if self.range_learning is RangeLearning.step:
            return self.scale * self.log_gain.exp(), self.zero
        if self.range_learning is RangeLearning.clip:
            low, high = self.range_low * self.low_factor, self.range_high * self.high_factor
            return minmax_params(low, high, self.spec, straight_through=True)
        return self.scale, self.zero

    @torch.no_grad()
    def freeze(self) -> None:
        """Write the learned range into ``scale`` / ``zero``; stop learning it."""
        if self.range_learning is RangeLearning.none:
            return
        scale, zero = self.params()
        self.scale.data.copy_(scale)
        self.zero.data.copy_(zero)
        for name in ("log_gain", "low_factor", "high_factor", "range_low", "range_high"):
            if hasattr(self, name):
                delattr(self, name)
        self.range_learning = RangeLearning.none

    def clip_factor_range(self) -> tuple[float, float] | None:
        """(min, max) over both learned clipping factors, or None when not learning clipping."""
        if self.range_learning is not RangeLearning.clip:
            return None
        both = torch.cat([self.low_factor.detach().flatten(), self.high_factor.detach().flatten()])
        return float(both.min()), float(both.max())

    def expand(self, param: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``(rows, groups)`` parameter to the weight's shape."""
        if self.spec.granularity is Granularity.per_tensor:
            return param.reshape(1, 1)
        per_column = param.repeat_interleave(self.group_size, dim=1)[:, : weight.shape[-1]]
        return per_column

    def ungrouped(self, grouped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`grouped`: drop the padding, restore the weight's shape."""
        rows = grouped.shape[0]
        return grouped.reshape(rows, -1)[:, : weight.numel() // rows].reshape(weight.shape)

    def forward(
        self, weight: torch.Tensor, rounding: nn.Module | None = None, recompute: bool = False
    ) -> torch.Tensor:
        """Fake-quantized weight; ``rounding`` maps ``W/s`` to offsets in [0, 1] added to
        ``floor(W/s)`` (learned rounding) instead of rounding to nearest. ``recompute``: see
        :func:`offset_fake_quant`.

        Works on the grouped view with broadcast step sizes (no per-element copies of the
        parameters, which roughly halves the wrapping overhead of per-group settings)."""
        if not self.spec.enabled:
            return weight
        grouped = self.grouped(weight)
        scale, zero = self.params()
        scale = scale.unsqueeze(-1).to(weight.dtype)
        zero = zero.unsqueeze(-1).to(weight.dtype)
        additive = getattr(rounding, "additive_offset", None)
        if rounding is None or additive is not None:
            offset = None if rounding is None else self.grouped(additive())
            qmax = self.spec.qmax
            quantized = offset_fake_quant(grouped, scale, zero, qmax, offset, recompute=recompute)
            return self.ungrouped(quantized, weight)
        scaled = self.ungrouped(grouped / scale, weight)
        offsets = self.grouped(rounding(scaled))
        return self.ungrouped(fake_quant(grouped, scale, zero, self.spec.qmax, offsets), weight)

    def integers(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``weight`` in ``[0, 2^b - 1]`` (round to nearest)."""
        scale = self.expand(self.scale, weight)
        zero = self.expand(self.zero, weight).round()
        return torch.clamp(torch.round(weight / scale) + zero, 0, self.spec.qmax).to(torch.int32)


class ActQuantizer(nn.Module):
    """Input-activation quantizer: per-tensor or per-token, static or dynamic.

    A static quantizer must observe calibration data first (``observe()`` context, then
    ``finish_observation()``); its step size is then a parameter that methods may learn.
    """

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if spec.enabled and spec.granularity not in (Granularity.per_tensor, Granularity.per_token):
            raise ValueError(f"activation granularity must be per_tensor or per_token, got {spec}")
        if spec.enabled and spec.granularity is Granularity.per_token and not spec.dynamic:
            raise ValueError("per_token activation quantization must be dynamic")
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.zero = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.observing = False
        self.calibrated = False
        self.register_buffer("observed_low", torch.full((), math.inf), persistent=False)
        self.register_buffer("observed_high", torch.full((), -math.inf), persistent=False)

    @property
    def needs_calibration(self) -> bool:
        return self.spec.enabled and not self.spec.dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.enabled:
            return x
        if self.observing:
            self.observed_low = torch.minimum(self.observed_low, x.detach().amin().float())
            self.observed_high = torch.maximum(self.observed_high, x.detach().amax().float())
            return x
        if self.spec.dynamic:
            return self._dynamic(x)
        if not self.calibrated:
            raise RuntimeError("static activation quantizer used before calibration")
        return fake_quant(x, self.scale.to(x.dtype), self.zero.to(x.dtype), self.spec.qmax)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.granularity is Granularity.per_token:
            low, high = x.detach().amin(-1, keepdim=True), x.detach().amax(-1, keepdim=True)
        else:
            low, high = x.detach().amin(), x.detach().amax()
        scale, zero = minmax_params(low.float(), high.float(), self.spec)
        return fake_quant(x, scale.to(x.dtype), zero.to(x.dtype), self.spec.qmax)

    def get_extra_state(self) -> dict[str, bool]:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.calibrated = state["calibrated"]

    def finish_observation(self) -> None:
        """Turn the observed range into the static step size and zero point."""
        if not torch.isfinite(self.observed_low):
            raise RuntimeError("no calibration data reached this activation quantizer")
        scale, zero = minmax_params(self.observed_low, self.observed_high, self.spec)
        self.scale.data.copy_(scale)
        self.zero.data.copy_(zero)
        self.observing = False
        self.calibrated = True


@dataclass
class QuantConfig:
    name: str = "w4a16"
    w_bits: int = 4
    w_symmetric: bool = False
    w_granularity: Granularity = Granularity.per_channel
    w_group_size: int | None = None
    a_bits: int = FULL_PRECISION_BITS
    a_symmetric: bool = False
    a_granularity: Granularity = Granularity.per_tensor
    a_dynamic: bool = False

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.w_bits,
            symmetric=self.w_symmetric,
            granularity=Granularity(self.w_granularity),
            group_size=self.w_group_size,
        )

    def act_spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.a_bits,
            symmetric=self.a_symmetric,
            granularity=Granularity(self.a_granularity),
            dynamic=self.a_dynamic,
        )

    def problems(self) -> list[str]:
        """What is wrong with this setting, each with the field and the allowed values."""
        problems = _bits_problem("quant.w_bits", self.w_bits)
        problems += _bits_problem("quant.a_bits", self.a_bits)
        w_gran, a_gran = Granularity(self.w_granularity), Granularity(self.a_granularity)
        if w_gran not in WEIGHT_GRANULARITIES:
            problems.append(
                f"quant.w_granularity: {w_gran.value} is not allowed; allowed: "
                + ", ".join(g.value for g in WEIGHT_GRANULARITIES)
            )
        if a_gran not in ACT_GRANULARITIES:
            problems.append(
                f"quant.a_granularity: {a_gran.value} is not allowed; allowed: "
                + ", ".join(g.value for g in ACT_GRANULARITIES)
            )
        if w_gran is Granularity.per_group and (self.w_group_size is None or self.w_group_size < 1):
            problems.append(
                f"quant.w_group_size: {self.w_group_size} is not allowed with per_group; "
                "allowed: a positive integer"
            )
        if w_gran is not Granularity.per_group and self.w_group_size is not None:
            problems.append(
                f"quant.w_group_size: {self.w_group_size} needs quant.w_granularity=per_group "
                f"(got {w_gran.value}); allowed: null"
            )
        if (
            a_gran is Granularity.per_token
            and not self.a_dynamic
            and self.a_bits < FULL_PRECISION_BITS
        ):
            problems.append(
                "quant.a_dynamic: false is not allowed with per_token activations; allowed: true"
            )
        return problems


WEIGHT_GRANULARITIES = (Granularity.per_tensor, Granularity.per_channel, Granularity.per_group)
ACT_GRANULARITIES = (Granularity.per_tensor, Granularity.per_token)
ALLOWED_BITS = "2..8, or 16 for full precision"


def _bits_problem(field_name: str, bits: int) -> list[str]:
    if bits == FULL_PRECISION_BITS or 2 <= bits <= 8:
        return []
    return [f"{field_name}: {bits} is not allowed; allowed: {ALLOWED_BITS}"]
