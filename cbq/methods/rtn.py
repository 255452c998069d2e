"""``method=rtn``: round-to-nearest with min-max ranges.

Weights get min-max step sizes per tensor, channel or group. Static activation quantizers
take the min-max range they observe on the calibration batch, fed through the FP model
block by block; dynamic ones need no calibration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from cbq.blockwise import run_block
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import BlockContext, ModelAdapter
from cbq.quant import QuantLinear, observing_activations, wrap_block


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
                self._materialize(self._wrap(adapter, index))
            return stats
        assert calib is not None, "static activation ranges need calibration data"

        def work(index: int, hidden: torch.Tensor, block_ctx: BlockContext) -> dict[str, Any]:
            qlinears = self._wrap(adapter, index)
            with torch.no_grad(), observing_activations(adapter.blocks()[index]):
                run_block(adapter, index, hidden, block_ctx, self.cfg.batch_size)
            self._materialize(qlinears)
            return {}

        wrap = functools.partial(self._wrap, adapter)
        pipeline = self.block_pipeline(adapter, calib, ctx, self.cfg.batch_size, wrap)
        pipeline.run(calib, work)
        return stats | ({"resumed_at_block": pipeline.resumed_at} if pipeline.resumed_at else {})

    def _wrap(self, adapter: ModelAdapter, index: int) -> dict[str, QuantLinear]:
        return wrap_block(
            adapter.blocks()[index],
            adapter.linear_names(),
            self.quant.weight_spec(),
            self.quant.act_spec(),
        )

    @staticmethod
    def _materialize(qlinears: dict[str, QuantLinear]) -> None:
        for qlinear in qlinears.values():
            qlinear.materialize()
