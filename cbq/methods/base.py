"""The interface every quantization method implements, and the context it runs in."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import torch

from cbq.config import Config
from cbq.models.adapter import ModelAdapter
from cbq.pipeline import BlockPipeline, Checkpoint, settings_fingerprint
from cbq.quant import QuantLinear, wrap_block
from cbq.quant.quantizer import QuantConfig


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
    # Block-wise methods checkpoint into <run dir>/checkpoint and resume from it (runs do;
    # a method called on its own, as in the tests, does not).
    resumable: bool = False


# Config groups only CBQ reads.
CBQ_COMPONENTS = ("window", "loss", "cfp", "rounding")


class Activations(StrEnum):
    """Which quantization settings a method is designed for (a sweep skips the others)."""

    any = "any"
    full_precision = "full_precision"  # weight-only methods (AWQ)
    quantized = "quantized"  # weight+activation methods (SmoothQuant, OS+)


class QuantMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # False for methods that need no calibration data (the run then draws none).
    needs_calibration: ClassVar[bool] = True
    # Config groups the method does not read: a sweep over one of them runs the method once.
    ignored_groups: ClassVar[tuple[str, ...]] = CBQ_COMPONENTS
    activations: ClassVar[Activations] = Activations.any

    @classmethod
    def inapplicable_reason(cls, quant: QuantConfig) -> str | None:
        """Why ``quant`` is outside what the method is for, or None."""
        quantized = quant.act_spec().enabled
        if cls.activations is Activations.full_precision and quantized:
            return f"{cls.name} is a weight-only method; quant={quant.name} quantizes activations"
        if cls.activations is Activations.quantized and not quantized:
            return f"{cls.name} targets quantized activations; quant={quant.name} is weight-only"
        return None

    def __init__(self, cfg: MethodConfig, run_cfg: Config):
        self.cfg = cfg
        self.run_cfg = run_cfg
        self.quant = run_cfg.quant

    def wrap(self, adapter: ModelAdapter, index: int) -> dict[str, QuantLinear]:
        """Block ``index``'s linears wrapped in QuantLinear on this run's grids."""
        return wrap_block(
            adapter.blocks()[index],
            adapter.linear_names(),
            self.quant.weight_spec(),
            self.quant.act_spec(),
        )

    def block_pipeline(
        self,
        adapter: ModelAdapter,
        calib: torch.Tensor,
        ctx: RunContext,
        batch_size: int,
        fp_stream: bool = False,
    ) -> BlockPipeline:
        """The sequential pipeline for this method's blocks, checkpointed when ``ctx`` is
        resumable. A resumed block is rebuilt as :meth:`wrap` leaves it, then loaded: methods
        whose blocks end otherwise override ``wrap``."""
        checkpoint = None
        if ctx.resumable:
            settings = {"method": asdict(self.cfg), "quant": asdict(self.quant)}
            folder = ctx.run_dir / "checkpoint" / self.name
            restore = functools.partial(self.wrap, adapter)
            checkpoint = Checkpoint(folder, settings_fingerprint(settings, calib), restore)
        return BlockPipeline(adapter, ctx.device, batch_size, self.name, checkpoint, fp_stream)

    @abstractmethod
    def quantize(
        self, adapter: ModelAdapter, calib: torch.Tensor | None, ctx: RunContext
    ) -> dict[str, Any]:
        """Quantize ``adapter.model`` in place; return statistics for the results file."""
