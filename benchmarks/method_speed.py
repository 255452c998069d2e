"""Quantize time of every method, side by side in one process, at equal calibration data.

The packaged model is cut to its first ``--blocks`` blocks; every method quantizes a fresh
copy of it on the same calibration tokens (preset=cpu: 16 x 256 of wiki-sample, seed 0) at
W3 g128, with its cpu-preset budget (OmniQuant 6 epochs, AutoRound 25 steps of batches of 8,
CBQ's defaults). The methods run interleaved, round after round, so that machine noise hits
all of them alike; the table gives the median over rounds and the ratio to GPTQ.

    python -m benchmarks.method_speed [--blocks 4] [--rounds 2] [--methods gptq awq ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import first_blocks
from cbq.config import Config, QuantConfig
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for

W3G128 = QuantConfig(name="w3a16g128", w_bits=3, w_granularity="per_group", w_group_size=128)
# The cpu presets of conf/method/ (omniquant_cpu, autoround_cpu) and the defaults otherwise.
METHODS = {
    "rtn": {"name": "rtn"},
    "gptq": {"name": "gptq"},
    "awq": {"name": "awq"},
    "omniquant": {"name": "omniquant", "epochs": 6},
    "autoround": {"name": "autoround", "iters": 25},
    "cbq": {"name": "cbq"},
}


def quantize_seconds(base: torch.nn.Module, method: str, calib: torch.Tensor) -> float:
    model = copy.deepcopy(base)
    quantizer = build_method(Config(method=dict(METHODS[method]), quant=W3G128))
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        quantizer.quantize(
            adapter_for(model), calib, RunContext(torch.device("cpu"), Path(run_dir))
        )
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    base, calib = first_blocks(args.model, args.blocks)
    times: dict[str, list[float]] = {method: [] for method in args.methods}
    for round_number in range(args.rounds):
        for method in args.methods:
            times[method].append(quantize_seconds(base, method, calib))
            print(f"round {round_number}: {method} {times[method][-1]:.1f} s", flush=True)
    median = {method: statistics.median(values) for method, values in times.items()}
    reference = median.get("gptq")
    print(
        f"\n{args.model}, first {args.blocks} blocks, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, 16 x 256 calibration tokens, W3 g128, "
        f"median of {args.rounds} rounds\n"
    )
    print("| method | quantize (s) | per block (s) | ratio to GPTQ |")
    print("|---|---|---|---|")
    for method, seconds in median.items():
        ratio = f"{seconds / reference:.2f}x" if reference else "-"
        print(f"| {method} | {seconds:.1f} | {seconds / args.blocks:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
