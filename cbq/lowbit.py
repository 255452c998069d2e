"""Real low-bit inference on CPU: an ``export=compressed_tensors`` checkpoint with its
quantized linears on torchao's integer kernels instead of dequantized float weights.

- 4-bit weights (per group of 32 / 64 / 128, or per channel, which is the same grid with the
  channel's step repeated over groups), float activations: torchao's ``Int4OpaqueTensor`` on
  the tinygemm CPU kernel (``aten._weight_int4pack_mm_for_cpu``).
- 8-bit symmetric weights per channel with static per-tensor 8-bit activations: torchao's
  ``Int8Tensor`` on int8 x int8 -> int32 matmuls, with the checkpoint's activation scale and
  zero point.

The kernels' tensors are built from the codes, scales and zero points in the file, never by
re-quantizing the float weights, so they hold the grid our quantizer chose. Any other setting
is refused, naming the linear and the setting, before the model is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from cbq.compressed_writer import stored_codes

INT4_GROUP_SIZES = (128, 64, 32)  # tinygemm's CPU kernel; the largest that divides is used
QUANT_KEYS = (
    "weight_packed",
    "weight_shape",
    "weight_scale",
    "weight_zero_point",
    "input_scale",
    "input_zero_point",
)


class UnsupportedKernel(ValueError):
    """The checkpoint holds a setting no integer CPU kernel here runs."""


@dataclass(frozen=True)
class CompressedLinear:
    """One linear of the checkpoint: unsigned codes ``q`` ``(out, in)``, steps ``s`` and
    unsigned zero points ``z`` ``(out, groups)``, so that ``w = (q - z) * s``."""

    name: str
    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    input_scale: torch.Tensor | None = None
    input_zero: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]


def read_linears(
    directory: str | Path, state: dict[str, torch.Tensor] | None = None
) -> dict[str, CompressedLinear]:
    """Every quantized linear of a compressed-tensors checkpoint (``state``: its tensors, if
    already loaded), read with the library's unpacking."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    fmt = CompressionFormat(config["format"])
    (group,) = config["config_groups"].values()
    weights, inputs = group["weights"], group.get("input_activations")
    bits = int(weights["num_bits"])
    state = _load_state(directory) if state is None else state
    names = sorted({key.rsplit(".", 1)[0] for key in state if key.endswith(".weight_scale")})
    return {name: _linear(name, _local(state, name), fmt, bits, inputs) for name in names}


