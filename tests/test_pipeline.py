"""The sequential block pipeline: a killed block-wise run resumes to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbq.config import Config, QuantConfig
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for, tiny_model
from cbq.pipeline import QUANTIZED, BlockPipeline

import pipeline_reference
from helpers import CPU, tokens

W4A8 = QuantConfig(name="w4a8", w_bits=4, a_bits=8)  # static activations: RTN walks the stream


def quantize(method: str, run_dir: Path, **fields) -> tuple[torch.nn.Module, dict]:
    model = tiny_model("llama", num_hidden_layers=4)
    quantizer = build_method(Config(method={"name": method, **fields}, quant=W4A8))
    context = RunContext(CPU, run_dir, resumable=True)
    stats = quantizer.quantize(adapter_for(model), tokens(6, seed=0, seqlen=24), context)
    return model, stats


@pytest.mark.parametrize("method", ["gptq", "rtn", "awq", "smoothquant", "osplus", "omniquant"])
def test_killed_run_resumes_to_the_same_model(tmp_path, monkeypatch, method):
    uninterrupted, _ = quantize(method, tmp_path / "a")
    monkeypatch.setattr(BlockPipeline, "stop_after_window", 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(method, tmp_path / "b")
    monkeypatch.setattr(BlockPipeline, "stop_after_window", None)
    resumed, stats = quantize(method, tmp_path / "b")  # a fresh FP model, as a new process
    assert stats["resumed_at_block"] == 2
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(value, actual[key]), key
    assert not (tmp_path / "b" / "checkpoint" / method).exists()  # a finished run cleans up


def test_checkpoint_of_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(BlockPipeline, "stop_after_window", 0)
    with pytest.raises(KeyboardInterrupt):
        quantize("gptq", tmp_path)
    monkeypatch.setattr(BlockPipeline, "stop_after_window", None)
    with pytest.raises(RuntimeError, match="other settings"):
        quantize("gptq", tmp_path, percdamp=0.1)


def test_a_method_called_on_its_own_writes_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama")
    method = build_method(Config(method={"name": "gptq"}, quant=W4A8))
    method.quantize(adapter_for(model), tokens(4, seed=0, seqlen=24), RunContext(CPU, Path()))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["gptq", "rtn", "awq", "smoothquant", "osplus", "omniquant"])
def test_streams_hold_no_autograd_graph(tmp_path, monkeypatch, method):
    """The model's parameters require grad; a stream that kept each block's graph would hold
    every activation of every block it went through."""
    advance, streams = BlockPipeline._advance, []

    def recording(self, window, current, ctx):
        advance(self, window, current, ctx)
        streams.append(self.store.get(QUANTIZED))

    monkeypatch.setattr(BlockPipeline, "_advance", recording)
    model, _ = quantize(method, tmp_path)
    assert any(p.requires_grad for p in model.parameters())
    assert len(streams) == 4
    assert not any(s.requires_grad for s in streams)


REFERENCE = json.loads((Path(__file__).parent / "data" / "pipeline_reference.json").read_text())


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_every_method_computes_what_it_did_before_the_shared_windows(key):
    """Each method on each family (tiny models), against what the code before CBQ's windows
    moved onto this pipeline computed (``tests/pipeline_reference.py``, commit 33abf31)."""
    method, family = key.split("/")
    got, want = pipeline_reference.result(method, family), REFERENCE[key]
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert got["block_abs_sums"] == pytest.approx(want["block_abs_sums"], rel=1e-7)
