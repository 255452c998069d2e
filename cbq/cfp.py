"""Coarse-to-fine pre-processing (CBQ §3.3) applied to one decoder block through its adapter.

- Activations: on the per-channel max |x| entering each scale group's consumers, the
  outlier channels j get ``s_j = max|X_j| / c`` (Eq. 5) and 1 elsewhere, folded exactly
  into the producer and the consumers (:meth:`ModelAdapter.fold_scale`): the FP function
  is unchanged. ``act_rule="migrate"`` (not in the paper) scales every channel instead, by a
  searched SmoothQuant migration (:func:`migrate_activations`).
- Weights: in every linear of the block, the entries whose |W| is a fine outlier are
  clamped to c, keeping their sign. This does change the function.

The level c is the split threshold t, the smallest fine outlier (``clip_to="threshold"``,
as in DESIGN), or the largest reserved value below it (``clip_to="reserved"``). With
"threshold" a lone outlier is left as it is (it *is* t): the fine split often finds
exactly one, and then nothing changes. "reserved" always pulls the outliers down to the
largest remaining value.

Activation scaling runs first. It moves each outlier channel's magnitude into the
consumers' input columns, which then look like weight outliers; truncating them would
undo the exact transform on exactly the channels that matter, so by default
(``protect_scaled=True``) those columns are left out of weight detection and truncation.
:func:`scale_activation_outliers` records them on the consumer linears
(:data:`SCALED_COLUMNS_ATTR`), so the two steps may run separately (e.g. with an FP copy
of the block taken in between) and :func:`truncate_block_weights` still finds them.

Run this on the FP block, before its linears are wrapped for quantization: weight
quantizers initialised earlier would not see the new weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import torch
from torch import nn

from cbq.models.adapter import BlockContext, ModelAdapter, ScaleGroup
from cbq.outliers import OutlierResult, SplitDistance, detect_outliers, detect_row_outliers
from cbq.quant import QuantSpec
from cbq.transforms import capture_inputs, first_consumer, group_inputs, search_migration


class CFPMode(StrEnum):
    none = "none"
    weight = "weight"
    weight_act = "weight_act"


class ActRule(StrEnum):
    outliers = "outliers"
    migrate = "migrate"


class WeightScope(StrEnum):
    tensor = "tensor"
    group = "group"


class ClipTo(StrEnum):
    threshold = "threshold"
    reserved = "reserved"


@dataclass
class CFPConfig:
    mode: CFPMode = CFPMode.weight_act
    lambda1: float = 1.5
    lambda2: float = 1.0
    # The fine split's inter-set distance: the paper's distance of means, or the gap
    # between the two sets (see cbq.outliers); log_space splits log|x| instead of |x|.
    distance: SplitDistance = SplitDistance.mean
    log_space: bool = False
    # Clamp / scale outliers down to the split threshold (the paper's: the smallest outlier,
    # so a lone outlier, the usual find, is left as it is) or to the largest reserved
    # (non-outlier) value, which always truncates.
    clip_to: ClipTo = ClipTo.threshold
    # Where weight outliers are detected: over the whole tensor (the paper's; 2 weights of
    # SmolLM2 in all) or in each quantization group of each row (group: 1.08% of SmolLM2's
    # weights at g128 with clip_to=reserved). Truncation that acts costs perplexity at
    # weight-only settings (docs/cbq_components.md), so the paper's rule is the default.
    weight_scope: WeightScope = WeightScope.tensor
    # How mode=weight_act treats activations: "outliers" scales the outlier channels found
    # by the split (Eq. 5, the paper); "migrate" scales every channel by SmoothQuant's
    # s = max|X|^a / max|W|^(1-a), with a searched per scale group in ``alphas`` (and s = 1)
    # against the consumers' fake-quantized output MSE, as OS+ does (cbq.cfp).
    act_rule: ActRule = ActRule.outliers
    alphas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # Calibration tokens (sampled, seeded by the run's seed) the alpha search runs on.
    search_tokens: int = 4096

    def problems(self) -> list[str]:
        problems = [
            f"cfp.{name}: {getattr(self, name)} must be >= 0"
            for name in ("lambda1", "lambda2")
            if getattr(self, name) < 0
        ]
        if not self.alphas or not all(0 <= a <= 1 for a in self.alphas):
            problems.append(
                f"cfp.alphas: {list(self.alphas)} is not allowed; allowed: a non-empty list "
                "of values in [0, 1]"
            )
        if self.weight_scope is WeightScope.group and self.log_space:
            problems.append(
                "cfp.log_space: true is not allowed with cfp.weight_scope=group; allowed: "
                "false, or cfp.weight_scope=tensor"
            )
        if self.search_tokens < 1:
            problems.append(f"cfp.search_tokens: {self.search_tokens} must be >= 1")
        return problems


# Attribute set on a linear whose input columns were scaled up: a bool tensor per column.
SCALED_COLUMNS_ATTR = "cbq_cfp_scaled_columns"


@dataclass(frozen=True)
class Truncation:
    """What :func:`truncate_weight_outliers` did to one weight."""

    threshold: float  # smallest fine outlier of |W|; inf when nothing was an outlier
    clip: float  # the |W| clamp level (threshold or reserved max); inf when none
    coarse_count: int
    outlier_count: int  # entries in O_high, including those equal to the threshold
    truncated: int  # entries actually changed (|W| > clip)
    max_before: float
    max_after: float


@torch.no_grad()
def truncate_weight_outliers(
    weight: torch.Tensor,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
    clip_to: ClipTo = ClipTo.threshold,
    protected_columns: torch.Tensor | None = None,
    group_size: int | None = None,
) -> Truncation:
    """Clamp the fine outliers of ``|weight|`` to the clip level, in place, keeping signs.

    ``weight`` is the FP weight of a linear (``linear.weight`` or ``qlinear.linear.weight``).
    ``protected_columns`` (bool, one per input column) are left out of both detection and
    truncation. With ``group_size`` the detection runs in every group of ``group_size``
    input columns of every row (the weight quantizer's groups; the row's width for
    per-channel grids) instead of over the whole tensor: see :func:`_truncate_groups`.
    """
    if group_size is not None:
        if log_space:
            raise ValueError("log_space is not supported with a per-group truncation scope")
        return _truncate_groups(
            weight, group_size, lambda1, lambda2, distance, clip_to, protected_columns
        )
    max_before = float(weight.abs().max()) if weight.numel() else 0.0
    if protected_columns is None or not bool(protected_columns.any()):
        view = weight
    else:
        keep = ~protected_columns.to(weight.device)
        view = weight[:, keep]  # a copy: written back below
    result = detect_outliers(view, lambda1, lambda2, distance=distance, log_space=log_space)
    clip = clip_level(result, clip_to)
    truncated = int(torch.count_nonzero(view.abs() > clip))
    if truncated:
        view.clamp_(-clip, clip)
        if view is not weight:
            weight[:, keep] = view
    return Truncation(
        threshold=result.threshold,
        clip=clip,
        coarse_count=result.coarse_count,
        outlier_count=result.fine_count,
        truncated=truncated,
        max_before=max_before,
        max_after=float(weight.abs().max()) if weight.numel() else 0.0,
    )


def _truncate_groups(
    weight: torch.Tensor,
    group_size: int,
    lambda1: float,
    lambda2: float,
    distance: SplitDistance,
    clip_to: ClipTo,
    protected_columns: torch.Tensor | None,
) -> Truncation:
    """Per-group truncation: each quantization group's fine outliers, which set that group's
    step size, are clamped to the group's clip level. A partial last group is its own,
    narrower group; protected columns count as zeros in their group's statistics and are
    never changed. ``threshold`` / ``clip`` report the smallest level over the groups."""
    _check_clip_to(clip_to)
    rows, cols = weight.shape
    keep = torch.ones(cols, dtype=torch.bool, device=weight.device)
    if protected_columns is not None:
        keep = ~protected_columns.to(weight.device)
    magnitude = weight.detach().abs().float() * keep
    full = cols - cols % group_size
    parts = [(0, full, group_size), (full, cols, cols - full)]
    levels, results = [], []
    for start, end, size in parts:
        if end == start:
            continue
        groups = magnitude[:, start:end].reshape(-1, size)
        result = detect_row_outliers(groups, lambda1, lambda2, distance=distance)
        level = result.threshold if clip_to == "threshold" else result.reserved_max
        levels.append(level.to(weight.dtype).reshape(rows, -1).repeat_interleave(size, dim=1))
        results.append(result)
    per_column = torch.cat(levels, dim=1)
    changed = (weight.abs() > per_column) & keep
    max_before = float(weight.abs().max()) if weight.numel() else 0.0
    weight.copy_(torch.where(changed, weight.sign() * per_column, weight))
    thresholds = torch.cat([r.threshold for r in results])
    return Truncation(
        threshold=_smallest_finite(thresholds),
        clip=_smallest_finite(per_column),
        coarse_count=sum(int(r.coarse_count.sum()) for r in results),
        outlier_count=sum(int(r.fine_count.sum()) for r in results),
        truncated=int(changed.sum()),
        max_before=max_before,
        max_after=float(weight.abs().max()) if weight.numel() else 0.0,
    )


def _smallest_finite(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.min()) if finite.numel() else math.inf


def activation_channel_scales(
    channel_absmax: torch.Tensor,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
    clip_to: ClipTo = ClipTo.threshold,
) -> torch.Tensor:
    """Per-channel scales: ``max|X_j| / c`` on outlier channels (so >= 1), 1 elsewhere.

    Strictly positive and finite (float32): the clip level c is a value above the coarse
    fence, hence > 0.
    """
    return _channel_scales(channel_absmax, lambda1, lambda2, distance, log_space, clip_to)[0]


def _channel_scales(
    channel_absmax: torch.Tensor,
    lambda1: float,
    lambda2: float,
    distance: SplitDistance,
    log_space: bool,
    clip_to: ClipTo,
) -> tuple[torch.Tensor, OutlierResult]:
    absmax = channel_absmax.detach().float().abs()
    result = detect_outliers(absmax, lambda1, lambda2, distance=distance, log_space=log_space)
    clip = clip_level(result, clip_to)
    scale = torch.ones_like(absmax)
    if result.fine_count:
        scale = torch.where(result.mask, absmax / clip, scale)
    return scale, result


def _check_clip_to(clip_to: ClipTo | str) -> None:
    if clip_to not in tuple(ClipTo):
        raise ValueError(f"clip_to must be one of {[c.value for c in ClipTo]}, got {clip_to!r}")


def clip_level(result: OutlierResult, clip_to: ClipTo) -> float:
    """The magnitude outliers are brought down to (``inf`` when there is no outlier)."""
    _check_clip_to(clip_to)
    return result.threshold if clip_to == "threshold" else result.reserved_max


@torch.no_grad()
def collect_channel_absmax(
    adapter: ModelAdapter,
    block_index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Max |x| per producer channel of every scale group of a block, over ``hidden`` (n, t, h).

    Forward pre-hooks on the consumers record the max over tokens of each input column
    (inputs may be 2-D or 3-D); :meth:`ScaleGroup.reduce_columns` maps columns to channels.
    The block runs in mini-batches of ``batch_size`` sequences (all at once by default).
    Results are float32 on the CPU.
    """
    block = adapter.blocks()[block_index]
    groups = adapter.scale_groups(block)
    columns: dict[str, torch.Tensor] = {}
    handles = [
        consumer.register_forward_pre_hook(_absmax_hook(columns, group.name))
        for group in groups
        for consumer in group.consumers
    ]
    try:
        device = next(block.parameters()).device
        for chunk in hidden.split(batch_size or hidden.shape[0]):
            adapter.forward_block(block_index, chunk.to(device), ctx)
    finally:
        for handle in handles:
            handle.remove()
    return {
        group.name: group.reduce_columns(columns[group.name], "amax").cpu()
        for group in groups
        if group.name in columns
    }


