"""Size on disk of ``export=compressed_tensors`` for the packaged models (issue #14), against
the unquantized checkpoint in fp32 and fp16.

Each weight-only setting is quantized with ``method=rtn`` (the size does not depend on the
method) from the model in fp32 and in bf16, exported, and measured (the whole directory:
safetensors, config, tokenizer). The unquantized embedding (tied to the LM head) stays in the
model's dtype, so most of a small model's quantized checkpoint is its embedding; the table
gives that share too.

    python -m benchmarks.export_sizes [--models smollm2-135m gemma3-270m]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.eval_dtype import rtn_copy
from cbq.config import ExportFormat, QuantConfig
from cbq.export import directory_size, export_model
from cbq.models.loader import load_model

CACHE = Path("~/.cache/cbq").expanduser()
GROUP64 = {"w_granularity": "per_group", "w_group_size": 64}
SETTINGS = [
    QuantConfig(name="w4a16"),
    QuantConfig(name="w4a16g64", **GROUP64),
    QuantConfig(name="w3a16g64", w_bits=3, **GROUP64),
    QuantConfig(name="w2a16g64", w_bits=2, **GROUP64),
]
MIB = 2**20


def embedding_bytes(model: nn.Module) -> int:
    weight = model.get_input_embeddings().weight
    return weight.numel() * weight.element_size()


def sizes_of(name: str, root: Path) -> list[str]:
    fp, tokenizer = load_model(name, None, cache_dir=CACHE)
    in_dtype = {dtype: copy.deepcopy(fp).to(dtype) for dtype in (torch.float16, torch.bfloat16)}
    in_dtype[torch.float32] = fp
    rows = []
    unquantized = {}
    for dtype in (torch.float32, torch.float16):
        path = root / f"{name}-{dtype}"
        in_dtype[dtype].save_pretrained(path)
        tokenizer.save_pretrained(path)
        unquantized[dtype] = directory_size(path)
    rows.append(
        f"| {name} | unquantized | {unquantized[torch.float32] / MIB:.0f} "
        f"| {unquantized[torch.float16] / MIB:.0f} (fp16) | 1.00x | - |"
    )
    for quant in SETTINGS:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            model = rtn_copy(in_dtype[dtype], quant)
            path = root / f"{name}-{quant.name}-{dtype}"
            export_model(model, tokenizer, path, ExportFormat.compressed_tensors, method="rtn")
            cells.append((directory_size(path), embedding_bytes(model)))
        (fp32_size, fp32_embed), (bf16_size, _) = cells
        rows.append(
            f"| {name} | {quant.name} | {fp32_size / MIB:.0f} | {bf16_size / MIB:.0f} "
            f"| {unquantized[torch.float16] / bf16_size:.2f}x "
            f"| {100 * fp32_embed / fp32_size:.0f}% |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = parser.parse_args()
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="export-sizes-") as tmp:
            rows += sizes_of(name, Path(tmp))
    print(
        "| model | setting | from fp32 (MiB) | from bf16 (MiB) | fp16 / bf16 export "
        "| embedding share (fp32) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
