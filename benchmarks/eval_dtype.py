"""Perplexity under bf16 autocast (``eval.dtype=bfloat16``) against float32, side by side.

A packaged model, FP and with RTN weights (min-max, materialized as a run leaves them), is
scored on the same evaluation windows in both dtypes, interleaved round by round so that
machine noise hits both alike. Reports the median time per window, the speed-up and the
perplexity difference.

    python -m benchmarks.eval_dtype [--model smollm2-135m] [--quant w4a16] [--seqlen 2048]
        [--windows 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cbq.config import Config, QuantConfig
from cbq.data import evaluation_windows
from cbq.eval import perplexity
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for
from cbq.models.loader import load_model

SETTINGS = {
    "w4a16": QuantConfig(name="w4a16"),
    "w3a16g128": QuantConfig(
        name="w3a16g128", w_bits=3, w_granularity="per_group", w_group_size=128
    ),
}


def rtn_copy(model: nn.Module, quant: QuantConfig, calib: torch.Tensor | None = None) -> nn.Module:
    """A copy quantized by ``method=rtn`` (``calib``: for static activation ranges; weight-only
    settings need none)."""
    rtn = copy.deepcopy(model)
    method = build_method(Config(method={"name": "rtn"}, quant=quant))
    method.quantize(adapter_for(rtn), calib, RunContext(torch.device("cpu"), Path()))
    return rtn


def linear_tflops(dtype: torch.dtype, repeats: int = 10) -> float:
    """Throughput of one SmolLM2-sized linear (2048 tokens, 576 -> 1536) in ``dtype``: tells
    whether this CPU has fast bf16 matmuls (AMX) at all."""
    x, w = torch.randn(2048, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return 2 * 2048 * 576 * 1536 * repeats / (time.perf_counter() - start) / 1e12


def timed_perplexity(model: nn.Module, windows: torch.Tensor, bf16: bool) -> tuple[float, float]:
    start = time.perf_counter()
    value = perplexity(adapter_for(model), windows, bf16=bf16)
    return value, (time.perf_counter() - start) / windows.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="w4a16", choices=sorted(SETTINGS))
    parser.add_argument("--corpus", default="wiki-sample")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    fp, tokenizer = load_model(args.model, None, cache_dir=Path("~/.cache/cbq").expanduser())
    models = {"fp": fp, f"rtn {args.quant}": rtn_copy(fp, SETTINGS[args.quant])}
    windows = evaluation_windows(
        args.corpus,
        tokenizer,
        seqlen=args.seqlen,
        calibrating_on_same=False,
        max_windows=args.windows,
    )
    values: dict[tuple[str, bool], float] = {}
    times: dict[tuple[str, bool], list[float]] = {
        (name, bf16): [] for name in models for bf16 in (False, True)
    }
    for _ in range(args.rounds):
        for name, model in models.items():
            for bf16 in (False, True):
                values[name, bf16], seconds = timed_perplexity(model, windows, bf16)
                times[name, bf16].append(seconds)

    print(
        f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{windows.shape[0]} windows of {args.seqlen} tokens of {args.corpus}, "
        f"{args.rounds} rounds (median); one linear: fp32 {linear_tflops(torch.float32):.3f}, "
        f"bf16 {linear_tflops(torch.bfloat16):.3f} TFLOP/s\n"
    )
    print("| model | fp32 s/window | bf16 s/window | speed-up | ppl fp32 | ppl bf16 | difference |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        fp32_s, bf16_s = (statistics.median(times[name, b]) for b in (False, True))
        fp32_ppl, bf16_ppl = values[name, False], values[name, True]
        print(
            f"| {name} | {fp32_s:.2f} | {bf16_s:.2f} | {fp32_s / bf16_s:.2f}x | {fp32_ppl:.3f} "
            f"| {bf16_ppl:.3f} | {100 * (bf16_ppl / fp32_ppl - 1):+.2f}% |"
        )


if __name__ == "__main__":
    main()
