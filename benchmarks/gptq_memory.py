"""Peak memory of one GPTQ solve (``cbq.methods.gptq.gptq_solve``) at a linear's width: the
float64 Hessian and its Cholesky factors dominate a lazy GPTQ run's memory.

    python -m benchmarks.gptq_memory [--columns 6912] [--rows 2048]

Prints the peak RSS above the start (sampled every 10 ms), the time and a checksum of the
result (a memory change must not change it).
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from cbq.config import QuantConfig
from cbq.methods.gptq import GPTQConfig, gptq_solve
from cbq.quant.quantizer import WeightQuantizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=6912)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = torch.randn(512, args.columns)
    hessian = (inputs.T @ inputs).double() / len(inputs)
    weight = torch.randn(args.rows, args.columns) * 0.02
    quantizer = WeightQuantizer(QuantConfig(name="w4a16", w_bits=4).weight_spec(), weight)
    process = psutil.Process()
    start = peak = process.memory_info().rss
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    result = gptq_solve(weight, hessian, quantizer, GPTQConfig())
    seconds = time.perf_counter() - began
    done.set()
    watcher.join()
    print(
        f"{args.rows} x {args.columns} solve: peak {(peak - start) / 2**20:.0f} MiB above the "
        f"start, {seconds:.1f} s, checksum {result.double().sum().item():.6f}"
    )


if __name__ == "__main__":
    main()
