"""Writing a compressed-tensors checkpoint with the library's own compressors (what
``export=compressed_tensors`` can express is :mod:`cbq.export_compressed`'s). Imported only
when exporting in this format: other runs never load compressed-tensors or pydantic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
)
from compressed_tensors.quantization.lifecycle.initialize import (
    initialize_module_for_quantization,
)
from torch import nn
from transformers import PreTrainedModel

from cbq.quant import Granularity, QuantLinear, QuantSpec
from cbq.quant.packing import weight_codes

STRATEGIES = {
    Granularity.per_tensor: QuantizationStrategy.TENSOR,
    Granularity.per_channel: QuantizationStrategy.CHANNEL,
    Granularity.per_group: QuantizationStrategy.GROUP,
    Granularity.per_token: QuantizationStrategy.TOKEN,
}


def quantization_args(spec: QuantSpec) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy=STRATEGIES[spec.granularity],
        group_size=spec.group_size if spec.granularity is Granularity.per_group else None,
        dynamic=spec.dynamic,
    )


def scheme_for(weight: QuantSpec, act: QuantSpec) -> QuantizationScheme:
    """One scheme for every quantized linear; the unquantized ones (lm_head) are listed in
    ``ignore`` by ``QuantizationConfig.from_pretrained``."""
    return QuantizationScheme(
        targets=["Linear"],
        weights=quantization_args(weight),
        input_activations=quantization_args(act) if act.enabled else None,
    )


def write_compressed(
    plain: PreTrainedModel, qlinears: Mapping[str, QuantLinear], directory: Path
) -> str:
    """Compress ``plain`` (plain linears holding the quantized weights of ``qlinears``) with
    the library and save it to ``directory``; returns the compression format written."""
    weight, act = _specs(qlinears)
    codes = _attach_all(plain, qlinears, scheme_for(weight, act))
    compressor = ModelCompressor.from_pretrained_model(plain)
    compressor.compress_model(plain)
    compressor.remove_decompression_hook(plain)
    fmt = CompressionFormat(compressor.quantization_config.format)
    _check_all(plain, codes, fmt, weight.bits)
    plain.save_pretrained(directory)
    return finish_config(compressor, directory, weight)


class BlockCompressor:
    """A lazy model's compressed-tensors export, one block at a time: the library's config
    (format, ignore list) is read off a meta skeleton carrying the scheme on every quantized
    linear, as it would be off the whole model, and each block's plain copy is compressed by
    the same compressor."""

    def __init__(self, skeleton: nn.Module, names: list[str], weight: QuantSpec, act: QuantSpec):
        self.scheme, self.weight = scheme_for(weight, act), weight
        for name in names:
            module = skeleton.get_submodule(name)
            initialize_module_for_quantization(module, self.scheme, force_zero_point=False)
            module.quantization_status = QuantizationStatus.FROZEN
        self.compressor = ModelCompressor.from_pretrained_model(skeleton)
        self.format = CompressionFormat(self.compressor.quantization_config.format)

    def block_tensors(
        self, plain: nn.Module, qlinears: Mapping[str, QuantLinear], prefix: str
    ) -> dict[str, torch.Tensor]:
        """The compressed tensors of one block's plain copy, their keys under ``prefix``."""
        codes = _attach_all(plain, qlinears, self.scheme)
        self.compressor.compress_model(plain)
        _check_all(plain, codes, self.format, self.weight.bits)
        return {prefix + key: tensor for key, tensor in plain.state_dict().items()}

    def finish(self, directory: Path) -> str:
        return finish_config(self.compressor, directory, self.weight)


def finish_config(compressor: ModelCompressor, directory: Path, weight: QuantSpec) -> str:
    """The quantization config into ``directory``'s config.json; returns the format."""
    compressor.update_config(str(directory))
    fmt = CompressionFormat(compressor.quantization_config.format)
    if _packs_zero_points(fmt, weight):
        _dequantize_on_load(directory / "config.json")
    return fmt.value


def _specs(qlinears: Mapping[str, QuantLinear]) -> tuple[QuantSpec, QuantSpec]:
    first = next(iter(qlinears.values()))
    return first.weight_quantizer.spec, first.act_quantizer.spec


