"""Equivalent transforms folded into a decoder block, and what the smoothing baselines
(SmoothQuant, Outlier Suppression+, AWQ) share.

- **Channel scale** ``x_j -> x_j / s_j`` in a scale group's producer, ``W[:, j] *= s_j`` in
  its consumers: :meth:`ModelAdapter.fold_scale` (exact).
- **Channel shift** ``x_j -> x_j - z_j`` (OS+): the producer's bias loses ``z``, each
  consumer's bias gains ``W z`` (:func:`fold_shift`, exact). It needs a producer bias, a
  bias in every consumer, and a path on which a shift reaches the consumers unchanged:
  a norm feeding them directly, or the value projection feeding the attention output
  (attention probabilities sum to one, so shifted values shift the output by the same
  vector). RMSNorm producers (Llama, Gemma3) and bias-free linears cannot take it, nor can
  a linear behind a nonlinearity (OPT's fc1 -> ReLU -> fc2).
- **Calibration statistics** of linears' inputs (per-column min / max / mean |x| over every
  token, plus a seeded token subsample for searches): :func:`capture_inputs`.
- **Search objective**: the output MSE of a group's consumers under fake quantization after
  a candidate transform (:class:`GroupSearch`).
- **Block-sequential driver**: :class:`CalibrationStream` and :func:`rtn_quantize_block`
  (wrap, observe static activation ranges on the transformed block, materialize RTN weights).

Transforms act on the FP block, before its linears are wrapped: the weight quantizers are
built from the transformed weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cbq.blockwise import context_for, embed_batches, run_block
from cbq.models.adapter import BlockContext, ModelAdapter, ScaleGroup, consumer_weight
from cbq.quant import (
    ActQuantizer,
    Granularity,
    QuantSpec,
    WeightQuantizer,
    fake_quant,
    group_columns,
    minmax_params,
    observing_activations,
    wrap_block,
)

# The scale group (adapter naming) whose producer is the attention's value projection.
ATTENTION_VALUE_GROUP = "attn_out"


def _inner(module: nn.Module) -> nn.Module:
    """The module, or the linear inside a QuantLinear."""
    return getattr(module, "linear", module)


def has_linear_producer(group: ScaleGroup) -> bool:
    return isinstance(_inner(group.producer), nn.Linear)


# --- channel shift -------------------------------------------------------------------------
def shift_problem(group: ScaleGroup) -> str | None:
    """Why a channel shift cannot be folded into ``group``; ``None`` when it can."""
    if getattr(_inner(group.producer), "bias", None) is None:
        return "the producer has no bias"
    if has_linear_producer(group) and group.name != ATTENTION_VALUE_GROUP:
        return "a nonlinearity sits between the producer and its consumers"
    if any(_inner(consumer).bias is None for consumer in group.consumers):
        return "a consumer has no bias"
    return None


@torch.no_grad()
def fold_shift(group: ScaleGroup, shift: torch.Tensor) -> None:
    """Fold ``x_j -> x_j - z_j`` into ``group`` (one ``z`` per producer channel), exactly.

    Fold a shift before a scale of the same group: ``W z`` uses the unscaled weights.
    """
    problem = shift_problem(group)
    if problem is not None:
        raise ValueError(f"cannot fold a shift into scale group {group.name!r}: {problem}")
    shift = shift.detach().flatten().float()
    if shift.numel() != group.num_channels or not bool(torch.isfinite(shift).all()):
        raise ValueError(
            f"shift for group {group.name!r} needs {group.num_channels} finite entries, "
            f"got {shift.numel()}"
        )
    bias = _inner(group.producer).bias
    delta = shift.to(bias.device, bias.dtype)
    if group.producer_rows is None:
        bias.sub_(delta)
    else:
        rows = group.producer_rows.to(bias.device)
        bias[rows] = bias[rows] - delta
    columns = group.expand(shift)
    for consumer in group.consumers:
        linear = _inner(consumer)
        moved = linear.weight.float() @ columns.to(linear.weight.device)
        linear.bias.add_(moved.to(linear.bias.dtype))


def channel_center(group: ScaleGroup, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """OS+'s shift ``z_j = (max_j + min_j) / 2`` per producer channel, from per-column ranges."""
    return (group.reduce_columns(high, "amax") + group.reduce_columns(low, "amin")) / 2


# --- channel scales ------------------------------------------------------------------------
def weight_channel_absmax(group: ScaleGroup) -> torch.Tensor:
    """``max |W[:, j]|`` over every consumer's input column, per producer channel (float32)."""
    columns = torch.stack(
        [consumer_weight(c).detach().abs().amax(0).float() for c in group.consumers]
    ).amax(0)
    return group.reduce_columns(columns, "amax")


