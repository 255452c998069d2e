"""Validation of a whole run config: every problem at once, with the field and the allowed
values, before any model loads. The configs of the quantizers, the window, the rounding and
CFP live in their packages with their own checks (``problems()``); the others are assembled
in :mod:`cbq.config` and checked here, with the checks that need a package (corpora,
zero-shot tasks, each method's own dataclass).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbq.config import (
    Config,
    ConfigError,
    DataConfig,
    ExportConfig,
    ExportFormat,
    QuantConfig,
    ZeroShotConfig,
    experiment_problems,
)
from cbq.data import validate_corpus_name
from cbq.eval.zeroshot import unknown_task_problem
from cbq.export_compressed import ALLOWED, setting_problems
from cbq.methods import method_problems


def validate(cfg: DictConfig | Config) -> Config:
    """Check ``cfg`` completely and return it as a typed object, or raise ConfigError."""
    typed: Config = OmegaConf.to_object(_as_structured(cfg))  # type: ignore[assignment]
    problems = [
        *typed.quant.problems(),
        *_data_problems(typed.data),
        *_method_problems(typed),
    ]
    problems += typed.window.problems() + typed.rounding.problems() + typed.cfp.problems()
    problems += experiment_problems(typed.experiment)
    if typed.eval.batch_size < 1:
        problems.append(f"eval.batch_size: {typed.eval.batch_size} must be >= 1")
    problems += _zeroshot_problems(typed.eval.zeroshot)
    problems += _export_problems(typed)
    problems += _lazy_problems(typed)
    if problems:
        raise ConfigError(problems)
    return typed


def _as_structured(cfg: DictConfig | Config) -> DictConfig:
    if isinstance(cfg, Config):
        return OmegaConf.structured(cfg)
    return OmegaConf.merge(OmegaConf.structured(Config), cfg)  # type: ignore[return-value]


def _data_problems(data: DataConfig) -> list[str]:
    problems = []
    for field_name, name in [("data.calib", data.calib)] + [
        (f"data.eval[{i}]", name) for i, name in enumerate(data.eval)
    ]:
        try:
            validate_corpus_name(name, field=field_name)
        except ValueError as error:
            problems.append(str(error))
    for field_name, value in [("data.n_samples", data.n_samples), ("data.seqlen", data.seqlen)]:
        if value < 1:
            problems.append(f"{field_name}: {value} must be a positive integer")
    for field_name, value in [
        ("data.eval_seqlen", data.eval_seqlen),
        ("data.max_eval_windows", data.max_eval_windows),
    ]:
        if value is not None and value < 1:
            problems.append(f"{field_name}: {value} must be a positive integer or null")
    return problems


def _zeroshot_problems(zeroshot: ZeroShotConfig) -> list[str]:
    problems = [
        problem
        for i, name in enumerate(zeroshot.tasks)
        if (problem := unknown_task_problem(name, f"eval.zeroshot.tasks[{i}]"))
    ]
    duplicates = sorted({name for name in zeroshot.tasks if zeroshot.tasks.count(name) > 1})
    if duplicates:
        problems.append(f"eval.zeroshot.tasks: {', '.join(duplicates)} listed more than once")
    for field_name, value in [
        ("eval.zeroshot.batch_size", zeroshot.batch_size),
        ("eval.zeroshot.n_examples", zeroshot.n_examples),
    ]:
        if value < 1:
            problems.append(f"{field_name}: {value} must be a positive integer")
    if zeroshot.limit is not None and zeroshot.limit < 1:
        problems.append(f"eval.zeroshot.limit: {zeroshot.limit} must be a positive integer or null")
    return problems


def _export_problems(cfg: Config) -> list[str]:
    problems = _export_dir_problems(cfg.export)
    if cfg.export.format is ExportFormat.compressed_tensors and cfg.method["name"] != "fp":
        problems += _compressed_tensors_problems(cfg.quant)
    return problems


def _export_dir_problems(export: ExportConfig) -> list[str]:
    if export.dir is None:
        return []
    if not export.dir.strip():
        return ["export.dir: '' is not allowed; allowed: null (<run dir>/quantized) or a path"]
    if export.format is ExportFormat.none:
        return [
            f"export.dir: {export.dir} needs an export format (got export.format=none); "
            "allowed: export=dequantized, export=packed or export=compressed_tensors, "
            "or export.dir=null"
        ]
    return []


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
    if cfg.export.format is not ExportFormat.none:
        problems.append(
            f"model.lazy: export={cfg.export.format.value} would need the whole model in "
            "memory; the committed blocks are in <run dir>/offload. Use export=none"
        )
    if cfg.eval.zeroshot.tasks:
        problems.append("model.lazy: zero-shot evaluation needs the whole model; use zeroshot=none")
    return problems


def _method_problems(cfg: Config) -> list[str]:
    return method_problems(cfg.method)
