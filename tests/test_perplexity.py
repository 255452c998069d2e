"""Perplexity against an independent float64 computation from the HF model's own logits."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch.nn import functional

from cbq.eval import perplexity
from cbq.models import adapter_for, tiny_model

from helpers import CPU, tokens

# The module, which cbq.eval's function of the same name hides.
ppl_module = importlib.import_module("cbq.eval.perplexity")

FAMILIES = ["llama", "opt", "bloom", "gemma3"]


def reference_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL, from the HF forward's full logits, in float64."""
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    return math.exp(nll.item())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [5, 512])  # logits in chunks of 5 tokens, and in one piece
def test_chunked_perplexity_equals_the_direct_one(monkeypatch, family, chunk):
    model = tiny_model(family)
    windows = tokens(3, seed=1, seqlen=24)
    monkeypatch.setattr(ppl_module, "LOGIT_CHUNK_TOKENS", chunk)
    value = perplexity(adapter_for(model), windows, device=CPU, batch_size=2)
    assert value == pytest.approx(reference_perplexity(model, windows), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_perplexity_is_close_to_float32_but_not_the_same(family):
    model = tiny_model(family)
    windows = tokens(3, seed=2, seqlen=24)
    adapter = adapter_for(model)
    fp32 = perplexity(adapter, windows, device=CPU)
    bf16 = perplexity(adapter, windows, device=CPU, bf16=True)
    assert bf16 != fp32  # the autocast took effect
    assert bf16 == pytest.approx(fp32, rel=0.02)


def test_empty_or_flat_windows_are_refused():
    adapter = adapter_for(tiny_model("llama"))
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(adapter, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(adapter, torch.zeros(8, dtype=torch.long))
