"""Lazily loaded models (``model.lazy``): blocks read from safetensors when a method or the
evaluation reaches them, written out and freed once committed. The quantized weights and the
perplexity must equal an eager load's, and at most one window of blocks may be in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cbq.cbd import CBDTrainer, _Snapshot
from cbq.config import Config, ConfigError, ExportFormat
from cbq.data import evaluation_windows
from cbq.eval import perplexity
from cbq.export import META_FILE, export_model, load_packed
from cbq.methods import METHODS as REGISTERED
from cbq.methods import RunContext, build_method
from cbq.models import adapter_for, tiny_model, tiny_tokenizer
from cbq.models.loader import load_model, load_skeleton
from cbq.models.residency import LazyBlocks, block_tensors, make_lazy
from cbq.pipeline import BlockPipeline
from cbq.validation import validate

from helpers import CPU, tokens
from pipeline_reference import METHODS as REFERENCE_METHODS
from pipeline_reference import W3G16, W8A8

# The reference's methods (each method's lazy result is checked against its eager one), and
# those it leaves out.
METHODS = {
    **REFERENCE_METHODS,
    "rtn": ({"name": "rtn"}, W3G16),
    "osplus": ({"name": "osplus"}, W8A8),
}


class CountingBlocks(LazyBlocks):
    """Records the most blocks that were ever resident at once."""

    most_resident = 0

    def acquire(self, index: int) -> None:
        super().acquire(index)
        self.most_resident = max(self.most_resident, len(self.resident))


def lazy_adapter(directory: Path, offload: Path):
    model, _ = load_skeleton(directory)
    adapter = adapter_for(model)
    lazy = make_lazy(model, adapter.blocks(), directory, offload, torch.float32, CPU)
    lazy.__class__ = CountingBlocks
    adapter.residency = lazy
    return adapter


def eager_adapter(directory: Path):
    model, _ = load_model("tiny", str(directory), cache_dir=directory)
    return adapter_for(model)


def quantize(adapter, method: str, run_dir: Path, resumable: bool = False) -> None:
    cfg, quant = METHODS[method]
    build_method(Config(method=dict(cfg), quant=quant)).quantize(
        adapter, tokens(4, seed=0), RunContext(CPU, run_dir, resumable=resumable)
    )


def block_state(adapter, index: int) -> dict[str, torch.Tensor]:
    adapter.residency.acquire(index)
    state = {name: t.detach().clone() for name, t in block_tensors(adapter.blocks()[index])}
    adapter.residency.evict(index)
    return state


def test_skeleton_holds_no_block_weights_until_acquired(saved_tiny_model, tmp_path):
    adapter = lazy_adapter(saved_tiny_model("llama"), tmp_path / "offload")
    eager = eager_adapter(saved_tiny_model("llama"))
    block = adapter.blocks()[1]
    assert all(t.is_meta for _, t in block_tensors(block))
    assert not adapter.embed(tokens(1, seed=0)).is_meta  # embeddings are loaded at once
    adapter.residency.acquire(1)
    for (name, got), (_, want) in zip(
        block_tensors(block), block_tensors(eager.blocks()[1]), strict=True
    ):
        assert torch.equal(got, want), name
    adapter.residency.evict(1)
    assert all(t.is_meta for _, t in block_tensors(block))


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_layerwise_perplexity_of_a_lazy_model_equals_the_eager_one(
    saved_tiny_model, tmp_path, family
):
    windows = tokens(3, seed=4)
    lazy = lazy_adapter(saved_tiny_model(family), tmp_path / "offload")
    eager = eager_adapter(saved_tiny_model(family))
    got, want = perplexity(lazy, windows, batch_size=2), perplexity(eager, windows, batch_size=2)
    assert got == pytest.approx(want, rel=1e-6)
    assert lazy.residency.most_resident == 1 and not lazy.residency.resident


@pytest.mark.parametrize("method", list(METHODS))
def test_lazy_quantization_equals_eager(saved_tiny_model, tmp_path, method):
    directory = saved_tiny_model("llama")
    lazy = lazy_adapter(directory, tmp_path / "lazy" / "offload")
    eager = eager_adapter(directory)
    quantize(lazy, method, tmp_path / "lazy")
    quantize(eager, method, tmp_path / "eager")
    n_blocks = len(eager.blocks())
    assert lazy.residency.released == set(range(n_blocks))  # every block was written out
    assert not lazy.residency.resident  # and freed
    # One block at a time for the block-wise pipeline, one window (K=2) for the trainer.
    assert lazy.residency.most_resident == (2 if method == "cbq" else 1)
    for index in range(n_blocks):
        want = {name: t for name, t in block_tensors(eager.blocks()[index])}
        got = block_state(lazy, index)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    windows = tokens(2, seed=9)
    assert perplexity(lazy, windows) == pytest.approx(perplexity(eager, windows), rel=1e-5)


@pytest.mark.parametrize("method", ["gptq", "cbq"])
def test_killed_lazy_run_resumes_to_the_eager_result(
    saved_tiny_model, tmp_path, monkeypatch, method
):
    """For CBQ the kill leaves block 1 trained, not committed, with its FP copy parked."""
    directory = saved_tiny_model("llama")
    eager = eager_adapter(directory)
    quantize(eager, method, tmp_path / "eager")
    monkeypatch.setattr(BlockPipeline, "stop_after_window", 0)
    with pytest.raises(KeyboardInterrupt):
        quantize(
            lazy_adapter(directory, tmp_path / "run" / "offload"), method, tmp_path / "run", True
        )
    monkeypatch.setattr(BlockPipeline, "stop_after_window", None)
    resumed = lazy_adapter(directory, tmp_path / "run" / "offload")  # a new process
    quantize(resumed, method, tmp_path / "run", resumable=True)
    for index in range(len(eager.blocks())):
        got = block_state(resumed, index)
        for name, tensor in block_tensors(eager.blocks()[index]):
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("lazy", [True, False])
def test_cbq_trains_with_its_fp_copies_on_disk_when_lazy(
    saved_tiny_model, tmp_path, monkeypatch, lazy
):
    """A lazy CBQ window's FP copies are needed for its targets only: they are on disk (meta
    tensors in memory) while it trains, and so are its copies of its variables (the start and
    the best iterate); its backward passes recompute instead of keeping (``lean_backward``);
    the result is the eager one (test above). An eager run keeps all of it in memory."""
    directory = saved_tiny_model("llama")
    parked_while_training: list[bool] = []
    snapshots_on_disk: list[bool] = []
    train, put = CBDTrainer._train, _Snapshot.put

    def recording(self, number, total, start, end):
        copies = [t for block in self.fp_blocks.values() for _, t in block_tensors(block)]
        parked_while_training.append(all(t.is_meta for t in copies))
        lean = {q.lean_backward for q in self._qlinears(start, end)}
        assert lean == {lazy}, "a lazy window's backward passes recompute, an eager one's keep"
        return train(self, number, total, start, end)

    def recording_put(self, tensors):
        snapshot = put(self, tensors)
        snapshots_on_disk.append(not self.values and self.path is not None and self.path.exists())
        return snapshot

    monkeypatch.setattr(CBDTrainer, "_train", recording)
    monkeypatch.setattr(_Snapshot, "put", recording_put)
    adapter = lazy_adapter(directory, tmp_path / "offload") if lazy else eager_adapter(directory)
    quantize(adapter, "cbq", tmp_path / "run")
    assert parked_while_training and set(parked_while_training) == {lazy}
    assert len(snapshots_on_disk) > len(parked_while_training)  # a start and a best per window
    assert set(snapshots_on_disk) == {lazy}


def test_resident_blocks_do_not_grow_with_depth(tmp_path):
    """The memory a lazy CBQ run holds is one window, at any depth."""
    most = {}
    for depth in (2, 6):
        directory = tmp_path / f"depth{depth}"
        tiny_model("llama", num_hidden_layers=depth).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
        adapter = lazy_adapter(directory, tmp_path / f"offload{depth}")
        quantize(adapter, "cbq", tmp_path / f"run{depth}")
        most[depth] = adapter.residency.most_resident
    assert most == {2: 2, 6: 2}


def test_lazy_run_end_to_end(tiny_run, tiny_corpus, tmp_path):
    eager, _ = tiny_run("llama", "method=gptq", "quant=w3a16g128", run_dir=tmp_path / "eager")
    lazy, record = tiny_run(
        "llama",
        "method=gptq",
        "quant=w3a16g128",
        "model.lazy=true",
        "export=packed",
        run_dir=tmp_path / "lazy",
    )
    assert lazy == pytest.approx(eager, rel=1e-5)
    assert record["config"]["model"]["lazy"] is True
    exported = tmp_path / "lazy" / "quantized"  # streamed out block by block
    assert len(json.loads((exported / META_FILE).read_text())["shards"]) == 3  # 2 blocks + rest
    reloaded, tokenizer = load_packed(exported)
    windows = evaluation_windows(
        str(tiny_corpus), tokenizer, seqlen=32, calibrating_on_same=True, max_windows=8
    )
    name = f"ppl/{tiny_corpus.stem}"
    assert perplexity(adapter_for(reloaded), windows, device=CPU) == pytest.approx(lazy[name])
    assert sorted(p.name for p in (tmp_path / "lazy" / "offload").iterdir())[:2] == [
        "block_0.safetensors",
        "block_1.safetensors",
    ]


def assert_same_compressed_checkpoint(lazy: Path, eager: Path) -> None:
    """The same tensors, bit for bit, and the same quantization config."""
    config = {d: json.loads((d / "config.json").read_text()) for d in (lazy, eager)}
    assert config[lazy]["quantization_config"] == config[eager]["quantization_config"]
    got = {k: t for shard in lazy.glob("*.safetensors") for k, t in load_file(shard).items()}
    want = load_file(eager / "model.safetensors")
    assert got.keys() == want.keys() and any(
        k.endswith("weight_packed") or "scale" in k for k in got
    )
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_every_method_is_checked_lazily():
    """A new method must join METHODS above: its block loop is what makes it lazy or not."""
    assert set(REGISTERED) - {"fp"} <= set(METHODS)


def test_lazy_refuses_what_needs_the_whole_model(compose_cfg):
    overrides = ["model.path=org/hub-id", "model.lazy=true", "export=compressed_tensors"]
    cfg = compose_cfg([*overrides, "zeroshot=offline"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    assert "model.path 'org/hub-id' is not a local directory" in message
    assert "zeroshot=none" in message and "export" not in message


@pytest.mark.parametrize(
    ("method", "fmt"),
    [
        ("gptq", ExportFormat.dequantized),
        ("rtn-static", ExportFormat.packed),
        ("gptq", ExportFormat.compressed_tensors),
        ("rtn-static", ExportFormat.compressed_tensors),
    ],
)
def test_lazy_export_is_written_block_by_block_and_equals_the_eager_one(
    saved_tiny_model, tmp_path, method, fmt
):
    directory = saved_tiny_model("llama")
    lazy = lazy_adapter(directory, tmp_path / "lazy" / "offload")
    eager = eager_adapter(directory)
    quantize(lazy, method, tmp_path / "lazy")
    quantize(eager, method, tmp_path / "eager")
    lazy.residency.most_resident = 0
    tokenizer = tiny_tokenizer()
    for adapter, name in [(lazy, "lazy"), (eager, "eager")]:
        export_model(
            adapter.model, tokenizer, tmp_path / name / "out", fmt, method=method, adapter=adapter
        )
    assert lazy.residency.most_resident == 1 and not lazy.residency.resident
    n_blocks = len(eager.blocks())
    shards = sorted(p.name for p in (tmp_path / "lazy" / "out").glob("*.safetensors"))
    assert len(shards) == n_blocks + 1  # the embeddings and head, then one shard per block
    meta = {
        n: json.loads((tmp_path / n / "out" / META_FILE).read_text()) for n in ("lazy", "eager")
    }
    assert meta["lazy"]["static_activation_scales"] == meta["eager"]["static_activation_scales"]
    if fmt is ExportFormat.packed:
        assert len(meta["lazy"]["static_activation_scales"]) == 7 * n_blocks
        got, _ = load_packed(tmp_path / "lazy" / "out")
        want, _ = load_packed(tmp_path / "eager" / "out")
    else:
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy" / "out")
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "eager" / "out")
    if fmt is ExportFormat.compressed_tensors:
        assert_same_compressed_checkpoint(tmp_path / "lazy" / "out", tmp_path / "eager" / "out")
    ids = tokens(2, seed=5)
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=0, atol=1e-5)
