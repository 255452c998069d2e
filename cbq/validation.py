"""Validation of a whole run config: every problem at once, with the field and the allowed
values, before any model loads. Each package's config checks its own fields
(``problems()``); this module adds the checks across packages (an export format against the
quantization setting, a lazy model against export and zero-shot) and each method's own
dataclass.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbq.config import Config, ConfigError, ExportFormat, QuantConfig, experiment_problems
from cbq.export_compressed import ALLOWED, setting_problems
from cbq.methods import method_problems


def validate(cfg: DictConfig | Config) -> Config:
    """Check ``cfg`` completely and return it as a typed object, or raise ConfigError."""
    typed: Config = OmegaConf.to_object(_as_structured(cfg))  # type: ignore[assignment]
    problems = [
        *typed.quant.problems(),
        *typed.data.problems(),
        *method_problems(typed.method),
    ]
    problems += typed.window.problems() + typed.rounding.problems() + typed.cfp.problems()
    problems += experiment_problems(typed.experiment)
    problems += typed.eval.problems()
    problems += _export_problems(typed)
    problems += _lazy_problems(typed)
    if problems:
        raise ConfigError(problems)
    return typed


def _as_structured(cfg: DictConfig | Config) -> DictConfig:
    if isinstance(cfg, Config):
        return OmegaConf.structured(cfg)
    return OmegaConf.merge(OmegaConf.structured(Config), cfg)  # type: ignore[return-value]


def _export_problems(cfg: Config) -> list[str]:
    problems = cfg.export.problems()
    if cfg.export.format is ExportFormat.compressed_tensors and cfg.method["name"] != "fp":
        problems += _compressed_tensors_problems(cfg.quant)
    return problems


def _compressed_tensors_problems(quant: QuantConfig) -> list[str]:
    """The settings compressed-tensors cannot express (the group size against the model's
    widths is checked once the model is loaded: cbq.export.check_exportable)."""
    try:
        weight, act = quant.weight_spec(), quant.act_spec()
    except ValueError:  # an invalid granularity, reported by QuantConfig.problems
        return []
    return [
        f"export.format: compressed_tensors cannot express {problem}; allowed: {ALLOWED}; "
        "export=packed keeps this setting"
        for problem in setting_problems(weight, act)
    ]


def _lazy_problems(cfg: Config) -> list[str]:
    if not cfg.model.lazy:
        return []
    problems = []
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().is_dir():
        problems.append(
            f"model.lazy: reads a local safetensors checkpoint; model.path {cfg.model.path!r} "
            "is not a local directory (set model.path to one, or to null for a packaged model)"
        )
    if cfg.eval.zeroshot.tasks:
        problems.append("model.lazy: zero-shot evaluation needs the whole model; use zeroshot=none")
    return problems
