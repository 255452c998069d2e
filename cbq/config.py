"""Structured configs: types and defaults.

Hydra composes ``conf/`` on top of :class:`Config`, so OmegaConf already rejects wrong
types and enum values with the field's full key. :func:`cbq.validation.validate` adds the
checks that types cannot express (ranges, combinations, corpus names) and reports every
problem at once, each with the field name and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cbq.cbd import WindowConfig
from cbq.cfp import ActRule, CFPConfig, CFPMode, ClipTo, SplitDistance, WeightScope
from cbq.losses import LossConfig, LossKind
from cbq.quant.quantizer import Granularity, QuantConfig
from cbq.quant.rounding import RoundingConfig, RoundingForm, RoundingKind

# The configs of the packages, assembled into Config below (and importable from here).
__all__ = [
    "ActRule",
    "CFPConfig",
    "CFPMode",
    "ClipTo",
    "Config",
    "ConfigError",
    "Granularity",
    "LossConfig",
    "LossKind",
    "QuantConfig",
    "RoundingConfig",
    "RoundingForm",
    "RoundingKind",
    "SplitDistance",
    "WeightScope",
    "WindowConfig",
]


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LoggerMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    # A packaged model (smollm2-135m, gemma3-270m) when ``path`` is null; otherwise a label.
    name: str = "smollm2-135m"
    # A hub id or a local directory; overrides the packaged model.
    path: str | None = None
    cache_dir: str = "${oc.env:CBQ_CACHE,'~/.cache/cbq'}"
    # Build the model without weights and read each block's weights from the safetensors
    # checkpoint when the method reaches it; committed blocks go to <run dir>/offload and
    # evaluation walks them the same way. For models larger than RAM.
    lazy: bool = False


@dataclass
class DataConfig:
    calib: str = "wiki-sample"
    eval: list[str] = field(default_factory=lambda: ["wiki-sample"])
    n_samples: int = 128
    seqlen: int = 2048
    # Seed of the calibration sampler (the split of packaged corpora never changes).
    seed: int = "${seed}"  # type: ignore[assignment]
    # Perplexity window length; null means ``seqlen``.
    eval_seqlen: int | None = None
    # Evaluate on the first N windows only (quick CPU runs); null means all.
    max_eval_windows: int | None = None


class OnMissing(StrEnum):
    fail = "fail"
    skip = "skip"


@dataclass
class ZeroShotConfig:
    """Zero-shot evaluation through lm-eval on the in-memory (quantized) model."""

    # lm-eval task names: the offline tasks generated from the packaged text
    # (cbq.eval.offline_tasks) or the paper's tasks, which need the hub (cbq.eval.zeroshot).
    tasks: list[str] = field(default_factory=list)
    # Evaluate only the first N examples of each task; null means all.
    limit: int | None = None
    batch_size: int = 1
    # A task whose data cannot be loaded (hub unreachable, not cached): stop the run before
    # the model loads (fail), or record it as skipped and evaluate the others (skip).
    on_missing: OnMissing = OnMissing.fail
    # Examples per generated offline task (fewer when the corpus has fewer).
    n_examples: int = 200
    # Seed of the generated tasks' data and of lm-eval; fixed rather than the run seed, so
    # every run is scored on the same examples.
    seed: int = 0


class EvalDType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class EvalConfig:
    ppl: bool = True
    batch_size: int = 1
    # bfloat16: perplexity under bf16 autocast (faster where bf16 matmuls are, as on AMX CPUs;
    # its difference from float32 is measured in docs/benchmarks.md). The tables use float32.
    dtype: EvalDType = EvalDType.float32
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "cbq"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    """A paper table run as one multirun (``+experiment=table4_window``); empty for plain runs.

    ``scales`` maps each scale (``cpu``, ``paper``) to the overrides the table pins at that
    scale; the table's sweeper params read them through ``experiment.scale``.
    """

    name: str | None = None
    table: int | None = None
    scale: str = "cpu"
    scales: dict[str, dict[str, str]] = field(default_factory=dict)


class ExportFormat(StrEnum):
    none = "none"
    dequantized = "dequantized"
    packed = "packed"
    compressed_tensors = "compressed_tensors"


@dataclass
class ExportConfig:
    """Save the quantized model after the quantize phase (cbq.export)."""

    # dequantized: a plain HF checkpoint holding the quantized weights as floats;
    # packed: bit-packed integer codes + scales, reloaded by cbq.export.load_packed;
    # compressed_tensors: the compressed-tensors checkpoint (vLLM, transformers), for the
    # settings it can express (cbq.export_compressed).
    format: ExportFormat = ExportFormat.none
    # Target directory; null means <run dir>/quantized.
    dir: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    # Each method validates its own fields against its dataclass (cbq.methods).
    method: Any = field(default_factory=lambda: {"name": "rtn"})
    data: DataConfig = field(default_factory=DataConfig)
    # CBQ's components (used by method=cbq; one config group each, for the ablations).
    window: WindowConfig = field(default_factory=WindowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cfp: CFPConfig = field(default_factory=CFPConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    device: Device = Device.auto
    dtype: DType = DType.float32
    seed: int = 0
    # Validate and print each run's overrides, load nothing (preview a sweep or a table).
    dry_run: bool = False


EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def register_configs() -> None:
    """The schema, the resolver that puts ``experiments/`` on Hydra's search path, and the
    one that reads a paper table's setting at the chosen scale (``${cbq_scaled:model}``)."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("cbq_experiments_dir"):
        OmegaConf.register_new_resolver("cbq_experiments_dir", lambda: str(EXPERIMENTS_DIR))
    if not OmegaConf.has_resolver("cbq_scaled"):
        OmegaConf.register_new_resolver("cbq_scaled", scaled_setting)


def scaled_setting(key: str, *, _root_: DictConfig) -> Any:
    """``experiment.scales[experiment.scale][key]``, or a clear error naming the scales."""
    experiment = _root_.experiment
    problems = experiment_problems(experiment)  # type: ignore[arg-type]
    if problems:
        raise ConfigError(problems)
    values = experiment.scales[experiment.scale]
    if key not in values:
        raise ConfigError([f"experiment.scales.{experiment.scale}.{key}: missing"])
    return values[key]


class ConfigError(ValueError):
    """A config value is not allowed; the message names every bad field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


def experiment_problems(experiment: ExperimentConfig | DictConfig) -> list[str]:
    if experiment.scales and experiment.scale not in experiment.scales:
        return [
            f"experiment.scale: '{experiment.scale}' is not allowed; allowed: "
            + ", ".join(experiment.scales)
        ]
    return []