def _absmax_hook(
    store: dict[str, torch.Tensor], name: str
) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        absmax = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
        previous = store.get(name)
        store[name] = absmax if previous is None else torch.maximum(previous, absmax)

    return hook


@torch.no_grad()
def scale_activation_outliers(
    adapter: ModelAdapter,
    block_index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
    clip_to: ClipTo = ClipTo.threshold,
    batch_size: int | None = None,
) -> dict[str, int]:
    """Fold Eq. 5 scales for the outlier channels of every scale group of a block, in place.

    Exact: the block computes the same function. Returns the number of outlier channels
    per group. The scaled input columns of each consumer are recorded on its linear (see
    :data:`SCALED_COLUMNS_ATTR`) for :func:`truncate_block_weights`.
    """
    block = adapter.blocks()[block_index]
    absmax = collect_channel_absmax(adapter, block_index, hidden, ctx, batch_size)
    found: dict[str, int] = {}
    for group in adapter.scale_groups(block):
        if group.name not in absmax:
            continue
        channels = absmax[group.name]
        scale, result = _channel_scales(channels, lambda1, lambda2, distance, log_space, clip_to)
        found[group.name] = result.fine_count
        # A channel at the clip level gets s = 1: it needs neither folding nor protection.
        scaled = scale > 1.0
        if bool(scaled.any()):
            adapter.fold_scale(group, scale)
            _record_scaled_columns(group, scaled)
    return found


