"""``method=rtn``: round-to-nearest with min-max ranges.

Weights get min-max step sizes per tensor, channel or group. Static activation quantizers
take the min-max range they observe on the calibration batch, fed through the FP model
block by block; dynamic ones need no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import BlockContext, ModelAdapter
from cbq.pipeline import Streams
from cbq.transforms import CalibrationStream, rtn_quantize_block


@dataclass
class RTNConfig(MethodConfig):
    name: str = "rtn"
    # Mini-batch of calibration sequences per block forward (static activation ranges).
    batch_size: int = 4


class RoundToNearest(QuantMethod):
    name = "rtn"
    config_class = RTNConfig
    cfg: RTNConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        act = self.quant.act_spec()
        return act.enabled and not act.dynamic

    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        stats = {"n_quantized_linears": len(adapter.blocks()) * len(adapter.linear_names())}
        if not self.needs_calibration:  # weights only: no stream to walk
            for index in tqdm(range(len(adapter.blocks())), desc="rtn", unit="block"):
                adapter.residency.acquire(index)
                for qlinear in self.wrap(adapter, index).values():
                    qlinear.materialize()
                adapter.residency.release(index)
            return stats
        assert calib is not None, "static activation ranges need calibration data"
        weight_spec, act_spec = self.quant.weight_spec(), self.quant.act_spec()
        batch_size = self.cfg.batch_size

        def work(index: int, streams: Streams, block_ctx: BlockContext) -> dict[str, Any]:
            stream = CalibrationStream(adapter, streams.quantized, block_ctx, batch_size)
            rtn_quantize_block(stream, index, weight_spec, act_spec)
            return {}

        pipeline = self.block_pipeline(adapter, calib, ctx, batch_size)
        pipeline.run(calib, work)
        return stats | pipeline.resume_stats()