def migration_scale(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped to ``eps``.

    Dead channels (zero activations or zero weights) get 1: there is nothing to migrate.
    """
    act = act_absmax.float()
    weight = weight_absmax.float().to(act.device)
    scale = (act.pow(alpha) / weight.clamp(min=eps).pow(1 - alpha)).clamp(min=eps)
    dead = (act <= 0) | (weight <= 0)
    return torch.where(dead, torch.ones_like(scale), scale)


def awq_scale(act_absmean: torch.Tensor, alpha: float, eps: float = 1e-4) -> torch.Tensor:
    """AWQ's ``s_j = mean|X_j|^alpha``, normalised so that ``max(s) * min(s) = 1``."""
    scale = act_absmean.float().pow(alpha).clamp(min=eps)
    return scale / (scale.max() * scale.min()).sqrt()


# --- calibration statistics ----------------------------------------------------------------
@dataclass
class InputStats:
    """One linear's inputs over the calibration stream: per-column statistics over every
    token, and the rows of a seeded token subsample (float32, on the block's device)."""

    low: torch.Tensor
    high: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int
    chunks: list[torch.Tensor] = field(default_factory=list)

    @property
    def samples(self) -> torch.Tensor:
        return torch.cat(self.chunks)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class _Recorder:
    """Forward pre-hooks filling :class:`InputStats`; linears that read the very same input
    tensor (q/k/v) share one computation and one copy of the sampled rows."""

    def __init__(self, chosen: torch.Tensor):
        self.chosen = chosen  # (n, t) bool: the sampled tokens
        self.offset = 0  # first sequence of the mini-batch being run
        self.stats: dict[str, InputStats] = {}
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._add(name, args[0])

        return record

    def _add(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            self._last = (x, self._summarise(x))
        rows, low, high, abs_sum = self._last[1]
        tokens = x.numel() // x.shape[-1]
        previous = self.stats.get(name)
        if previous is None:
            self.stats[name] = InputStats(low, high, abs_sum, tokens, [rows])
            return
        previous.low = torch.minimum(previous.low, low)
        previous.high = torch.maximum(previous.high, high)
        previous.abs_sum = previous.abs_sum + abs_sum
        previous.tokens += tokens
        previous.chunks.append(rows)

    def _summarise(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        batch = x.shape[0] if x.dim() == 3 else flat.shape[0] // self.chosen.shape[1]
        mask = self.chosen[self.offset : self.offset + batch].reshape(-1).to(flat.device)
        return flat[mask], flat.amin(0), flat.amax(0), flat.abs().sum(0)

    def release(self) -> None:
        self._last = None


def sample_tokens(n: int, t: int, max_tokens: int, seed: int) -> torch.Tensor:
    """A seeded choice of at most ``max_tokens`` of ``n * t`` tokens, as an (n, t) mask."""
    chosen = torch.zeros(n * t, dtype=torch.bool)
    if max_tokens >= n * t:
        chosen[:] = True
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen[torch.randperm(n * t, generator=generator)[:max_tokens]] = True
    return chosen.view(n, t)


@torch.no_grad()
def capture_inputs(
    adapter: ModelAdapter,
    block_index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    names: Iterable[str],
    batch_size: int,
    max_tokens: int,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Statistics of the inputs of the named linears of block ``block_index`` on ``hidden``
    (n, t, h), with the same ``max_tokens`` sampled token positions for every linear."""
    block = adapter.blocks()[block_index]
    recorder = _Recorder(sample_tokens(hidden.shape[0], hidden.shape[1], max_tokens, seed))
    handles = [
        block.get_submodule(name).register_forward_pre_hook(recorder.hook(name))
        for name in dict.fromkeys(names)
    ]
    try:
        device = next(block.parameters()).device
        for start in range(0, hidden.shape[0], batch_size):
            recorder.offset = start
            recorder.release()
            chunk = hidden[start : start + batch_size].to(device)
            adapter.forward_block(block_index, chunk, ctx)
    finally:
        recorder.release()
        for handle in handles:
            handle.remove()
    return recorder.stats


def group_inputs(group: ScaleGroup, stats: dict[str, InputStats]) -> InputStats:
    """The statistics of a group's (shared) consumer input."""
    return stats[first_consumer(group)]


def first_consumer(group: ScaleGroup) -> str:
    if not group.consumer_names:
        raise ValueError(f"scale group {group.name!r} does not name its consumers")
    return group.consumer_names[0]


# --- fake quantization for searches --------------------------------------------------------
def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest min-max fake quantization, exactly as a fresh ``QuantLinear`` does."""
    if not spec.enabled:
        return weight
    return WeightQuantizer(spec, weight)(weight)


def quantize_activation(
    x: torch.Tensor, spec: QuantSpec, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Fake-quantized inputs: a static quantizer with the calibrated range ``[low, high]``,
    or a dynamic one (per tensor over ``x``, or per token)."""
    if not spec.enabled:
        return x
    if spec.dynamic:
        return ActQuantizer(spec).to(x.device)(x)
    scale, zero = minmax_params(low.float(), high.float(), spec)
    return fake_quant(x, scale.to(x.dtype), zero.to(x.dtype), spec.qmax)


class GroupSearch:
    """Output MSE of a scale group's consumers for candidate transforms, on sampled inputs.

    ``error(scale)`` compares the FP outputs ``x W^T`` with ``Q_a((x - z) / s) Q_w(W s)^T``
    (biases cancel; the folded shift ``W z`` is exact). The static activation range is the
    transformed per-column range over *every* calibration token, i.e. what a static
    quantizer observing the transformed block would find.
    """

    def __init__(
        self,
        group: ScaleGroup,
        inputs: InputStats,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        shift: torch.Tensor | None = None,
    ):
        self.group = group
        self.weight_spec, self.act_spec = weight_spec, act_spec
        x = inputs.samples.float()
        columns = torch.zeros(x.shape[1], device=x.device)
        if shift is not None:
            columns = group.expand(shift.float().to(x.device))
        self.x = x - columns
        self.low, self.high = inputs.low - columns, inputs.high - columns
        self.weights = [consumer_weight(c).detach().float().to(x.device) for c in group.consumers]
        self.references = [self.x @ w.T for w in self.weights]

    def column_absmax(self) -> torch.Tensor:
        """max |x - z| per input column, over every calibration token."""
        return torch.maximum(-self.low, self.high)

    def error(self, scale: torch.Tensor) -> float:
        columns = self.group.expand(scale.float().to(self.x.device))
        x = quantize_activation(
            self.x / columns, self.act_spec, (self.low / columns).min(), (self.high / columns).max()
        )
        total, count = 0.0, 0
        for weight, reference in zip(self.weights, self.references, strict=True):
            out = x @ quantize_weight(weight * columns, self.weight_spec).T
            total += float((out - reference).pow(2).sum())
            count += out.numel()
        return total / max(count, 1)


@dataclass
class Migration:
    """The transform :func:`search_migration` chose for one scale group."""

    shift: torch.Tensor | None
    alpha: float | None  # None: s = 1 (no scaling)
    scale: torch.Tensor
    error: float
    # Search MSE with no transform at all; 0 when every candidate was shifted.
    identity_error: float

    def fold(self, adapter: ModelAdapter, group: ScaleGroup) -> None:
        if self.shift is not None:
            fold_shift(group, self.shift)
        if self.alpha is not None:
            adapter.fold_scale(group, self.scale)

    def error_vs_identity(self) -> float | None:
        return self.error / self.identity_error if self.identity_error > 0 else None


def search_migration(
    group: ScaleGroup,
    inputs: InputStats,
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    alphas: Sequence[float],
    shifts: Sequence[torch.Tensor | None] = (None,),
    try_identity: bool = True,
) -> Migration:
    """The (shift, migration strength) of the smallest :class:`GroupSearch` error: every
    shift candidate with every ``alpha`` (``s = max|X - z|^a / max|W|^(1-a)``), and with
    ``s = 1`` when ``try_identity``. Nothing is folded (:meth:`Migration.fold` does)."""
    errors: dict[tuple[int, float | None], float] = {}
    scales: dict[tuple[int, float | None], torch.Tensor] = {}
    identity = 0.0
    ones = torch.ones(group.num_channels)
    for position, shift in enumerate(shifts):
        search = GroupSearch(group, inputs, weight_spec, act_spec, shift)
        act_absmax = group.reduce_columns(search.column_absmax(), "amax")
        weight_absmax = weight_channel_absmax(group)
        candidates: dict[float | None, torch.Tensor] = {
            alpha: migration_scale(act_absmax, weight_absmax, alpha) for alpha in alphas
        }
        if try_identity:
            candidates[None] = ones
        for alpha, scale in candidates.items():
            errors[position, alpha] = search.error(scale)
            scales[position, alpha] = scale
        if shift is None:
            identity = errors.get((position, None)) or search.error(ones)
    position, alpha = best_of(errors)
    best = (position, alpha)
    return Migration(shifts[position], alpha, scales[best], errors[best], identity)


def geometric_mean(values: list[float]) -> float | None:
    """Geometric mean (of error ratios); ``None`` for no values."""
    if not values:
        return None
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


def best_of(errors: dict[Any, float]) -> Any:
    """The candidate with the smallest error (the first one on ties)."""
    return min(errors, key=lambda alpha: errors[alpha])


# --- AWQ's weight clipping -----------------------------------------------------------------
def group_size(spec: QuantSpec, columns: int) -> int:
    """Input columns sharing one step size per row (per-channel: the whole row)."""
    if spec.granularity is Granularity.per_group:
        assert spec.group_size is not None
        return spec.group_size
    return columns


@torch.no_grad()
def clip_search(
    weight: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    grid: int = 20,
    max_shrink: float = 0.5,
    row_chunk: int = 64,
) -> torch.Tensor:
    """AWQ's clipping: per output row and weight group, the ratio ``r`` in ``1, 1 - 1/grid,
    ...`` (above ``1 - max_shrink``) whose clamp ``|W| <= r max|W|`` followed by RTN
    minimises the MSE of the group's partial outputs on inputs ``x`` (tokens, in).

    Returns the chosen ratio per (row, group); :func:`apply_clip` applies it.
    """
    columns = weight.shape[1]
    size = group_size(spec, columns)
    inputs = group_columns(x.float().to(weight.device), size)  # (n, groups, size)
    ratios = [1.0 - i / grid for i in range(max(1, int(max_shrink * grid)))]
    chosen = []
    for rows in weight.detach().float().split(row_chunk):
        original = group_columns(rows, size)  # (r, groups, size)
        reference = torch.einsum("ngk,rgk->rgn", inputs, original)
        limit = original.abs().amax(-1, keepdim=True)
        best_error = torch.full(original.shape[:2], float("inf"), device=rows.device)
        best_ratio = torch.ones_like(best_error)
        for ratio in ratios:
            clamped = torch.maximum(torch.minimum(original, limit * ratio), -limit * ratio)
            flat = clamped.reshape(rows.shape[0], -1)[:, :columns]
            quantized = group_columns(quantize_weight(flat, spec), size)
            out = torch.einsum("ngk,rgk->rgn", inputs, quantized)
            error = (out - reference).pow(2).mean(-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        chosen.append(best_ratio)
    return torch.cat(chosen)


@torch.no_grad()
def apply_clip(weight: torch.Tensor, ratios: torch.Tensor, spec: QuantSpec) -> None:
    """Clamp ``weight`` in place to ``ratio * max|W|`` per (row, group)."""
    columns = weight.shape[1]
    original = group_columns(weight.float(), group_size(spec, columns))
    limit = original.abs().amax(-1, keepdim=True) * ratios.unsqueeze(-1).to(original)
    clamped = torch.maximum(torch.minimum(original, limit), -limit)
    weight.copy_(clamped.reshape(weight.shape[0], -1)[:, :columns].to(weight.dtype))


def clippable(spec: QuantSpec) -> bool:
    """Clipping is searched per row and group: per-tensor weight grids are left alone."""
    return spec.enabled and spec.granularity is not Granularity.per_tensor


# --- the block-sequential driver -----------------------------------------------------------
@dataclass
class CalibrationStream:
    """The calibration batch's hidden states entering the next block, run in mini-batches."""

    adapter: ModelAdapter
    hidden: torch.Tensor
    ctx: BlockContext
    batch_size: int

    @classmethod
    def embed(
        cls, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int, device: torch.device
    ) -> CalibrationStream:
        hidden = embed_batches(adapter, calib, batch_size, device)
        return cls(adapter, hidden, context_for(adapter, hidden, batch_size), batch_size)

    def forward(self, index: int) -> torch.Tensor:
        """Block ``index`` applied to the stream (the stream itself does not move)."""
        return run_block(self.adapter, index, self.hidden, self.ctx, self.batch_size)

    def advance(self, index: int) -> None:
        """The stream now enters block ``index + 1``."""
        self.hidden = self.forward(index)


@torch.no_grad()
def rtn_quantize_block(
    stream: CalibrationStream, index: int, weight_spec: QuantSpec, act_spec: QuantSpec
) -> int:
    """Wrap block ``index``'s linears, calibrate static activation ranges on the stream (the
    block as it is now, i.e. after any folded transform) and materialize RTN weights.
    Returns the number of linears quantized."""
    block = stream.adapter.blocks()[index]
    wrapped = wrap_block(block, stream.adapter.linear_names(), weight_spec, act_spec)
    if act_spec.enabled and not act_spec.dynamic:
        with observing_activations(block):
            stream.forward(index)
    for qlinear in wrapped.values():
        qlinear.materialize()
    return len(wrapped)
