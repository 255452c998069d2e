"""Results of every method on tiny models of every family, kept as a reference for changes
to the shared pipeline (``cbq/pipeline.py``): ``tests/data/pipeline_reference.json`` holds
what the code before CBQ's windows moved onto the pipeline (commit 33abf31) computed, and
``tests/test_pipeline.py`` checks that today's code computes the same.

    PYTHONPATH=<checkout of the reference commit> python tests/pipeline_reference.py \\
        tests/data/pipeline_reference.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from cbq.config import Config, QuantConfig
from cbq.eval import perplexity
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for, tiny_model

from helpers import CPU, tokens

W3G16 = QuantConfig(name="w3a16g16", w_bits=3, w_granularity="per_group", w_group_size=16)
W8A8 = QuantConfig(name="w8a8", w_bits=8, a_bits=8)
METHODS = {
    "rtn-static": ({"name": "rtn"}, W8A8),
    "gptq": ({"name": "gptq"}, W3G16),
    "awq": ({"name": "awq", "n_grid": 4, "clip_grid": 4}, W3G16),
    "smoothquant": ({"name": "smoothquant"}, W8A8),
    "omniquant": ({"name": "omniquant", "epochs": 1}, W3G16),
    "autoround": ({"name": "autoround", "iters": 4, "batch_size": 2}, W3G16),
    "cbq": ({"name": "cbq", "iters": 4, "forward_batch": 2}, W3G16),
}
FAMILIES = ("llama", "opt", "gemma3")


def result(method: str, family: str) -> dict[str, object]:
    """The perplexity on held-out tokens and the sum of |w| of each block's quantized weights."""
    torch.manual_seed(0)
    model = tiny_model(family)
    adapter = adapter_for(model)
    cfg, quant = METHODS[method]
    with tempfile.TemporaryDirectory() as run_dir:
        context = RunContext(CPU, Path(run_dir), resumable=True)
        method = build_method(Config(method=dict(cfg), quant=quant))
        method.quantize(adapter, tokens(4, seed=0), context)
    weights = [
        sum(p.detach().abs().double().sum().item() for p in block.parameters())
        for block in adapter.blocks()
    ]
    return {"ppl": perplexity(adapter, tokens(2, seed=5)), "block_abs_sums": weights}


def compute() -> dict[str, dict[str, object]]:
    return {f"{m}/{f}": result(m, f) for m in METHODS for f in FAMILIES}


if __name__ == "__main__":
    torch.set_num_threads(1)
    Path(sys.argv[1]).write_text(json.dumps(compute(), indent=1) + "\n")
