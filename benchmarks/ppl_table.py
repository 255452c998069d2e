"""FP and RTN perplexity on the packaged models, as one sweep, printed as a table.

Static activation ranges (w8a8) are calibrated on 32 x seqlen tokens of wiki-sample.

    python -m benchmarks.ppl_table [--windows 16] [--models smollm2-135m gemma3-270m]

Runs ``python -m cbq -m`` (so each cell is an ordinary run with its own results.json under
``multirun/bench_ppl``) and then ``cbq.report`` on the sweep directory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cbq.report import load_results, markdown, pivot

SETTINGS = ["w4a16", "w3a16g128", "w2a16g64", "w8a8", "w4a4"]


def sweep(
    sweep_dir: Path,
    models: list[str],
    windows: int,
    seqlen: int,
    method: str,
    quants: str,
    n_samples: int = 32,
) -> None:
    command = [
        sys.executable,
        "-m",
        "cbq",
        "-m",
        f"model={','.join(models)}",
        f"method={method}",
        f"quant={quants}",
        f"data.seqlen={seqlen}",
        f"data.n_samples={n_samples}",
        f"data.max_eval_windows={windows}",
        "logger=disabled",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweep.subdir={method}_${{model.name}}_${{quant.name}}",
    ]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--windows", type=int, default=16, help="first N eval windows")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("multirun/bench_ppl"))
    args = parser.parse_args()
    sweep(args.out, args.models, args.windows, args.seqlen, "fp", "w4a16")
    sweep(args.out, args.models, args.windows, args.seqlen, "rtn", ",".join(SETTINGS))
    records = load_results(args.out)
    header, body = pivot(records, ["model.name"], "setting", "ppl/wiki-sample")
    print(markdown(header, body))


if __name__ == "__main__":
    main()
