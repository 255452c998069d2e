"""Config composition and validation: errors name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from cbq.config import ConfigError, Granularity
from cbq.quant.quantizer import FULL_PRECISION_BITS
from cbq.validation import validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_default_config_is_valid(compose_cfg):
    cfg = validate(compose_cfg())
    assert cfg.model.name == "smollm2-135m" and cfg.model.path is None
    assert cfg.method["name"] == "rtn"
    assert cfg.data.calib == "wiki-sample" and cfg.data.seed == cfg.seed == 0
    assert cfg.logger.mode.value == "offline"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "quant").glob("*.yaml")))
def test_every_quant_preset_is_valid_and_named_after_itself(compose_cfg, preset):
    cfg = validate(compose_cfg([f"quant={preset}"]))
    assert cfg.quant.name == preset
    w_bits, a_bits = preset[1], preset.split("a")[1][:2].rstrip("g")
    assert cfg.quant.w_bits == int(w_bits)
    assert cfg.quant.a_bits == int(a_bits)
    if "g" in preset:
        assert cfg.quant.w_granularity is Granularity.per_group
        assert cfg.quant.w_group_size == int(preset.split("g")[1])
    assert cfg.quant.weight_spec().enabled
    assert cfg.quant.act_spec().enabled == (cfg.quant.a_bits < FULL_PRECISION_BITS)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_preset_composes(compose_cfg, preset):
    cfg = validate(compose_cfg([f"model={preset}"]))
    assert cfg.model.name == preset
    assert (cfg.model.path is None) == (preset in {"smollm2-135m", "gemma3-270m"})


@pytest.mark.parametrize(
    "override,field,allowed",
    [
        ("quant.w_bits=9", "quant.w_bits", "2..8, or 16"),
        ("quant.a_bits=1", "quant.a_bits", "2..8, or 16"),
        (
            "quant.w_granularity=per_token",
            "quant.w_granularity",
            "per_tensor, per_channel, per_group",
        ),
        ("quant.w_group_size=128", "quant.w_group_size", "per_group"),
        ("data.calib=not-a-corpus", "data.calib", "wiki-sample"),
        ("data.eval=[wiki-sample,nope]", "data.eval[1]", "lee-news"),
        ("data.n_samples=0", "data.n_samples", "positive"),
        ("method.name=nope", "method.name", "fp, rtn, gptq"),
        ("+method.nope=1", "method.nope", ""),
    ],
)
def test_bad_values_name_field_and_allowed_values(compose_cfg, override, field, allowed):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg([override]))
    message = str(info.value)
    assert field in message and allowed in message


def test_all_problems_reported_at_once(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["quant.w_bits=1", "data.calib=zzz", "data.seqlen=0"]))
    assert len(info.value.problems) == 3


@pytest.mark.parametrize("method", ["cbq", "autoround"])
def test_bad_cache_is_rejected_before_any_model_loads(compose_cfg, method):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg([f"method={method}", "method.cache=ram"]))
    assert info.value.problems == [
        "method.cache: Invalid value 'ram', expected one of [device, cpu, disk]"
    ]


def test_every_bad_cbq_knob_is_reported_at_once(compose_cfg):
    overrides = ["method=cbq", "method.epochs=-1", "method.iters=-2", "method.lr_rounding=-1"]
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    assert info.value.problems == [
        "method.epochs: -1 must be >= 0",
        "method.iters: -2 must be >= 0, or null",
        "method.lr_rounding: -1.0 must be >= 0",
    ]


def test_per_token_static_activations_rejected(compose_cfg):
    cfg = compose_cfg(["quant=w4a4", "quant.a_dynamic=false"])
    with pytest.raises(ConfigError, match=r"quant.a_dynamic: false .* allowed: true"):
        validate(cfg)


@pytest.mark.parametrize(
    "override,field",
    [
        ("quant.w_granularity=per_row", "quant.w_granularity"),
        ("device=tpu", "device"),
        ("logger.mode=sometimes", "logger.mode"),
        ("data.seqlen=long", "data.seqlen"),
    ],
)
def test_type_and_enum_errors_at_composition(compose_cfg, override, field):
    """Hydra rejects these while composing, before our code runs, naming the key."""
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_cfg([override])
    text = str(info.value) + str(info.value.__cause__)
    assert field in text


def test_unknown_group_option_lists_choices(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["quant=w5a5"])
    assert "w4a16g128" in str(info.value)


def test_text_file_corpus_must_be_absolute_txt(compose_cfg, tmp_path):
    good = tmp_path / "notes.txt"
    good.write_text("hello\n")
    validate(compose_cfg([f"data.calib={good}", f"data.eval=[{good}]"]))
    with pytest.raises(ConfigError, match=r"data\.calib"):
        validate(compose_cfg(["data.calib=relative/notes.txt"]))
