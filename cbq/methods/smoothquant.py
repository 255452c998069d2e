"""``method=smoothquant`` (Xiao et al., 2023) and ``method=osplus`` (Outlier Suppression+,
Wei et al., 2023): equivalent transforms that make activations easier to quantize, folded
into the model, followed by round-to-nearest weights and static activation ranges.

SmoothQuant, per scale group: ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` with a fixed
``alpha`` (X: the consumers' inputs on the calibration stream, W: every consumer's input
column j, both brought to producer channels), folded by ``adapter.fold_scale``. Every
scale group is smoothed by default; ``linear_producers=false`` keeps to the norm -> linear
groups, the reference implementation's set.

OS+, per scale group:

1. **shift** ``z_j = (max_j + min_j) / 2`` of the consumers' input, folded into the
   producer's bias and the consumers' biases (``b' = b + W z``) where that is exact
   (:func:`cbq.transforms.shift_problem`): LayerNorm producers (OPT, BLOOM) and the
   value -> attention-output group when both linears have biases. RMSNorm producers
   (Llama, Gemma3) have no bias to absorb ``-z``, so they are only scaled;
2. **scale** ``s_j = max|X_j - z_j|^alpha / max|W_:,j|^(1 - alpha)``, with ``alpha`` searched
   in ``alphas`` (and ``s = 1``) per group to minimise the MSE of the group's consumers'
   outputs under fake quantization of weights (RTN) and activations (the static range the
   transformed block will calibrate to) on a token subsample. The paper searches a
   clipping level ``t`` with ``s_j = max(1, range_j / t)``; this harness searches
   SmoothQuant's migration strength instead, which makes SmoothQuant the special case
   "no shift, fixed alpha".

With ``search_shift`` (default) every candidate is also tried without the shift. Measured
on a tiny OPT at W4A8: the value -> out_proj shift alone made the group's search MSE 2.8x
worse than no transform and the model's logit MSE 3x RTN's. The consumer's error is
``dW (x - z)``: the shift removes the activations' asymmetry, which helps the activation
grid, but a midrange ``z`` far from the mean adds a constant to most tokens, which the
weight error ``dW`` multiplies. The paper always shifts (``search_shift=false``).

Both are block-sequential: each block is transformed on the stream coming out of the
already quantized blocks, its activation ranges are observed after the fold, its weights
are materialized, and the stream moves through the quantized block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cbq.cfp import collect_channel_absmax
from cbq.methods.base import Activations, MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import BlockContext, ModelAdapter, ScaleGroup
from cbq.pipeline import Streams
from cbq.transforms import (
    CalibrationStream,
    InputStats,
    capture_inputs,
    channel_center,
    first_consumer,
    geometric_mean,
    group_inputs,
    has_linear_producer,
    migration_scale,
    rtn_quantize_block,
    search_migration,
    shift_problem,
    weight_channel_absmax,
)

log = logging.getLogger(__name__)


@dataclass
class SmoothQuantConfig(MethodConfig):
    name: str = "smoothquant"
    # Migration strength: 0 leaves activations alone, 1 moves all their range to weights.
    alpha: float = 0.5
    # Also smooth the groups whose producer is a linear (v -> o, up -> down, fc1 -> fc2);
    # the reference smooths only norm -> linear groups (false).
    linear_producers: bool = True
    # Calibration sequences per block forward.
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"method.alpha: {self.alpha} is not allowed; allowed: [0, 1]")
        _check_batch_size(self.batch_size)


@dataclass
class OSPlusConfig(MethodConfig):
    name: str = "osplus"
    # Migration strengths tried per scale group.
    alphas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # Fold the channel shift where it is exact (false: scaling only).
    shift: bool = True
    # Also try every candidate without the shift and keep the better one (false: always
    # shift where exact, as the paper). With coarse weights the shift can hurt: the weight
    # error then multiplies x - z instead of x (see the module docstring).
    search_shift: bool = True
    # Also try s = 1 (the shift alone), as OS+'s own search does when its clipping level
    # lies above every channel's range; chosen when no alpha beats it (alpha recorded None).
    try_identity: bool = True
    # Also transform the groups whose producer is a linear (v -> o, up -> down, fc1 -> fc2).
    linear_producers: bool = True
    # Calibration tokens (sampled, seeded by the run's seed) the alpha search runs on.
    search_tokens: int = 4096
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not self.alphas or not all(0 <= a <= 1 for a in self.alphas):
            raise ValueError(
                f"method.alphas: {list(self.alphas)} is not allowed; allowed: a non-empty "
                "list of values in [0, 1]"
            )
        if self.search_tokens < 1:
            raise ValueError(f"method.search_tokens: {self.search_tokens} must be >= 1")
        _check_batch_size(self.batch_size)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"method.batch_size: {batch_size} must be >= 1")


def selected_groups(adapter: ModelAdapter, index: int, linear_producers: bool) -> list[ScaleGroup]:
    groups = adapter.scale_groups(adapter.blocks()[index])
    return [g for g in groups if linear_producers or not has_linear_producer(g)]


class _Smoothing(QuantMethod):
    """The block-sequential driver; subclasses fold their transform into each FP block."""

    needs_calibration = True
    activations = Activations.quantized
    cfg: SmoothQuantConfig | OSPlusConfig

    def transform_block(
        self, adapter: ModelAdapter, index: int, stream: CalibrationStream
    ) -> dict[str, Any]:
        """Fold the transform into block ``index`` (FP, not yet wrapped); stats per group."""
        raise NotImplementedError

    def block_postfix(self, block_stats: dict[str, Any]) -> dict[str, float]:
        """What the progress bar and the logger show after a block."""
        return {}

    @torch.no_grad()
    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, f"{self.name} needs calibration data"
        weight_spec, act_spec = self.quant.weight_spec(), self.quant.act_spec()
        if not act_spec.enabled:
            log.warning(
                "%s targets weight+activation quantization, but quant=%s leaves activations "
                "in full precision: the smoothing is folded anyway (harmless), then RTN weights",
                self.name,
                self.quant.name,
            )
        started = time.perf_counter()

        def work(index: int, streams: Streams, block_ctx: BlockContext) -> dict[str, Any]:
            stream = CalibrationStream(adapter, streams.quantized, block_ctx, self.cfg.batch_size)
            block_stats = self.transform_block(adapter, index, stream)
            quantized = rtn_quantize_block(stream, index, weight_spec, act_spec)
            postfix = self.block_postfix(block_stats)
            if postfix:
                ctx.log(
                    {
                        f"{self.name}/block": index,
                        **{f"{self.name}/{k}": v for k, v in postfix.items()},
                    }
                )
            groups = {f"{index}.{group}": value for group, value in block_stats.items()}
            return {"groups": groups, "quantized": quantized}

        pipeline = self.block_pipeline(adapter, calib, ctx, self.cfg.batch_size)
        blocks = pipeline.run(calib, work)
        per_group = {name: value for b in blocks for name, value in b["groups"].items()}
        return {
            "n_quantized_linears": sum(b["quantized"] for b in blocks),
            "time_s": round(time.perf_counter() - started, 3),
            **self.summary(per_group),
            "groups": per_group,
        } | pipeline.resume_stats()

    def summary(self, per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {}


class SmoothQuant(_Smoothing):
    name = "smoothquant"
    config_class = SmoothQuantConfig
    cfg: SmoothQuantConfig

    def transform_block(
        self, adapter: ModelAdapter, index: int, stream: CalibrationStream
    ) -> dict[str, Any]:
        absmax = collect_channel_absmax(
            adapter, index, stream.hidden, stream.ctx, stream.batch_size
        )
        stats: dict[str, Any] = {}
        for group in selected_groups(adapter, index, self.cfg.linear_producers):
            scale = migration_scale(
                absmax[group.name], weight_channel_absmax(group), self.cfg.alpha
            )
            adapter.fold_scale(group, scale)
            stats[group.name] = {
                "alpha": self.cfg.alpha,
                "scale_min": float(scale.min()),
                "scale_max": float(scale.max()),
            }
        return stats

    def summary(self, per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"alpha": self.cfg.alpha, "n_smoothed_groups": len(per_group)}


class OutlierSuppressionPlus(_Smoothing):
    name = "osplus"
    config_class = OSPlusConfig
    cfg: OSPlusConfig

    def transform_block(
        self, adapter: ModelAdapter, index: int, stream: CalibrationStream
    ) -> dict[str, Any]:
        groups = selected_groups(adapter, index, self.cfg.linear_producers)
        inputs = capture_inputs(
            adapter,
            index,
            stream.hidden,
            stream.ctx,
            [first_consumer(g) for g in groups],
            stream.batch_size,
            self.cfg.search_tokens,
            seed=self.run_cfg.seed + index,
        )
        return {group.name: self.transform_group(adapter, group, inputs) for group in groups}

    def block_postfix(self, block_stats: dict[str, Any]) -> dict[str, float]:
        ratio = geometric_mean(
            [s["mse_vs_identity"] for s in block_stats.values() if s["mse_vs_identity"]]
        )
        return {} if ratio is None else {"mse_vs_identity": ratio}

    def transform_group(
        self, adapter: ModelAdapter, group: ScaleGroup, inputs: dict[str, InputStats]
    ) -> dict[str, Any]:
        """Search (shift, alpha) for one group and fold the winner."""
        stats = group_inputs(group, inputs)
        shifts: list[torch.Tensor | None] = [None]
        if self.cfg.shift and shift_problem(group) is None:
            center = channel_center(group, stats.low, stats.high)
            shifts = [center, None] if self.cfg.search_shift else [center]
        choice = search_migration(
            group,
            stats,
            self.quant.weight_spec(),
            self.quant.act_spec(),
            self.cfg.alphas,
            shifts,
            self.cfg.try_identity,
        )
        choice.fold(adapter, group)
        return {
            "alpha": choice.alpha,
            "shifted": choice.shift is not None,
            "mse": choice.error,
            # Search MSE relative to no transform at all (None when both are zero).
            "mse_vs_identity": choice.error_vs_identity(),
        }

    def summary(self, per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
        ratios = [g["mse_vs_identity"] for g in per_group.values() if g["mse_vs_identity"]]
        return {
            "alphas": {name: g["alpha"] for name, g in per_group.items()},
            "n_shifted_groups": sum(g["shifted"] for g in per_group.values()),
            "mse_vs_identity": geometric_mean(ratios),
        }
