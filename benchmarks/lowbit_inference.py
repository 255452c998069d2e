"""Real low-bit inference on CPU (issue #14): exported checkpoints on torchao's int4 / int8
kernels against the dense fp32 and bf16 model, side by side in one run.

A packaged model is quantized with ``method=rtn`` (W4A16 per group of 64, W4A16 per channel,
and W8A8 with symmetric weights and static activations calibrated on wiki-sample), exported
with ``export=compressed_tensors`` and loaded back by :func:`cbq.lowbit.load_lowbit`. Each
variant is measured in its own process (so that peak RSS is its own), in turn, with the same
prompts and windows:

- prefill tokens per second (one sequence of ``--prefill`` tokens, median of rounds);
- decode tokens per second at batch 1 (greedy, ``--decode`` new tokens after a 64-token
  prompt, with the KV cache, median of rounds);
- peak RSS of the process;
- the size of the checkpoint on disk;
- perplexity on the first ``--windows`` evaluation windows of wiki-sample, against the
  in-memory fake-quant model's on the same windows.

    python -m benchmarks.lowbit_inference [--model smollm2-135m] [--rounds 3]
        [--kernels-only | --nudge]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.eval_dtype import rtn_copy
from cbq.config import ExportFormat, QuantConfig
from cbq.data import calibration_batch, evaluation_windows
from cbq.eval import perplexity
from cbq.export import directory_size, export_model
from cbq.lowbit import CompressedLinear, int4_weight, int8_weight, load_lowbit
from cbq.models import adapter_for
from cbq.models.loader import load_model
from cbq.quant import quant_linears

CACHE = Path("~/.cache/cbq").expanduser()
SETTINGS = {
    "w4a16g64": QuantConfig(name="w4a16g64", w_granularity="per_group", w_group_size=64),
    "w4a16": QuantConfig(name="w4a16"),
    "w8a8": QuantConfig(name="w8a8_wsym", w_bits=8, a_bits=8, w_symmetric=True),
    "w8a8_sym_act": QuantConfig(
        name="w8a8_sym", w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True
    ),
}
# (label, checkpoint, dtype the model runs in)
VARIANTS = [
    ("fp32 dense", "fp32", "float32"),
    ("bf16 dense", "bf16", "bfloat16"),
    ("w4a16g64 int4 (bf16 act)", "w4a16g64", "bfloat16"),
    ("w4a16 int4 (bf16 act)", "w4a16", "bfloat16"),
    ("w8a8 int8 (fp32 scales)", "w8a8", "float32"),
    ("w8a8 int8, symmetric activations", "w8a8_sym_act", "float32"),
]
# tinygemm's CPU kernel with float32 activations is far slower than with bf16 (one linear,
# below); the model-level int4 rows run in bf16, the kernel's intended dtype.


def prepare(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Write every checkpoint under ``root``; returns the fake-quant perplexities."""
    fp, tokenizer = load_model(args.model, None, cache_dir=CACHE)
    windows = eval_windows(tokenizer, args)
    calib = calibration_batch("wiki-sample", tokenizer, n_samples=8, seqlen=512, seed=0)
    fp.config.use_cache = fp.generation_config.use_cache = True  # the loader turns it off
    fp.save_pretrained(root / "fp32")
    copy.deepcopy(fp).to(torch.bfloat16).save_pretrained(root / "bf16")
    for path in ("fp32", "bf16"):
        tokenizer.save_pretrained(root / path)
    fake_quant = {}
    for name, quant in SETTINGS.items():
        model = rtn_copy(fp, quant, calib)
        fake_quant[name] = perplexity(adapter_for(model), windows)
        fake_quant[name + " bf16"] = perplexity(adapter_for(model), windows, bf16=True)
        export_model(model, tokenizer, root / name, ExportFormat.compressed_tensors, method="rtn")
    return fake_quant


def nudge_sensitivity(args: argparse.Namespace) -> None:
    """How far the fake-quant W8A8 model's perplexity moves when every quantized weight is
    scaled by 1 + 1e-6 (a float rounding's size): the scale of difference that 8-bit
    activation codes flipping at their rounding boundaries can make."""
    fp, tokenizer = load_model(args.model, None, cache_dir=CACHE)
    windows = eval_windows(tokenizer, args)
    calib = calibration_batch("wiki-sample", tokenizer, n_samples=8, seqlen=512, seed=0)
    model = rtn_copy(fp, SETTINGS["w8a8"], calib)
    before = perplexity(adapter_for(model), windows)
    with torch.no_grad():
        for _, qlinear in quant_linears(model):
            qlinear.linear.weight.mul_(1 + 1e-6)  # materialized: the quantized weight itself
    after = perplexity(adapter_for(model), windows)
    print(
        f"w8a8 fake-quant ppl on {args.windows} windows: {before:.3f}; with every quantized "
        f"weight x (1 + 1e-6): {after:.3f} ({100 * (after / before - 1):+.2f}%)"
    )


