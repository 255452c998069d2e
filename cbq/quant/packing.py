"""Integer weight codes of a quantized weight, and their bit-packing for export.

A weight on its :class:`WeightQuantizer` grid is ``W = (q - z) * s`` with integer codes
``q`` in ``[0, 2^b - 1]``, per row and group ``s`` and (rounded) ``z``. :func:`weight_codes`
recovers ``q`` from ``W`` and checks that :func:`dequantize` gives ``W`` back bit for bit,
using the same floating-point operations as the fake-quantizer.

:func:`pack_bits` writes ``b``-bit codes as one little-endian bit stream (code ``i`` takes
bits ``b*i .. b*i + b - 1``, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``),
so ``n`` codes take ``ceil(n * b / 8)`` bytes for every ``b`` in 1..8: two codes per byte
at 4 bits, four at 2 bits, and 3-bit codes straddle byte boundaries.
"""

from __future__ import annotations

import torch

from cbq.quant.quantizer import WeightQuantizer


class OffGridError(ValueError):
    """A weight is not exactly representable on its quantizer's grid."""


def _rounded_zero(quantizer: WeightQuantizer, dtype: torch.dtype) -> torch.Tensor:
    return quantizer.zero.unsqueeze(-1).to(dtype).round()


def dequantize(quantizer: WeightQuantizer, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q - z) * s`` in ``dtype``, shaped like ``codes`` (``(out, in)``)."""
    grouped = quantizer.grouped(codes.to(dtype))
    scale = quantizer.scale.unsqueeze(-1).to(dtype)
    return quantizer.ungrouped((grouped - _rounded_zero(quantizer, dtype)) * scale, codes)


def weight_codes(quantizer: WeightQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """The codes ``q`` (uint8, shaped like ``weight``) with ``dequantize(q) == weight`` exactly.

    Raises :class:`OffGridError` when the codes do not reproduce the weight (it is not on
    the grid, e.g. not quantized with this quantizer's step sizes)."""
    weight = weight.detach()
    grouped = quantizer.grouped(weight.float())
    # In float32, W/s is within 256 * 2^-9 < 0.5 of the code even for a bf16 W = (q - z) * s.
    scale = quantizer.scale.unsqueeze(-1).to(weight.dtype).float()
    zero = _rounded_zero(quantizer, weight.dtype).float()
    codes = torch.clamp(torch.round(grouped / scale) + zero, 0, quantizer.spec.qmax)
    codes = quantizer.ungrouped(codes, weight).to(torch.uint8)
    exact = dequantize(quantizer, codes, weight.dtype) == weight
    if not bool(exact.all()):
        bad = int((~exact).sum())
        raise OffGridError(f"{bad} of {weight.numel()} weights are not on the quantizer's grid")
    return codes


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """All of ``codes`` (values below ``2**bits``), flattened, as a uint8 bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    stream = (flat.unsqueeze(-1) >> _shifts(bits, flat.device)) & 1
    stream = torch.nn.functional.pad(stream.reshape(-1), (0, (-stream.numel()) % 8))
    return (stream.reshape(-1, 8) << _shifts(8, flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a :func:`pack_bits` stream, as a flat uint8 tensor."""
    if packed.numel() != packed_size(count, bits):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits "
            f"(expected {packed_size(count, bits)})"
        )
    stream = ((packed.unsqueeze(-1) >> _shifts(8, packed.device)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << _shifts(bits, packed.device)).sum(-1, dtype=torch.uint8)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(bits, dtype=torch.uint8, device=device)
