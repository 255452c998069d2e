"""The interface every quantization method implements, and the context it runs in."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cbq.config import Config
from cbq.models.adapter import ModelAdapter


@dataclass
class MethodConfig:
    """Fields shared by every method; each method subclasses this with its own knobs."""

    name: str = "fp"


@dataclass
class RunContext:
    """What a method may use besides the model: where to work and where to report."""

    device: torch.device
    run_dir: Path
    log: Callable[[dict[str, float]], None] = field(default=lambda metrics: None)


class QuantMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # False for methods that need no calibration data (the run then draws none).
    needs_calibration: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, run_cfg: Config):
        self.cfg = cfg
        self.run_cfg = run_cfg
        self.quant = run_cfg.quant

    @abstractmethod
    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        """Quantize ``adapter.model`` in place; return statistics for the results file."""
