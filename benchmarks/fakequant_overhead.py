"""Overhead of fake-quant wrapping on one decoder block, forward + backward.

A SmolLM2-135M-sized Llama block (random weights, no download) runs on batch x seqlen
tokens, plain and wrapped in QuantLinear at several settings, interleaved round by round so
that machine noise hits every variant alike. Reports the median time and the ratio to the
plain block, with the learnable step sizes receiving gradients as in block reconstruction.
The last two variants train as CBQ and AutoRound do (log step sizes and a full-rank rounding
offset): through the fused quantizer (``offset_fake_quant``), the same recomputing in the
backward pass what it keeps otherwise (``lean_backward``), and through autograd's
composition of the same straight-through ops, the quantizer before it; and two variants run
under bf16 autocast (``method.bf16=true``).

    python -m benchmarks.fakequant_overhead [--seqlen 2048] [--batch 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cbq.config import QuantConfig
from cbq.models import adapter_for
from cbq.quant import quant_linears, wrap_block
from cbq.quant.quantizer import RangeLearning
from cbq.quant.rounding import AdaRound

SETTINGS = {
    "w4a16 (per-channel)": QuantConfig(name="w4a16"),
    "w3a16g128": QuantConfig(
        name="w3a16g128", w_bits=3, w_granularity="per_group", w_group_size=128
    ),
    "w4a8 (static per-tensor)": QuantConfig(name="w4a8", a_bits=8),
    "w4a4 (dynamic per-token)": QuantConfig(
        name="w4a4", a_bits=4, a_granularity="per_token", a_dynamic=True
    ),
}


W3G128 = SETTINGS["w3a16g128"]


class ComposedOffset(AdaRound):
    """The offset form through the generic rounding path (autograd's ops, no fused kernel)."""

    additive_offset = None


def smollm2_sized_model() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def make_variant(
    model: torch.nn.Module, quant: QuantConfig | None, rounding: type[AdaRound] | None = None
) -> torch.nn.Module:
    variant = copy.deepcopy(model)
    if quant is None:
        return variant
    adapter = adapter_for(variant)
    block = adapter.blocks()[0]
    wrap_block(block, adapter.linear_names(), quant.weight_spec(), quant.act_spec())
    for _, qlinear in quant_linears(block):
        if rounding is not None:
            qlinear.weight_quantizer.learn_range(RangeLearning.step, qlinear.weight)
            qlinear.rounding = rounding(qlinear.weight)
            continue
        qlinear.weight_quantizer.scale.requires_grad_(True)
        act = qlinear.act_quantizer
        if act.needs_calibration:  # a fixed range is enough to time the forward
            act.scale.data.fill_(0.05)
            act.zero.data.fill_(128.0)
            act.calibrated = True
            act.scale.requires_grad_(True)
    return variant


def lean_backward(model: torch.nn.Module) -> torch.nn.Module:
    """The backward pass recomputes the fake-quantized weights and the quantizer's masks
    instead of keeping them (``QuantLinear.lean_backward``, what lazy CBQ runs do)."""
    for _, qlinear in quant_linears(model):
        qlinear.lean_backward = True
    return model


def time_step(model: torch.nn.Module, hidden: torch.Tensor, bf16: bool = False) -> float:
    adapter = adapter_for(model)
    ctx = adapter.block_context(hidden)
    inputs = hidden.clone().requires_grad_(True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = adapter.forward_block(0, inputs, ctx)
    out.float().pow(2).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    base = smollm2_sized_model()
    variants = {"plain block": make_variant(base, None)}
    variants.update({name: make_variant(base, quant) for name, quant in SETTINGS.items()})
    variants["w3a16g128, step + offset, fused"] = make_variant(base, W3G128, AdaRound)
    variants["w3a16g128, step + offset, fused, lean backward"] = lean_backward(
        make_variant(base, W3G128, AdaRound)
    )
    variants["w3a16g128, step + offset, composed"] = make_variant(base, W3G128, ComposedOffset)
    bf16 = {"plain block, bf16 autocast", "w3a16g128, step + offset, fused, bf16 autocast"}
    variants["plain block, bf16 autocast"] = variants["plain block"]
    variants["w3a16g128, step + offset, fused, bf16 autocast"] = variants[
        "w3a16g128, step + offset, fused"
    ]
    hidden = torch.randn(args.batch, args.seqlen, 576)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, model in variants.items():  # warm-up
        time_step(model, hidden, name in bf16)
    for _ in range(args.rounds):
        for name, model in variants.items():
            times[name].append(time_step(model, hidden, name in bf16))

    plain = statistics.median(times["plain block"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x seqlen {args.seqlen}, {args.rounds} rounds (median)\n"
    )
    print("| variant | fwd+bwd (s) | ratio to plain |")
    print("|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.3f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
