"""Runs the ``auto-round`` library on given calibration windows; writes the fake-quantized model.

Runs in the peers' venv (``make peers``), which has auto-round and its own pins, never in the
project's: it imports nothing of cbq. ``benchmarks/autoround_library.py`` drives it.

    .venv-peers/bin/python benchmarks/peers/autoround_library.py --model DIR --calib ids.pt \
        --out DIR --bits 4 --group-size -1 --iters 25 --batch-size 8
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer


def rope_per_layer(model: torch.nn.Module) -> None:
    """Each decoder block computes the rotary table of its own layer type.

    auto-round 0.16.1 captures the first block's keyword inputs once and hands them to every
    block it tunes (``compressors/orchestrator.py``), ``position_embeddings`` included. Gemma-3
    has two tables (sliding layers: theta 1e4; full-attention layers 5, 11, 17: theta 1e6),
    and the first block is a sliding one, so the library tunes the full-attention blocks, and
    computes the targets of every later block, with the wrong positions. Recomputing the table
    in each block changes nothing in a plain forward pass, where it is already the right one.
    """
    text = model.model
    for layer in text.layers:
        layer_type = model.config.layer_types[layer.layer_idx]
        layer.forward = _with_own_rope(layer.forward, text.rotary_emb, layer_type)


def _with_own_rope(forward: Callable, rotary: torch.nn.Module, layer_type: str) -> Callable:
    # functools.wraps keeps the block's signature, which the library reads to name its inputs.
    @functools.wraps(forward)
    def own_rope(*args, **kwargs):
        if len(args) > 1:
            raise TypeError("expected the inputs after the hidden states as keyword arguments")
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        kwargs["position_embeddings"] = rotary(hidden, positions, layer_type)
        return forward(*args, **kwargs)

    return own_rope


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
    parser.add_argument(
        "--rope-per-layer",
        action="store_true",
        help="Gemma-3: give each block its own layer type's rotary table (see rope_per_layer)",
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calib)
    if args.rope_per_layer:
        rope_per_layer(model)
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
