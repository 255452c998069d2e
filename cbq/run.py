"""The run entry point: ``python -m cbq [overrides]`` (``-m`` for sweeps).

load model -> draw calibration data -> quantize (method) -> export (optional) -> evaluate
-> results.json + W&B
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cbq.config import (
    Config,
    ConfigError,
    Device,
    EvalDType,
    ExportFormat,
    register_configs,
)
from cbq.data import calibration_batch, evaluation_windows, metric_name
from cbq.eval import evaluate_zeroshot, perplexity, prepare_zeroshot
from cbq.export import check_exportable, export_model
from cbq.methods import METHODS, RunContext, build_method
from cbq.models import ModelAdapter, adapter_for, load_model
from cbq.models.loader import load_skeleton, model_directory
from cbq.models.residency import make_lazy
from cbq.results import RunRecord, Status, write_skipped
from cbq.sweep import skip_reason, sweep_overrides, swept_axes
from cbq.tracking import Tracker
from cbq.validation import validate

log = logging.getLogger("cbq")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def resolve_device(device: Device) -> torch.device:
    if device is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "device: cuda was asked for but torch sees no CUDA device; use auto or cpu"
        )
    return torch.device(device.value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(cfg: Config) -> str:
    return f"{cfg.model.name}-{cfg.quant.name}-{cfg.method['name']}"


def tracking_labels(cfg: Config) -> tuple[str | None, list[str]]:
    """W&B group and tags: the group is ``logger.group``, else the sweep's name in a
    multirun; tags carry model, setting (``fp`` or the quant preset) and method."""
    group = cfg.logger.group
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name
    method = cfg.method["name"]
    setting = "fp" if method == "fp" else cfg.quant.name
    tags = [cfg.model.name, setting, method, *cfg.logger.tags]
    if cfg.experiment.name:
        tags.append(cfg.experiment.name)
    return group, list(dict.fromkeys(tags))


def calibration_record(cfg: Config, used: bool) -> dict[str, Any]:
    if not used:
        return {"corpus": None, "reason": f"method {cfg.method['name']} draws no calibration data"}
    data = cfg.data
    return {
        "corpus": data.calib,
        "n_samples": data.n_samples,
        "seqlen": data.seqlen,
        "seed": data.seed,
    }


def run(raw_cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """One quantization run; returns its metrics. Validates everything before loading."""
    cfg = validate(raw_cfg)
    method = build_method(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    record = RunRecord(
        run_dir, resolved, cfg.seed, calibration_record(cfg, method.needs_calibration)
    )
    tracker = Tracker(cfg.logger, run_dir, resolved, run_name(cfg), *tracking_labels(cfg))
    try:
        _execute(cfg, method, device, run_dir, record, tracker)
    except BaseException as error:
        record.finish(Status.failed, f"{type(error).__name__}: {error}")
        tracker.finish(exit_code=1)
        raise
    record.finish()
    tracker.summary(
        {**record.metrics, **{f"time/{k}": v for k, v in record.record.timing_s.items()}}
    )
    tracker.summary({f"memory/{k}": v for k, v in record.record.memory.items()})
    tracker.finish()
    log.info("results: %s", record.path)
    return record.metrics


def _execute(
    cfg: Config, method, device: torch.device, run_dir: Path, record: RunRecord, tracker: Tracker
) -> None:
    dtype = getattr(torch, cfg.dtype.value)
    zeroshot = None
    if cfg.eval.zeroshot.tasks:  # task data first: a missing task stops the run before loading
        with record.phase("zeroshot_data"):
            zeroshot = prepare_zeroshot(cfg.eval.zeroshot, run_dir / "zeroshot")
        record.add_stats({"zeroshot/skipped": zeroshot.skipped})
    with record.phase("load_model"):
        model, tokenizer, adapter = _load(cfg, dtype, device, run_dir)
    if cfg.export.format is ExportFormat.compressed_tensors and cfg.method["name"] != "fp":
        check_exportable(adapter, cfg.quant.weight_spec(), cfg.quant.act_spec())
    calib = None
    if method.needs_calibration:
        with record.phase("calibration_data"):
            calib = calibration_batch(
                cfg.data.calib,
                tokenizer,
                n_samples=cfg.data.n_samples,
                seqlen=cfg.data.seqlen,
                seed=cfg.data.seed,
            )
    with record.phase("quantize"):
        stats = method.quantize(
            adapter,
            calib,
            RunContext(device=device, run_dir=run_dir, log=tracker.log, resumable=True),
        )
    record.add_stats(stats)
    if not cfg.model.lazy:
        model.to(device)  # methods may leave committed blocks offloaded to the CPU
    if cfg.export.format is not ExportFormat.none:
        _export(cfg, model, tokenizer, adapter, run_dir, record)
    if cfg.eval.ppl:
        with record.phase("eval_ppl"):
            for corpus in cfg.data.eval:
                windows = evaluation_windows(
                    corpus,
                    tokenizer,
                    seqlen=cfg.data.eval_seqlen or cfg.data.seqlen,
                    calibrating_on_same=(corpus == cfg.data.calib),
                    max_windows=cfg.data.max_eval_windows,
                )
                name = metric_name(corpus)
                value = perplexity(
                    adapter,
                    windows,
                    device=device,
                    batch_size=cfg.eval.batch_size,
                    desc=name,
                    bf16=cfg.eval.dtype is EvalDType.bfloat16,
                )
                log.info("ppl/%s = %.3f (%d windows)", name, value, windows.shape[0])
                record.add_metrics({f"ppl/{name}": value})
                record.add_stats(
                    {f"eval_windows/{name}": int(windows.shape[0]), "eval_dtype": cfg.eval.dtype}
                )
                tracker.log({f"ppl/{name}": value})
    if zeroshot is not None:
        with record.phase("eval_zeroshot"):
            results = evaluate_zeroshot(model, tokenizer, zeroshot)
        log.info("zero-shot: %s", results.metrics())
        record.add_metrics(results.metrics())
        record.add_stats(results.stats())
        tracker.log(results.metrics())


def _load(
    cfg: Config, dtype: torch.dtype, device: torch.device, run_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelAdapter]:
    """The model, its tokenizer and adapter; a lazy model's blocks stay on disk until used."""
    cache_dir = Path(cfg.model.cache_dir).expanduser()
    if not cfg.model.lazy:
        model, tokenizer = load_model(
            cfg.model.name, cfg.model.path, cache_dir=cache_dir, dtype=dtype, device=str(device)
        )
        return model, tokenizer, adapter_for(model)
    directory = model_directory(cfg.model.name, cfg.model.path, cache_dir)
    model, tokenizer = load_skeleton(directory, dtype)
    adapter = adapter_for(model)
    adapter.residency = make_lazy(
        model, adapter.blocks(), directory, run_dir / "offload", dtype, device
    )
    return model, tokenizer, adapter


