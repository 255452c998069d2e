"""``export=compressed_tensors``: the compressed-tensors checkpoint, which vLLM serves and
transformers loads (``AutoModelForCausalLM.from_pretrained(dir)`` with compressed-tensors
installed), written by the compressed-tensors library as llm-compressor writes it.

:mod:`cbq.compressed_writer` writes it; here is what the format can express. There, each
quantized linear of a plain copy of the model (:func:`cbq.export.plain_model`) gets a
``QuantizationScheme`` and our step sizes and zero points as ``weight_scale`` /
``weight_zero_point`` (``input_scale`` / ``input_zero_point`` for static activations);
``ModelCompressor`` compresses the weights (the format the library infers: ``pack-quantized``
for weight-only settings, ``int-quantized`` with quantized activations), ``save_pretrained``
writes them and ``ModelCompressor.update_config`` adds ``quantization_config`` to
``config.json``.

compressed-tensors codes are signed, ``[-2^(b-1), 2^(b-1) - 1]``, with ``W = (c - zp) * s``;
ours are ``q`` in ``[0, 2^b - 1]`` with ``W = (q - z) * s``. So ``c = q - 2^(b-1)`` and
``zp = z - 2^(b-1)``: a symmetric quantizer (``z = 2^(b-1)``) has ``zp = 0``, which the format
leaves out. The step sizes are ours in the model's dtype, so the loaded weights are ours bit
for bit; the packed codes are checked against :func:`cbq.quant.packing.weight_codes` before
anything is saved.

:func:`setting_problems` and :func:`shape_problems` name what the format cannot express;
:func:`cbq.export.export_model` refuses those settings before writing anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from cbq.quant import Granularity, QuantSpec

ALLOWED = (
    "integer weights of 2..8 bits per tensor, per channel or per group (a group size dividing "
    "the input width of every quantized linear), symmetric or asymmetric; activations in full "
    "precision, static per tensor, or dynamic per tensor asymmetric"
)


class UnsupportedSetting(ValueError):
    """The quantization setting has no exact compressed-tensors equivalent."""


def setting_problems(weight: QuantSpec, act: QuantSpec) -> list[str]:
    """Why compressed-tensors cannot express this setting (empty when it can), one line per
    field; the group size's fit to the model's linears is :func:`shape_problems`'s."""
    problems = [] if (problem := _dynamic_problem(act)) is None else [problem]
    if act.enabled and not weight.enabled:
        problems.append(
            f"quant.w_bits={weight.bits} with quantized activations: compressed-tensors' "
            "int-quantized format stores integer weights"
        )
    return problems


def _dynamic_problem(act: QuantSpec) -> str | None:
    if not act.enabled or not act.dynamic:
        return None
    if act.granularity is Granularity.per_token:
        return (
            "quant.a_granularity=per_token (dynamic): compressed-tensors' token strategy takes "
            "the range over every dimension after the first two, so a linear fed (tokens, "
            "hidden) inputs (OPT's fc1/fc2) would get one step size per element, not per token"
        )
    if act.symmetric:
        return (
            "quant.a_symmetric=true with quant.a_dynamic=true: compressed-tensors' dynamic step "
            "is max|x| / ((2^b - 1) / 2), cbq's max|x| / (2^(b-1) - 1): the loaded model would "
            "quantize activations on another grid"
        )
    return None


def shape_problems(in_features: Mapping[str, int], weight: QuantSpec) -> list[str]:
    """The linears (by name, with their input widths) that the group size splits unevenly:
    compressed-tensors' group strategy has no partial last group."""
    if not weight.enabled or weight.granularity is not Granularity.per_group:
        return []
    size = weight.group_size
    assert size is not None
    uneven = {name: width for name, width in in_features.items() if width % size}
    if not uneven:
        return []
    name, width = next(iter(uneven.items()))
    common = math.gcd(*in_features.values())
    return [
        f"quant.w_group_size={size} leaves a partial last group in {len(uneven)} linear(s), "
        f"e.g. {name} (in_features={width}): compressed-tensors' group strategy needs every "
        f"input width to be a multiple of the group size; allowed here: a divisor of {common}, "
        "or quant.w_granularity=per_channel"
    ]