def _attach_all(
    root: nn.Module, qlinears: Mapping[str, QuantLinear], scheme: QuantizationScheme
) -> dict[str, torch.Tensor]:
    """The scheme and each QuantLinear's parameters on ``root``'s plain linear of the same
    name; returns our codes of each, to check what the library stores against."""
    codes = {}
    for name, qlinear in qlinears.items():
        module = root.get_submodule(name)
        codes[name] = weight_codes(qlinear.weight_quantizer, module.weight.detach())
        try:
            _attach(module, qlinear, scheme)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return codes


def _check_all(
    root: nn.Module, codes: Mapping[str, torch.Tensor], fmt: CompressionFormat, bits: int
) -> None:
    for name, expected in codes.items():
        _check_codes(name, root.get_submodule(name), fmt, bits, expected)


@torch.no_grad()
def _attach(module: nn.Linear, qlinear: QuantLinear, scheme: QuantizationScheme) -> None:
    """Give ``module`` the scheme and ``qlinear``'s parameters, as calibration would."""
    initialize_module_for_quantization(module, scheme, force_zero_point=False)
    quantizer, act = qlinear.weight_quantizer, qlinear.act_quantizer
    # Our dequantization runs in the weight's dtype (cbq.quant.packing.dequantize).
    module.weight_scale.copy_(
        quantizer.scale.to(module.weight.dtype).reshape_as(module.weight_scale)
    )
    _set_zero_point(module, "weight", quantizer.zero, quantizer.spec)
    if act.needs_calibration:
        if not act.calibrated:
            raise ValueError("its static activation quantizer was never calibrated")
        module.input_scale.copy_(act.scale.reshape_as(module.input_scale))
        _set_zero_point(module, "input", act.zero, act.spec)
    module.quantization_status = QuantizationStatus.FROZEN


def _set_zero_point(module: nn.Module, base: str, zero: torch.Tensor, spec: QuantSpec) -> None:
    """Store the signed zero point ``z - 2^(b-1)``; symmetric quantizers must have it 0."""
    signed = zero.detach().round() - 2 ** (spec.bits - 1)
    low, high = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    if bool((signed < low).any() or (signed > high).any()):
        raise ValueError(f"{base} zero points outside [0, {spec.qmax}]")
    if spec.symmetric:
        if bool(signed.any()):
            raise ValueError(f"symmetric {base} quantizer with zero points other than 2^(b-1)")
        return
    target = getattr(module, f"{base}_zero_point")
    target.copy_(signed.reshape_as(target))


def stored_codes(
    state: Mapping[str, torch.Tensor], fmt: CompressionFormat, bits: int
) -> torch.Tensor:
    """Our unsigned codes ``q`` of one compressed linear, read from its (local-name) tensors
    with the library's unpacking."""
    if fmt is CompressionFormat.pack_quantized:
        shape = torch.Size(state["weight_shape"].tolist())
        signed = unpack_from_int32(state["weight_packed"], bits, shape)
    else:
        signed = state["weight"]
    return (signed.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


def _check_codes(
    name: str, module: nn.Module, fmt: CompressionFormat, bits: int, expected: torch.Tensor
) -> None:
    state = {key: tensor.detach() for key, tensor in module.state_dict().items()}
    if not torch.equal(stored_codes(state, fmt, bits), expected):
        raise RuntimeError(f"{name}: compressed-tensors stored other codes than the quantizer's")


def _packs_zero_points(fmt: CompressionFormat, weight: QuantSpec) -> bool:
    return (
        fmt is CompressionFormat.pack_quantized
        and not weight.symmetric
        and weight.granularity in (Granularity.per_channel, Granularity.per_group)
    )


def _dequantize_on_load(config_file: Path) -> None:
    """Ask transformers to dequantize the weights while loading.

    Its default route (compressed-tensors 0.20.1, transformers 5.23) builds the compressed
    modules on the meta device, where the pack-quantized compressor leaves the zero points
    unpacked, ``(out, groups)`` int8 against the checkpoint's packed ``(out * b / 32, groups)``
    int32, and ``from_pretrained`` stops on the size mismatch (llm-compressor#1618). The
    ``dequantize`` route unpacks them with the library's decompressor; it is a transformers
    loading option (``CompressedTensorsConfig(dequantize=True)``), which vLLM does not read."""
    config = json.loads(config_file.read_text())
    config["quantization_config"]["dequantize"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
