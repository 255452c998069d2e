"""The run's structured config, assembled from the configs each package owns (the model's,
the data's, the quantizer's, the evaluation's...): their types, defaults and checks live
beside the code they configure, and are importable from here.

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
from cbq.data.calibration import DataConfig
from cbq.eval import EvalConfig, EvalDType, OnMissing, ZeroShotConfig
from cbq.export import ExportConfig, ExportFormat
from cbq.losses import LossConfig, LossKind
from cbq.models.loader import ModelConfig
from cbq.quant.quantizer import Granularity, QuantConfig
from cbq.quant.rounding import RoundingConfig, RoundingForm, RoundingKind
from cbq.tracking import LoggerConfig, LoggerMode

# The configs of the packages, assembled into Config below (and importable from here).
__all__ = [
    "ActRule",
    "CFPConfig",
    "CFPMode",
    "ClipTo",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalDType",
    "ExportConfig",
    "ExportFormat",
    "Granularity",
    "LoggerConfig",
    "LoggerMode",
    "LossConfig",
    "LossKind",
    "ModelConfig",
    "OnMissing",
    "QuantConfig",
    "RoundingConfig",
    "RoundingForm",
    "RoundingKind",
    "SplitDistance",
    "WeightScope",
    "WindowConfig",
    "ZeroShotConfig",
]


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