def _load_state(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _local(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _linear(
    name: str,
    local: dict[str, torch.Tensor],
    fmt: CompressionFormat,
    bits: int,
    inputs: dict | None,
) -> CompressedLinear:
    codes = stored_codes(local, fmt, bits).to(torch.int32)
    scale = local["weight_scale"].float()
    scale = (
        scale.reshape(codes.shape[0], -1) if scale.numel() > 1 else scale.expand(codes.shape[0], 1)
    )
    zero = _unsigned_zero(local, fmt, bits, scale.shape)
    input_scale = input_zero = None
    if inputs is not None:
        input_scale = local["input_scale"].float().reshape(())
        signed = local.get("input_zero_point", torch.zeros((), dtype=torch.int8))
        input_zero = signed.to(torch.int32).reshape(()) + 2 ** (int(inputs["num_bits"]) - 1)
    return CompressedLinear(name, bits, codes, scale, zero, input_scale, input_zero)


def _unsigned_zero(
    local: dict[str, torch.Tensor], fmt: CompressionFormat, bits: int, shape: torch.Size
) -> torch.Tensor:
    signed = local.get("weight_zero_point")
    if signed is None:  # symmetric: the signed zero point is 0
        return torch.full(shape, 2 ** (bits - 1), dtype=torch.int32)
    if fmt is CompressionFormat.pack_quantized and signed.dtype == torch.int32:
        signed = unpack_from_int32(signed, bits, shape, packed_dim=0)
    return signed.to(torch.int32).reshape(shape) + 2 ** (bits - 1)


def kernel_problems(linears: dict[str, CompressedLinear]) -> list[str]:
    """Why the checkpoint's linears cannot run on the integer kernels (empty: they can)."""
    problems = []
    for item in linears.values():
        if item.bits == 4 and item.input_scale is None:
            if _int4_group(item) is None:
                problems.append(
                    f"{item.name}: 4-bit groups of {item.group_size} over {item.codes.shape[1]} "
                    f"inputs; tinygemm needs groups of {INT4_GROUP_SIZES} (or per channel with "
                    "inputs divisible by 32)"
                )
        elif item.bits == 8 and item.input_scale is not None:
            if item.scale.shape[1] != 1 or not bool((item.zero == 128).all()):
                problems.append(
                    f"{item.name}: int8 weights must be symmetric per channel "
                    "(quant.w_symmetric=true, quant.w_granularity=per_channel)"
                )
        else:
            activations = "float activations" if item.input_scale is None else "8-bit activations"
            problems.append(
                f"{item.name}: {item.bits}-bit weights with {activations}; supported: w4a16 "
                "(per channel or groups of 32/64/128) and w8a8 (symmetric weights, static "
                "activations)"
            )
    return problems


def _int4_group(item: CompressedLinear) -> int | None:
    columns = item.codes.shape[1]
    if item.scale.shape[1] == 1:
        return next((size for size in INT4_GROUP_SIZES if columns % size == 0), None)
    return item.group_size if item.group_size in INT4_GROUP_SIZES else None


def int4_weight(item: CompressedLinear, dtype: torch.dtype) -> torch.Tensor:
    """torchao's tinygemm CPU tensor for ``item``. tinygemm computes ``(u - 8) * s + m`` per
    group from unsigned codes ``u``; ours is ``(q - z) * s``: ``u = q``, ``m = (8 - z) * s``."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    group = _int4_group(item)
    assert group is not None, kernel_problems({item.name: item})
    repeat = item.codes.shape[1] // group // item.scale.shape[1]
    scale = item.scale.repeat_interleave(repeat, dim=1)
    zero = item.zero.repeat_interleave(repeat, dim=1)
    offset = (8 - zero).float() * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(item.codes.contiguous(), 1)
    scales_and_zeros = pack_tinygemm_scales_and_zeros(scale.to(dtype), offset.to(dtype), dtype)
    return Int4OpaqueTensor(
        qdata=packed,
        scale_and_zero=scales_and_zeros,
        block_size=[1, group],
        shape=item.codes.shape,
    )


def int8_weight(item: CompressedLinear, dtype: torch.dtype) -> torch.Tensor:
    """torchao's int8 tensor with static per-tensor activations: signed codes ``q - 128``
    with the activation's signed zero point ``z_a - 128``."""
    from torchao.quantization.granularity import PerTensor
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
        Int8Tensor,
        QuantizeTensorToInt8Kwargs,
    )

    assert item.input_scale is not None and item.input_zero is not None
    return Int8Tensor(
        (item.codes - 128).to(torch.int8),
        item.scale.to(dtype),
        [1, item.codes.shape[1]],
        dtype,
        zero_point=torch.zeros_like(item.scale, dtype=torch.int8),
        act_quant_scale=item.input_scale.reshape(1, 1).to(dtype),
        act_quant_zero_point=(item.input_zero - 128).to(torch.int8).reshape(1, 1),
        act_quant_kwargs=QuantizeTensorToInt8Kwargs(
            granularity=PerTensor(), mapping_type=MappingType.ASYMMETRIC
        ),
    )


def load_lowbit(directory: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The checkpoint as a model whose quantized linears run on the integer kernels and whose
    other tensors (embeddings, norms, lm_head) are the file's, in ``dtype``."""
    directory = Path(directory)
    state = _load_state(directory)
    linears = read_linears(directory, state)
    problems = kernel_problems(linears)
    if problems:
        raise UnsupportedKernel(
            "no integer CPU kernel for this checkpoint:\n  " + "\n  ".join(problems)
        )
    model = _float_skeleton(directory, dtype, state, {name + ".weight" for name in linears})
    del state
    for name, item in linears.items():
        module = model.get_submodule(name)
        if item.bits == 4:
            module.weight = nn.Parameter(int4_weight(item, dtype), requires_grad=False)
        else:
            module.weight = nn.Parameter(int8_weight(item, dtype), requires_grad=False)
            _feed_token_rows(module)
    return model.eval()


def _feed_token_rows(module: nn.Module) -> None:
    """Give the linear its input as ``(tokens, features)``: torchao's static activation
    scale must have the input's rank, and one model feeds its linears 3-D and 2-D inputs
    (OPT's MLP)."""
    shapes: list[torch.Size] = []

    def flatten(_: nn.Module, args: tuple) -> tuple:
        shapes.append(args[0].shape)
        return (args[0].reshape(-1, args[0].shape[-1]),)

    def restore(_: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.reshape(*shapes.pop()[:-1], out.shape[-1])

    module.register_forward_pre_hook(flatten)
    module.register_forward_hook(restore)


def _float_skeleton(
    directory: Path, dtype: torch.dtype, state: dict[str, torch.Tensor], quantized: set[str]
) -> PreTrainedModel:
    """The architecture without its quantization config, holding the file's unquantized
    tensors; the ``quantized`` weights are left to be replaced."""
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in state.items()
        if key.rsplit(".", 1)[-1] not in QUANT_KEYS and key not in quantized
    }
    missing, unexpected = model.load_state_dict(plain, strict=False)
    stray = [key for key in missing if key not in quantized and "lm_head" not in key]
    if stray or unexpected:
        raise ValueError(
            f"checkpoint does not match its config: missing {stray}, unexpected {unexpected}"
        )
    model.tie_weights()
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
