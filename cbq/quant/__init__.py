"""Quantizers and the quantized linear layer."""

from cbq.quant.qlinear import (
    QuantLinear,
    observing_activations,
    quant_linears,
    stored_weights,
    unwrap_block,
    wrap_block,
)
from cbq.quant.quantizer import (
    ActQuantizer,
    Granularity,
    QuantSpec,
    WeightQuantizer,
    fake_quant,
    group_columns,
    minmax_params,
    round_ste,
)

__all__ = [
    "ActQuantizer",
    "Granularity",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantizer",
    "fake_quant",
    "group_columns",
    "minmax_params",
    "observing_activations",
    "quant_linears",
    "round_ste",
    "stored_weights",
    "unwrap_block",
    "wrap_block",
]
