"""Model loading: registry, local directories, fail-fast hub errors, packaged GGUF models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cbq.models import PACKAGED_MODELS, adapter_for, load_model, tiny_model, tiny_tokenizer
from cbq.models import loader as loader_module
from cbq.models.registry import supported_model_types


def test_registry_names_the_unsupported_model_type() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: .*gemma3_text.*llama.*opt"):
        adapter_for(model)
    assert {"opt", "bloom", "llama", "mistral", "qwen2", "gemma3_text"} <= set(
        supported_model_types()
    )


def test_unknown_packaged_model_lists_the_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'opt-125m'.*smollm2-135m, gemma3-270m.*model\.path"):
        load_model("opt-125m", None, cache_dir=tmp_path)
    assert set(PACKAGED_MODELS) == {"smollm2-135m", "gemma3-270m"}


@pytest.mark.parametrize("family", ["opt", "bloom", "gemma3"])
def test_load_from_a_local_directory(tmp_path: Path, family: str) -> None:
    saved = tiny_model(family)
    saved.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model("tiny", str(tmp_path), cache_dir=tmp_path / "cache")
    assert not model.training and model.config.use_cache is False
    assert model.config._attn_implementation == ("eager" if family == "bloom" else "sdpa")
    ids = torch.tensor([tokenizer("The river runs past the old mill.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved(ids).logits)


def test_dtype_is_honoured(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model("tiny", str(tmp_path), cache_dir=tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_id_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: bool
) -> None:
    # Without the offline flag the loader probes the hub itself (bounded by a timeout);
    # where the hub is reachable, this repository does not exist: an error either way.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="cbq-tests/no-such-model"):
        load_model("x", "cbq-tests/no-such-model", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10.0


def test_offline_error_names_the_packaged_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE.*smollm2-135m, gemma3-270m"):
        load_model("opt-125m", "facebook/opt-125m", cache_dir=tmp_path)


def test_hub_probe_gives_up_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    assert loader_module.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - start < 2.0


def test_packaged_cache_is_reused_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cached = tmp_path / "smollm2-135m"
    cached.mkdir()
    (cached / "cbq_source.json").write_text("{}")

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(loader_module, "_convert_packaged", no_conversion)
    assert loader_module.packaged_model_dir("smollm2-135m", tmp_path) == cached


def test_publish_keeps_the_first_complete_copy(tmp_path: Path) -> None:
    target, staging = tmp_path / "m", tmp_path / ".m.tmp"
    for folder, text in ((target, "first"), (staging, "second")):
        folder.mkdir()
        (folder / "cbq_source.json").write_text(text)
    loader_module._publish(staging, target)
    assert (target / "cbq_source.json").read_text() == "first"


@pytest.fixture(scope="module")
def packaged_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("CBQ_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("packaged")


@pytest.mark.slow
def test_packaged_smollm2_loads_and_runs_block_by_block(packaged_cache: Path) -> None:
    model, tokenizer = load_model("smollm2-135m", None, cache_dir=packaged_cache)
    assert (packaged_cache / "smollm2-135m" / "model.safetensors").exists()
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert getattr(model.config, "quantization_config", None) is None
    text = "The capital of France is Paris, and the capital of Italy is Rome. The"
    ids = torch.tensor([tokenizer(text).input_ids[:16]])
    assert ids.shape == (1, 16)
    adapter = adapter_for(model)
    assert len(adapter.blocks()) == 30
    with torch.no_grad():
        reference = model(ids).logits
        torch.testing.assert_close(adapter.forward_blocks(ids), reference, atol=1e-4, rtol=1e-4)
        # Real GQA (9 query heads, 3 kv heads): the v -> o fold stays exact.
        group = next(g for g in adapter.scale_groups(adapter.blocks()[0]) if g.name == "attn_out")
        adapter.fold_scale(group, torch.exp(torch.randn(group.num_channels) * 0.5))
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_packaged_gemma3_loads(packaged_cache: Path) -> None:
    model, tokenizer = load_model("gemma3-270m", None, cache_dir=packaged_cache)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == (
        "gemma3_text",
        18,
        640,
    )
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    ids = torch.tensor([tokenizer("The capital of France is Paris, and the").input_ids])
    assert ids[0, 0].item() == tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>
    with torch.no_grad():
        torch.testing.assert_close(
            adapter_for(model).forward_blocks(ids), model(ids).logits, atol=1e-4, rtol=1e-4
        )
