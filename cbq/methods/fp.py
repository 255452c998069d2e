"""``method=fp``: the unquantized model, the reference every method is compared with."""

from __future__ import annotations

from typing import Any

import torch

from cbq.methods.base import CBQ_COMPONENTS, QuantMethod, RunContext
from cbq.models.adapter import ModelAdapter


class FullPrecision(QuantMethod):
    name = "fp"
    needs_calibration = False
    ignored_groups = ("quant", *CBQ_COMPONENTS)

    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        return {}
