"""Export: dequantized HF checkpoints, packed integer codes, their round trips, the run phase."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cbq.config import ConfigError, ExportFormat, Granularity, QuantConfig
from cbq.data import evaluation_windows
from cbq.eval import perplexity
from cbq.export import META_FILE, PACKED_FILE, directory_size, export_model, load_packed
from cbq.models import adapter_for, attn_implementation_for, tiny_model, tiny_tokenizer
from cbq.quant import QuantLinear, quant_linears
from cbq.quant.packing import (
    OffGridError,
    dequantize,
    pack_bits,
    packed_size,
    unpack_bits,
    weight_codes,
)
from cbq.validation import validate

from helpers import CPU, assert_export_recorded, logits, rtn_method_model, rtn_model, tokens

W4A16 = QuantConfig(name="w4a16")
W4A8 = QuantConfig(name="w4a8", a_bits=8)
W4A4 = QuantConfig(name="w4a4", a_bits=4, a_granularity=Granularity.per_token, a_dynamic=True)
# Inputs of 64 and 128 columns: groups of 48 leave a partial last group in every linear.
W3G48 = QuantConfig(name="w3a16g48", w_bits=3, w_granularity=Granularity.per_group, w_group_size=48)
W2G32_SYM_A8 = QuantConfig(
    name="w2a8g32",
    w_bits=2,
    w_symmetric=True,
    w_granularity=Granularity.per_group,
    w_group_size=32,
    a_bits=8,
)
IDS = tokens(2, seed=5)


def tiny_in(family: str, dtype: torch.dtype):
    """The tiny model built in ``dtype`` (as a run loads it: ``.to(dtype)`` would also cast the
    float32 rotary tables, which a model built in ``dtype`` keeps)."""
    model = tiny_model(family)
    built = AutoModelForCausalLM.from_config(
        model.config, dtype=dtype, attn_implementation=attn_implementation_for(family)
    )
    built.load_state_dict(model.state_dict())
    return built.eval()


def quantized(family: str, quant: QuantConfig, dtype: torch.dtype = torch.float32):
    """RTN with static activation ranges calibrated on random tokens."""
    return rtn_method_model(tiny_in(family, dtype), quant, tokens(4, seed=1))


def export(model, path, fmt: ExportFormat, quant: QuantConfig = W4A16):
    return export_model(model, tiny_tokenizer(), path, fmt, method="rtn", setting=quant.name)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip_every_width(bits):
    for count in (1, 13, 1000):
        codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count))
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
        assert torch.equal(unpack_bits(packed, bits, count), codes.to(torch.uint8))


def test_four_bit_codes_share_bytes_low_nibble_first():
    assert pack_bits(torch.tensor([1, 2, 3, 15]), 4).tolist() == [0x21, 0xF3]


@pytest.mark.parametrize("quant", [W4A16, W3G48, W2G32_SYM_A8], ids=lambda q: q.name)
def test_codes_are_the_integer_grid_values(quant):
    for _, qlinear in quant_linears(rtn_model(tiny_model("llama"), quant)):
        weight, quantizer = qlinear.linear.weight.detach(), qlinear.weight_quantizer
        codes = weight_codes(quantizer, weight)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**quant.w_bits - 1
        assert torch.equal(codes.int(), quantizer.integers(weight))  # clamp(round(W/s) + z)
        assert torch.equal(dequantize(quantizer, codes, weight.dtype), weight)


def test_off_grid_weight_is_refused(tmp_path):
    model = rtn_model(tiny_model("llama"), W4A16)
    name, qlinear = next(quant_linears(model))
    with torch.no_grad():
        qlinear.linear.weight[0, 0] += 1e-3
    with pytest.raises(OffGridError, match=name):
        export(model, tmp_path / "out", ExportFormat.packed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dequantized_reloads_with_plain_hf(tmp_path, family):
    model = rtn_model(tiny_model(family), W3G48)
    before = logits(model, IDS)
    export(model, tmp_path, ExportFormat.dequantized, W3G48)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, QuantLinear) for m in reloaded.modules())
    for name, qlinear in quant_linears(model):
        assert torch.equal(reloaded.get_submodule(name).weight, qlinear.linear.weight)
    torch.testing.assert_close(logits(reloaded, IDS), before, rtol=0, atol=1e-5)
    assert torch.equal(logits(model, IDS), before)  # the in-memory model is untouched
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["weights"] == {
        "bits": 3,
        "symmetric": False,
        "granularity": "per_group",
        "group_size": 48,
        "dynamic": False,
    }
    assert meta["activations"] is None and meta["method"] == "rtn"
    assert meta["cbq_version"] == "0.1.0" and meta["quantized_linears"] == [
        name for name, _ in quant_linears(model)
    ]


def test_dequantized_says_activations_are_not_quantized(tmp_path, caplog):
    model = quantized("llama", W4A8)
    with caplog.at_level(logging.WARNING, logger="cbq.export"):
        export(model, tmp_path, ExportFormat.dequantized, W4A8)
    assert "does NOT quantize activations" in caplog.text
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert "NOT quantized" in meta["loading"]
    assert meta["activations"]["bits"] == 8 and not meta["activations"]["dynamic"]
    name, qlinear = next(quant_linears(model))
    assert meta["static_activation_scales"][name] == {
        "scale": qlinear.act_quantizer.scale.item(),
        "zero": qlinear.act_quantizer.zero.item(),
    }


@pytest.mark.parametrize(
    "family,quant,dtype",
    [
        ("llama", W4A8, torch.float32),
        ("opt", W4A8, torch.float32),
        ("llama", W4A4, torch.float32),
        ("opt", W4A4, torch.float32),
        ("llama", W3G48, torch.float32),
        ("opt", W2G32_SYM_A8, torch.float32),
        ("llama", W3G48, torch.bfloat16),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_packed_reload_is_identical(tmp_path, family, quant, dtype):
    model = quantized(family, quant, dtype)
    export(model, tmp_path, ExportFormat.packed, quant)
    reloaded, tokenizer = load_packed(tmp_path)
    assert torch.equal(logits(reloaded, IDS), logits(model, IDS))
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    reloaded_linears = dict(quant_linears(reloaded))
    assert reloaded_linears.keys() == dict(quant_linears(model)).keys()
    for name, qlinear in quant_linears(model):
        twin = reloaded_linears[name]
        assert twin.weight_materialized and twin.linear.weight.dtype == dtype
        assert torch.equal(twin.linear.weight, qlinear.linear.weight)
        assert twin.weight_quantizer.spec == qlinear.weight_quantizer.spec
        assert twin.act_quantizer.spec == qlinear.act_quantizer.spec
        assert twin.act_quantizer.calibrated == qlinear.act_quantizer.calibrated
        assert torch.equal(twin.act_quantizer.scale, qlinear.act_quantizer.scale)
        assert torch.equal(twin.act_quantizer.zero, qlinear.act_quantizer.zero)


def test_packed_weights_take_bits_over_eight_bytes(tmp_path):
    model = rtn_model(tiny_model("llama"), W4A16)
    export(model, tmp_path / "packed", ExportFormat.packed)
    export(model, tmp_path / "dequantized", ExportFormat.dequantized)
    tensors = load_file(tmp_path / "packed" / PACKED_FILE)
    packed_bytes = fp32_bytes = 0
    for name, qlinear in quant_linears(model):
        assert tensors[f"{name}.qweight"].numel() == packed_size(qlinear.linear.weight.numel(), 4)
        for suffix in ("qweight", "scales", "qzeros"):
            packed_bytes += tensors[f"{name}.{suffix}"].nbytes
        fp32_bytes += qlinear.linear.weight.numel() * 4
    assert 6.5 < fp32_bytes / packed_bytes < 8  # 8x, less one scale and zero per row
    assert directory_size(tmp_path / "packed") < 0.7 * directory_size(tmp_path / "dequantized")


def test_fp_model_exports_as_it_is(tmp_path):
    model = tiny_model("opt")
    export(model, tmp_path / "packed", ExportFormat.packed)
    export(model, tmp_path / "dequantized", ExportFormat.dequantized)
    reloaded, _ = load_packed(tmp_path / "packed")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    assert torch.equal(logits(reloaded, IDS), logits(model, IDS))
    assert torch.equal(logits(plain, IDS), logits(model, IDS))
    meta = json.loads((tmp_path / "packed" / META_FILE).read_text())
    assert meta["weights"] is None and meta["quantized_linears"] == []


def test_export_replaces_only_an_earlier_export(tmp_path):
    model = tiny_model("llama")
    export(model, tmp_path / "out", ExportFormat.packed)
    export(model, tmp_path / "out", ExportFormat.dequantized)  # replaces the packed one
    assert not (tmp_path / "out" / PACKED_FILE).exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a cbq export"):
        export(model, tmp_path / "other", ExportFormat.packed)
    with pytest.raises(ValueError, match="from_pretrained"):
        load_packed(tmp_path / "out")


def test_export_config_is_validated(compose_cfg):
    assert validate(compose_cfg()).export.format is ExportFormat.none
    cfg = validate(compose_cfg(["export=packed"]))
    assert cfg.export.format is ExportFormat.packed and cfg.export.dir is None
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["export.dir=/tmp/somewhere"]))
    assert "export.dir" in str(info.value) and "export=packed" in str(info.value)
    with pytest.raises(ConfigError, match=r"export\.dir: '' is not allowed"):
        validate(compose_cfg(["export=dequantized", "export.dir=''"]))


def test_run_exports_packed_and_records_it(tiny_run, tiny_corpus, tmp_path):
    metrics, record = tiny_run("llama", "method=rtn", "quant=w4a8", "export=packed")
    assert_export_recorded(record, tmp_path, "packed")
    assert "export" in record["timing_s"]
    model, tokenizer = load_packed(tmp_path / "quantized")
    windows = evaluation_windows(
        str(tiny_corpus), tokenizer, seqlen=32, calibrating_on_same=True, max_windows=8
    )
    name = f"ppl/{tiny_corpus.stem}"
    assert perplexity(adapter_for(model), windows, device=CPU, desc="reload") == metrics[name]


def test_fp_run_exports_the_fp_model_plainly(tiny_run, saved_tiny_model, tmp_path):
    target = tmp_path / "elsewhere"
    _, record = tiny_run(
        "opt", "method=fp", "export=dequantized", f"export.dir={target}", run_dir=tmp_path / "run"
    )
    assert record["stats"]["export/path"] == str(target)
    meta = json.loads((target / META_FILE).read_text())
    assert meta["method"] == "fp" and meta["setting"] is None and meta["weights"] is None
    exported = AutoModelForCausalLM.from_pretrained(target).state_dict()
    original = AutoModelForCausalLM.from_pretrained(saved_tiny_model("opt")).state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[key], original[key]) for key in original)