@torch.no_grad()
def migrate_activations(
    adapter: ModelAdapter,
    block_index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    alphas: Sequence[float],
    *,
    search_tokens: int = 4096,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, float | None]:
    """``cfp.act_rule=migrate``: fold a searched SmoothQuant migration into every scale group
    of a block, in place (exact). Returns the chosen alpha per group (None: left unscaled).

    The outlier rule scales only the channels the split finds, often one per group; at
    4-bit activations the many moderately large channels are what the quantizer loses
    (docs/results_cpu.md, the Gemma-3 W4A4 diagnosis). Here every channel moves part of its
    range into the weights, with the strength that minimises the group's fake-quantized output
    MSE (:func:`cbq.transforms.search_migration`; OS+'s search without the shift). The
    columns scaled up are recorded for :func:`truncate_block_weights`, as for outliers.
    """
    block = adapter.blocks()[block_index]
    groups = adapter.scale_groups(block)
    inputs = capture_inputs(
        adapter,
        block_index,
        hidden,
        ctx,
        [first_consumer(g) for g in groups],
        batch_size or hidden.shape[0],
        search_tokens,
        seed,
    )
    chosen: dict[str, float | None] = {}
    for group in groups:
        choice = search_migration(group, group_inputs(group, inputs), weight_spec, act_spec, alphas)
        choice.fold(adapter, group)
        if choice.alpha is not None:
            _record_scaled_columns(group, choice.scale > 1.0)
        chosen[group.name] = choice.alpha
    return chosen