def eval_windows(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    return evaluation_windows(
        "wiki-sample",
        tokenizer,
        seqlen=512,
        calibrating_on_same=False,
        max_windows=args.windows,
    )


def load(directory: Path, dtype: torch.dtype) -> nn.Module:
    """A quantized export on the integer kernels; an unquantized checkpoint as it is."""
    if "quantization_config" in json.loads((directory / "config.json").read_text()):
        return load_lowbit(directory, dtype)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


@torch.no_grad()
def measure(directory: Path, dtype_name: str, args: argparse.Namespace) -> dict[str, float]:
    """One variant, in this process: speeds, perplexity, peak RSS."""
    dtype = getattr(torch, dtype_name)
    model = load(directory, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    windows = eval_windows(tokenizer, args)
    prompt = windows[:1, : args.prefill]
    prefill, decode = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        model(prompt)
        prefill.append(args.prefill / (time.perf_counter() - start))
        start = time.perf_counter()
        model.generate(
            windows[1:2, :64],
            max_new_tokens=args.decode,
            min_new_tokens=args.decode,
            do_sample=False,
        )
        decode.append(args.decode / (time.perf_counter() - start))
    return {
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ppl": perplexity(adapter_for(model), windows),
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would report the parent's from
    before ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def in_subprocess(directory: Path, dtype_name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.lowbit_inference", "--measure", str(directory)]
    command += ["--dtype", dtype_name, "--windows", str(args.windows), "--rounds", str(args.rounds)]
    command += ["--prefill", str(args.prefill), "--decode", str(args.decode)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: dict, fake_quant: dict, sizes: dict) -> None:
    fp32 = results["fp32 dense"]
    print(
        f"\n{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads; prefill "
        f"{args.prefill} tokens, decode {args.decode} tokens at batch 1, {args.rounds} rounds "
        f"(median); perplexity on {args.windows} windows of 512 tokens of wiki-sample; "
        "fake-quant: the in-memory quantized model, in fp32 or under bf16 autocast as the row\n"
    )
    print(
        "| variant | file (MiB) | prefill tok/s | decode tok/s | decode vs fp32 | peak RSS (MiB) "
        "| ppl | fake-quant ppl |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, checkpoint, dtype in VARIANTS:
        row = results[label]
        key = checkpoint + (" bf16" if dtype == "bfloat16" else "")
        expected = fake_quant.get(key)
        print(
            f"| {label} | {sizes[checkpoint] / 2**20:.1f} | {row['prefill_tok_s']:.0f} "
            f"| {row['decode_tok_s']:.1f} | {row['decode_tok_s'] / fp32['decode_tok_s']:.2f}x "
            f"| {row['peak_rss_mib']:.0f} | {row['ppl']:.3f} "
            f"| {'-' if expected is None else f'{expected:.3f}'} |"
        )


def one_linear(args: argparse.Namespace, out_features: int = 1536, in_features: int = 576):
    """Milliseconds of one SmolLM2-sized linear (576 -> 1536) on each kernel, at 1 token and
    at the prefill length: what the model-level rows are made of."""
    generator = torch.Generator().manual_seed(0)
    shape, groups = (out_features, in_features), in_features // 64

    def codes(bits: int) -> torch.Tensor:
        return torch.randint(0, 2**bits, shape, generator=generator, dtype=torch.int32)

    int4 = CompressedLinear(
        "int4",
        4,
        codes(4),
        torch.rand(out_features, groups, generator=generator) * 0.01,
        torch.randint(0, 16, (out_features, groups), generator=generator, dtype=torch.int32),
    )
    int8 = CompressedLinear(
        "int8",
        8,
        codes(8),
        torch.rand(out_features, 1, generator=generator) * 0.01,
        torch.full((out_features, 1), 128, dtype=torch.int32),
        input_scale=torch.tensor(0.02),
        input_zero=torch.tensor(130),
    )
    dense = torch.randn(shape, generator=generator)
    kernels = {
        "dense fp32": (dense, torch.float32),
        "dense bf16": (dense.bfloat16(), torch.bfloat16),
        "int4 fp32 act": (int4_weight(int4, torch.float32), torch.float32),
        "int4 bf16 act": (int4_weight(int4, torch.bfloat16), torch.bfloat16),
        "int8 static act": (int8_weight(int8, torch.float32), torch.float32),
    }
    print(f"\none linear {in_features} -> {out_features}, ms (median of 5):\n")
    print(f"| kernel | 1 token | {args.prefill} tokens |")
    print("|---|---|---|")
    for name, (weight, dtype) in kernels.items():
        cells = []
        for tokens in (1, args.prefill):
            x = torch.randn(tokens, in_features, generator=generator).to(dtype)
            cells.append(f"{1e3 * timed(torch.nn.functional.linear, x, weight):.2f}")
        print(f"| {name} | {' | '.join(cells)} |")


def timed(call, *args, repeats: int = 5) -> float:
    call(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--kernels-only", action="store_true", help="only the one-linear table")
    parser.add_argument(
        "--nudge", action="store_true", help="only W8A8's perplexity under a 1e-6 weight nudge"
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.dtype, args)))
        return
    if args.kernels_only:
        one_linear(args)
        return
    if args.nudge:
        nudge_sensitivity(args)
        return
    with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
        root = Path(tmp)
        fake_quant = prepare(args, root)
        sizes = {path.name: directory_size(path) for path in root.iterdir()}
        results = {
            label: in_subprocess(root / checkpoint, dtype, args)
            for label, checkpoint, dtype in VARIANTS
        }
    report(args, results, fake_quant, sizes)
    one_linear(args)


if __name__ == "__main__":
    main()
