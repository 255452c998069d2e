"""``method=awq``: Activation-aware Weight Quantization (Lin et al., 2023), weight-only.

Per decoder block, on the calibration stream coming out of the already quantized blocks:

1. **scale search**, per scale group (in the adapter's order, each fold applied before the
   next search): ``s_j = mean|X_j|^alpha`` (normalised so that ``max(s) min(s) = 1``) over
   ``alpha in {0, 1/n_grid, ..., (n_grid - 1)/n_grid}``; ``s`` multiplies the consumers'
   input columns and divides the producer's channels (exact in FP). The chosen alpha
   minimises the MSE of the group's consumers' outputs with RTN weights on a token
   subsample; ``alpha = 0`` is ``s = 1``, so a group is never made worse than RTN on the
   search objective. (The reference inspects the whole attention module's output for the
   q/k/v group; here every group is judged on its own linears' outputs, which needs no
   architecture knowledge.)
2. **clipping** (``clip=true``): per linear, output row and weight group, the ratio of
   ``max|W|`` to clamp to (``1, 0.95, ...`` down to ``1 - clip_max_shrink``) that minimises
   the group's partial-output MSE after RTN on ``clip_tokens`` sampled inputs. Linears whose
   name contains a ``clip_skip`` pattern are not clipped (the reference skips q and k:
   their error is amplified by the q k^T product, which the per-linear loss does not see).
3. RTN weights materialized (static activation ranges observed, if the setting has them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cbq.methods.base import Activations, MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import BlockContext, ModelAdapter, ScaleGroup
from cbq.pipeline import Streams
from cbq.quant import QuantSpec
from cbq.transforms import (
    CalibrationStream,
    GroupSearch,
    InputStats,
    apply_clip,
    awq_scale,
    best_of,
    capture_inputs,
    clip_search,
    clippable,
    first_consumer,
    geometric_mean,
    group_inputs,
    rtn_quantize_block,
)

log = logging.getLogger(__name__)
FULL_PRECISION = QuantSpec()


@dataclass
class AWQConfig(MethodConfig):
    name: str = "awq"
    # Scale exponents tried per group: alpha = i / n_grid, i = 0 .. n_grid - 1.
    n_grid: int = 20
    # Search a clipping ratio per output row and weight group.
    clip: bool = True
    clip_grid: int = 20
    # Ratios tried: 1 - i / clip_grid for i < clip_max_shrink * clip_grid.
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_skip: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "query_key_value"])
    # Calibration tokens (sampled, seeded by the run's seed) the scale search runs on.
    search_tokens: int = 4096
    # Calibration sequences per block forward.
    batch_size: int = 4

    def __post_init__(self) -> None:
        for key in ("n_grid", "clip_grid", "clip_tokens", "search_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key}: {getattr(self, key)} must be >= 1")
        if not 0 <= self.clip_max_shrink < 1:
            raise ValueError(
                f"method.clip_max_shrink: {self.clip_max_shrink} is not allowed; allowed: [0, 1)"
            )


class AWQ(QuantMethod):
    name = "awq"
    config_class = AWQConfig
    activations = Activations.full_precision
    needs_calibration = True
    cfg: AWQConfig

    @torch.no_grad()
    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        assert calib is not None, "AWQ needs calibration data"
        weight_spec, act_spec = self.quant.weight_spec(), self.quant.act_spec()
        if act_spec.enabled:
            log.warning(
                "awq is a weight-only method; quant=%s also quantizes activations, which get "
                "min-max ranges observed after the fold (not part of AWQ's search)",
                self.quant.name,
            )
        started = time.perf_counter()

        def work(index: int, streams: Streams, block_ctx: BlockContext) -> dict[str, Any]:
            stream = CalibrationStream(adapter, streams.quantized, block_ctx, self.cfg.batch_size)
            block = self.transform_block(adapter, index, stream)
            block["quantized"] = rtn_quantize_block(stream, index, weight_spec, act_spec)
            block_ratio = geometric_mean(list(block["mse_vs_rtn"].values()))
            if block_ratio is not None:
                ctx.log({"awq/block": index, "awq/mse_vs_rtn": block_ratio})
            return {"index": index, **block}

        pipeline = self.block_pipeline(adapter, calib, ctx, self.cfg.batch_size)
        blocks = pipeline.run(calib, work)

        def per_linear(key: str) -> dict[str, float]:
            return {f"{b['index']}.{k}": v for b in blocks for k, v in b[key].items()}

        ratios = per_linear("mse_vs_rtn")
        return {
            "n_quantized_linears": sum(b["quantized"] for b in blocks),
            "time_s": round(time.perf_counter() - started, 3),
            "alphas": per_linear("alphas"),
            # Geometric mean over groups of the search MSE at the chosen alpha vs alpha = 0.
            "mse_vs_rtn": geometric_mean(list(ratios.values())),
            "groups_mse_vs_rtn": ratios,
            # Mean clipping ratio per linear (1 = not clipped).
            "clip_ratios": per_linear("clip"),
        } | pipeline.resume_stats()

    def transform_block(
        self, adapter: ModelAdapter, index: int, stream: CalibrationStream
    ) -> dict[str, dict[str, float]]:
        """Search and fold the scales of block ``index`` (FP), then clip its weights."""
        weight_spec = self.quant.weight_spec()
        groups = adapter.scale_groups(adapter.blocks()[index])
        names = [first_consumer(g) for g in groups]
        if self.cfg.clip:
            names += adapter.linear_names()
        inputs = capture_inputs(
            adapter,
            index,
            stream.hidden,
            stream.ctx,
            names,
            stream.batch_size,
            self.cfg.search_tokens,
            seed=self.run_cfg.seed + index,
        )
        result: dict[str, dict[str, float]] = {"alphas": {}, "mse_vs_rtn": {}, "clip": {}}
        column_scales: dict[str, torch.Tensor] = {}
        for group in groups:
            alpha, ratio, scale = self.search_group(group, group_inputs(group, inputs))
            adapter.fold_scale(group, scale)
            result["alphas"][group.name] = alpha
            if ratio is not None:
                result["mse_vs_rtn"][group.name] = ratio
            for name in group.consumer_names:
                column_scales[name] = group.expand(scale)
        if self.cfg.clip and clippable(weight_spec):
            result["clip"] = self.clip_block(adapter, index, inputs, column_scales)
        return result

    def search_group(
        self, group: ScaleGroup, inputs: InputStats
    ) -> tuple[float, float | None, torch.Tensor]:
        """The best alpha, its search MSE relative to alpha = 0 (RTN), and its scale."""
        search = GroupSearch(group, inputs, self.quant.weight_spec(), FULL_PRECISION)
        absmean = group.reduce_columns(inputs.abs_mean(), "mean")
        grid = [i / self.cfg.n_grid for i in range(self.cfg.n_grid)]
        errors = {alpha: search.error(awq_scale(absmean, alpha)) for alpha in grid}
        alpha = best_of(errors)
        ratio = errors[alpha] / errors[0.0] if errors[0.0] > 0 else None
        return alpha, ratio, awq_scale(absmean, alpha)

    def clip_block(
        self,
        adapter: ModelAdapter,
        index: int,
        inputs: dict[str, InputStats],
        column_scales: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """Clip every linear of the block not named in ``clip_skip``; mean ratio per linear."""
        weight_spec = self.quant.weight_spec()
        chosen = {}
        for name, linear in adapter.linears(adapter.blocks()[index]).items():
            if any(pattern in name for pattern in self.cfg.clip_skip):
                continue
            x = evenly_spaced(inputs[name].samples, self.cfg.clip_tokens)
            if name in column_scales:  # the inputs were captured before the fold
                x = x / column_scales[name].to(x)
            weight = getattr(linear, "linear", linear).weight
            ratios = clip_search(
                weight, x, weight_spec, self.cfg.clip_grid, self.cfg.clip_max_shrink
            )
            apply_clip(weight, ratios, weight_spec)
            chosen[name] = float(ratios.mean())
        return chosen


def evenly_spaced(rows: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` rows, evenly spaced (as the reference subsamples clip inputs)."""
    return rows[:: max(1, rows.shape[0] // count)][:count]
