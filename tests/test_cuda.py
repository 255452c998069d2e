"""Device-agnostic code on a CUDA device (skipped where torch sees none)."""

from __future__ import annotations

import copy

import pytest
import torch

from cbq.cbd import CBDTrainer, TrainerKnobs, TrainerSettings
from cbq.config import Config, QuantConfig, RoundingConfig
from cbq.eval import perplexity
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
W4A8 = QuantConfig(name="w4a8", w_bits=4, a_bits=8)


def ids(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["opt", "bloom", "llama", "gemma3"])
def test_rtn_perplexity_matches_cpu(tmp_path, family):
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(family).to(device)
        adapter = adapter_for(model)
        method = build_method(Config(quant=W4A8, method={"name": "rtn"}))
        method.quantize(adapter, ids(), RunContext(device=torch.device(device), run_dir=tmp_path))
        results[device] = perplexity(adapter, ids(4), device=device)
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-3)


@pytest.mark.parametrize("cache", ["cpu", "device"])
def test_cbq_trainer_on_cuda_offloads_committed_blocks(tmp_path, cache):
    model = tiny_model("llama", num_hidden_layers=4).to(CUDA)
    settings = TrainerSettings(
        knobs=TrainerKnobs(epochs=2, batch_size=2, cache=cache), rounding=RoundingConfig(rank=2)
    )
    trainer = CBDTrainer(adapter_for(model), W4A8, settings, CUDA, tmp_path)
    stats = trainer.run(ids())
    assert len(stats["windows"]) == 3
    blocks = adapter_for(model).blocks()
    assert all(next(b.parameters()).device.type == "cpu" for b in blocks)
    model.to(CUDA)
    assert perplexity(adapter_for(model), ids(2), device=CUDA) < 1e4


def test_cbq_bf16_autocast_runs(tmp_path):
    model = tiny_model("opt").to(CUDA)
    reference = copy.deepcopy(model)
    settings = TrainerSettings(knobs=TrainerKnobs(epochs=1, batch_size=4, bf16=True))
    CBDTrainer(adapter_for(model), W4A8, settings, CUDA, tmp_path).run(ids())
    model.to(CUDA)
    with torch.no_grad():
        error = (
            (
                adapter_for(model).forward_blocks(ids(2).to(CUDA))
                - adapter_for(reference).forward_blocks(ids(2).to(CUDA))
            )
            .abs()
            .mean()
            .item()
        )
    assert 0 < error < 1.0