def _export(cfg: Config, model, tokenizer, adapter, run_dir: Path, record: RunRecord) -> None:
    """Save the quantized model (``method=fp`` exports the FP model as it is)."""
    target = Path(cfg.export.dir).expanduser() if cfg.export.dir else run_dir / "quantized"
    method = cfg.method["name"]
    with record.phase("export"):
        result = export_model(
            model,
            tokenizer,
            target,
            cfg.export.format,
            method=method,
            setting=None if method == "fp" else cfg.quant.name,
            adapter=adapter,
        )
    record.add_stats(
        {
            "export/path": str(result.path),
            "export/format": result.format.value,
            "export/size_bytes": result.size_bytes,
        }
    )


def sweep_skip_reason(cfg: Config, hydra_cfg: Any) -> str | None:
    """Why this job of a multirun is not worth running (see :mod:`cbq.sweep`); None for
    single runs."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    axes = swept_axes(sweep_overrides(Path(hydra_cfg.sweep.dir)))
    method = METHODS[cfg.method["name"]]
    return skip_reason(cfg, method, dict(hydra_cfg.runtime.choices), axes)


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        typed = validate(cfg)
        reason = sweep_skip_reason(typed, hydra_cfg)
        if typed.dry_run:
            skip = f" (skip: {reason})" if reason else ""
            print("dry run:", " ".join(hydra_cfg.overrides.task) + skip)
            return None
        if reason:
            resolved = OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)
            path = write_skipped(Path(hydra_cfg.runtime.output_dir), resolved, reason)
            log.info("skipped: %s (%s)", reason, path)
            return None
        metrics = run(cfg, Path(hydra_cfg.runtime.output_dir))
    except ConfigError as error:
        print(f"cbq: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return next(iter(metrics.values()), None)
