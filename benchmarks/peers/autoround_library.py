"""Runs the ``auto-round`` library on given calibration windows; writes the fake-quantized model.

Runs in the peers' venv (``make peers``), which has auto-round and its own pins, never in the
project's: it imports nothing of cbq. ``benchmarks/autoround_library.py`` drives it.

    .venv-peers/bin/python benchmarks/peers/autoround_library.py --model DIR --calib ids.pt \
        --out DIR --bits 4 --group-size -1 --iters 25 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="a (n, seqlen) tensor of token ids")
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=-1, help="-1: per channel")
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calib)
    started = time.perf_counter()
    rounder = AutoRound(
        model,
        tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        dataset=[ids[i : i + 1] for i in range(ids.shape[0])],
        nsamples=ids.shape[0],
        seqlen=ids.shape[1],
        iters=args.iters,
        batch_size=args.batch_size,
        seed=args.seed,
        device_map="cpu",
        enable_torch_compile=False,
        # fp32 tuning and weights, as the project's methods (the library's CPU default is
        # bf16 autocast, and it then saves bf16 weights).
        amp=False,
    )
    quantized, _ = rounder.quantize()
    seconds = time.perf_counter() - started
    out = Path(args.out)
    # The linears hold the fake-quantized (dequantized) weights: a plain fp32 checkpoint.
    quantized.config.quantization_config = None
    quantized.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "peer.json").write_text(
        json.dumps(
            {
                "library": "auto-round",
                "version": __import__("auto_round").__version__,
                "quantize_s": round(seconds, 1),
                "args": vars(args),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
