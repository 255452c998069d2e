"""Where two weight-only quantizations of SmolLM2 differ, linear by linear.

Compares the committed weights of a killed CBD-trainer run (the blocks in its checkpoint
folder, ``<run dir>/checkpoint/<method>/block_<i>.pt``, e.g. of ``method=autoround``) with
another fake-quantized checkpoint (e.g. the ``auto-round`` library's
``library_model/model.safetensors`` from ``benchmarks.autoround_library``), both against the
FP model, per group of 128 inputs:

- the share of groups clipped below 0.7 of their FP range (the smaller of the two ratios of
  the quantized group's min / max to the FP group's), a trace of learned clipping;
- the relative squared error of the whole weight.

    python -m benchmarks.clip_compare <run dir>/checkpoint/autoround <dir>/model.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from cbq.models import adapter_for
from cbq.models.loader import load_model
from cbq.quant.quantizer import group_columns


def clipped_share(quantized: torch.Tensor, weight: torch.Tensor, size: int = 128) -> float:
    q, w = group_columns(quantized, size), group_columns(weight, size)
    high = q.amax(-1) / w.amax(-1).clamp_min(1e-8)
    low = q.amin(-1) / w.amin(-1).clamp_max(-1e-8)
    return (torch.minimum(high, low) < 0.7).float().mean().item()


def relative_error(quantized: torch.Tensor, weight: torch.Tensor) -> float:
    return ((quantized - weight).pow(2).sum() / weight.pow(2).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a CBD run's checkpoint folder")
    parser.add_argument("other", type=Path, help="a fake-quantized model.safetensors")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    ours = {
        int(path.stem.removeprefix("block_")): torch.load(path)
        for path in args.checkpoint.glob("block_*.pt")
    }
    other = load_file(str(args.other))
    model, _ = load_model(args.model, None, cache_dir=Path("~/.cache/cbq").expanduser())
    fp = model.state_dict()
    linears = adapter_for(model).linear_names()  # "self_attn.q_proj", ...
    print("clipped groups (< 0.7 of the FP range) and relative error, checkpoint / other\n")
    print("| block | " + " | ".join(key.split(".")[-1] for key in linears) + " |")
    print("|---" * (len(linears) + 1) + "|")
    for index in sorted(ours):
        cells = []
        for key in linears:
            weight = fp[f"model.layers.{index}.{key}.weight"]
            a = ours[index][f"{key}.linear.weight"]
            b = other[f"model.layers.{index}.{key}.weight"].float()
            cells.append(
                f"{clipped_share(a, weight):.2f} / {clipped_share(b, weight):.2f}, "
                f"{relative_error(a, weight):.3f} / {relative_error(b, weight):.3f}"
            )
        print(f"| {index} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