@torch.no_grad()
def truncate_block_weights(
    adapter: ModelAdapter,
    block: nn.Module,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
    clip_to: ClipTo = ClipTo.threshold,
    protect_scaled: bool = True,
    group_size: int | None = None,
) -> dict[str, int]:
    """Truncate the weight outliers of every linear of ``block``; entries changed per linear.

    With ``protect_scaled`` the input columns scaled by :func:`scale_activation_outliers`
    are left alone (see the module docstring). ``group_size`` as in
    :func:`truncate_weight_outliers` (0: each row whole).
    """
    truncated: dict[str, int] = {}
    for name, linear in adapter.linears(block).items():
        inner = getattr(linear, "linear", linear)
        columns = getattr(inner, SCALED_COLUMNS_ATTR, None) if protect_scaled else None
        result = truncate_weight_outliers(
            inner.weight,
            lambda1,
            lambda2,
            distance=distance,
            log_space=log_space,
            clip_to=clip_to,
            protected_columns=columns,
            group_size=None if group_size is None else group_size or inner.weight.shape[1],
        )
        truncated[name] = result.truncated
    return truncated


def apply_cfp_to_block(
    adapter: ModelAdapter,
    block_index: int,
    hidden: torch.Tensor,
    ctx: BlockContext,
    mode: str = "weight_act",
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    *,
    distance: SplitDistance = SplitDistance.mean,
    log_space: bool = False,
    clip_to: ClipTo = ClipTo.threshold,
    protect_scaled: bool = True,
    batch_size: int | None = None,
) -> dict[str, dict[str, int]]:
    """Coarse-to-fine pre-processing of block ``block_index``, in place.

    ``mode``: ``"none"`` (nothing, no forward pass), ``"weight"`` (truncate weight
    outliers) or ``"weight_act"`` (alias ``"weight+act"``: scale activation outlier
    channels, then truncate). ``hidden`` are the block's FP calibration inputs (used by
    ``"weight_act"`` only). Returns ``{"outlier_channels": {group: n},
    "truncated_weights": {linear: n}}`` (empty dicts for the steps not run).
    """
    mode = cfp_mode(mode)
    stats: dict[str, dict[str, int]] = {"outlier_channels": {}, "truncated_weights": {}}
    if mode == "none":
        return stats
    rule = {"distance": distance, "log_space": log_space, "clip_to": clip_to}
    if mode == "weight_act":
        stats["outlier_channels"] = scale_activation_outliers(
            adapter, block_index, hidden, ctx, lambda1, lambda2, batch_size=batch_size, **rule
        )
    block = adapter.blocks()[block_index]
    stats["truncated_weights"] = truncate_block_weights(
        adapter, block, lambda1, lambda2, protect_scaled=protect_scaled, **rule
    )
    return stats


def cfp_mode(mode: str | Enum) -> str:
    """``"none"``, ``"weight"`` or ``"weight_act"`` from a string or a str-Enum member."""
    name = str(getattr(mode, "value", mode)).replace("+", "_")
    if name not in tuple(CFPMode):
        modes = [m.value for m in CFPMode]
        raise ValueError(f"CFP mode must be one of {modes} (or 'weight+act'), got {mode!r}")
    return name


def _record_scaled_columns(group: ScaleGroup, scaled: torch.Tensor) -> None:
    columns = group.expand(scaled).cpu()
    for consumer in group.consumers:
        inner = getattr(consumer, "linear", consumer)
        previous = getattr(inner, SCALED_COLUMNS_ATTR, None)
        setattr(inner, SCALED_COLUMNS_ATTR, columns if previous is None else previous | columns)
