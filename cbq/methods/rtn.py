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

from cbq.blockwise import context_for, embed_batches, run_block
from cbq.methods.base import MethodConfig, QuantMethod, RunContext
from cbq.models.adapter import ModelAdapter
from cbq.quant import observing_activations, wrap_block


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
        weight_spec, act_spec = self.quant.weight_spec(), self.quant.act_spec()
        blocks = adapter.blocks()
        hidden = None
        if self.needs_calibration:
            assert calib is not None, "static activation ranges need calibration data"
            hidden = embed_batches(adapter, calib, self.cfg.batch_size, ctx.device)
            block_ctx = context_for(adapter, hidden, self.cfg.batch_size)
        for index in tqdm(range(len(blocks)), desc="rtn", unit="block"):
            wrapped = wrap_block(blocks[index], adapter.linear_names(), weight_spec, act_spec)
            if hidden is not None:
                with torch.no_grad(), observing_activations(blocks[index]):
                    hidden = run_block(adapter, index, hidden, block_ctx, self.cfg.batch_size)
            for qlinear in wrapped.values():
                qlinear.materialize()
        return {"n_quantized_linears": len(blocks) * len(adapter.linear_names())}
